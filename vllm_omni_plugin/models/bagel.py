"""`OmniBagelForConditionalGeneration`: the BAGEL AR stage as this plugin runs it.

Today it is vLLM's own `BagelForConditionalGeneration` (understanding:
text2text, img2text) under the omni architecture name, so that a checkpoint
whose config names this architecture loads through the plugin's registry and
gets bidirectional attention over image tokens from the `is_mm_prefix_lm`
patch. The generation side (VAE-encoded img2img inputs, per-request KV
transfer metadata for the diffusion stage) extends this class; see
docs/architecture.md.
"""

from __future__ import annotations

from vllm.model_executor.models.bagel import BagelForConditionalGeneration


class OmniBagelForConditionalGeneration(BagelForConditionalGeneration):
    """vLLM's Bagel with the omni architecture name (processor inherited)."""
