"""`OmniBagelForConditionalGeneration`: the BAGEL AR stage as this plugin runs it.

vLLM's own `BagelForConditionalGeneration` (understanding: text2text,
img2text) under the omni architecture name, so that a checkpoint whose config
names this architecture loads through the plugin's registry and gets
bidirectional attention over image tokens from the `is_mm_prefix_lm` patch,
plus what the diffusion stage needs from the AR stage besides the KV cache:
per request, the RoPE position the generated image block takes and the shapes
of the request's input images, keyed by request id
(`get_kv_transfer_metadata(req_id)`, ARCHITECTURE.md principle 6).

Why the facts are recorded from the KV connector's metadata: in vLLM 0.32 a
model's forward sees one flattened batch (input ids, positions) and no request
ids, and the runner may reorder requests in the batch, so batch rows are no
key. The KV connector's scheduler side does know, per step, which requests
complete their prompt (`SaveSpec`: id, prompt tokens, multimodal ranges). The
forward reads that list from the active connector and records the facts under
each id; the connector's `wait_for_save`, after the same forward, takes them
with `get_kv_transfer_metadata` and stores them next to the request's K/V.
Warm-up and profiling forwards run without bound connector metadata, so they
record nothing; a record lives from the forward of a request's last prefill
step to that step's save.

Not here yet (see the issue): img2img inputs through the VAE encoder and the
MoT generation expert, and BAGEL's RoPE layout that gives each image block one
shared position. Until then every prompt token has its own position, as in
vLLM's Bagel, and the image shapes are the ViT inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.bagel import BagelForConditionalGeneration
from vllm.sequence import IntermediateTensors

from vllm_omni_plugin.kv.connector import SaveSpec, active_connector


class OmniBagelForConditionalGeneration(BagelForConditionalGeneration):
    """vLLM's Bagel with the omni architecture name and keyed KV-transfer metadata."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._kv_transfer_facts: dict[str, dict[str, Any]] = {}

    def kv_transfer_metadata(self, spec: SaveSpec) -> dict[str, Any]:
        """The diffusion stage's facts about one request whose prompt is complete."""
        vit = self.config.vit_config
        return {
            # The generated image block's RoPE position: the one after the prompt's
            # last. vLLM's Bagel numbers prompt tokens 0..n-1 (image tokens included).
            "latent_position": spec.num_tokens,
            # vLLM's Bagel processor resizes every understanding image to the ViT's
            # square input, so that is the shape each image went through the ViT at.
            "image_shapes": [[vit.image_size, vit.image_size] for modality, _, _ in spec.mm_ranges if modality == "image"],
            "image_token_ranges": [[offset, length] for modality, offset, length in spec.mm_ranges if modality == "image"],
        }

    def get_kv_transfer_metadata(self, req_id: str) -> dict[str, Any] | None:
        """The facts recorded for `req_id` (and forget them), or None if there are none."""
        return self._kv_transfer_facts.pop(req_id, None)

    def _record_kv_transfer_facts(self) -> None:
        connector = active_connector()
        if connector is None:  # no transfer configured, or a dummy / profiling run
            return
        connector.attach_metadata_source(self)
        for spec in connector.saves_this_step():
            self._kv_transfer_facts[spec.req_id] = self.kv_transfer_metadata(spec)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        self._record_kv_transfer_facts()
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
