"""Patch: on the CPU platform, images of mm-prefix models are never split across prefill chunks.

Bidirectional attention over an image needs all of its tokens in one step
(a chunk cannot attend to keys that are not computed yet). vLLM's CUDA and
ROCm platforms therefore force `--disable-chunked-mm-input` for mm-prefix
models in `check_and_update_config`; the CPU platform does not. The
replacement runs VllmConfig's own post-init (platform hook included) and then
applies the same rule on the CPU platform, so the scheduler schedules an
image whole or not at all (vLLM already raises max_num_batched_tokens to fit
one image for such models).

Why not patch `CpuPlatform.check_and_update_config`, the exact counterpart of
the CUDA code: it is a classmethod, and the patch registry verifies
signatures of functions, properties and cached properties only.
"""

from __future__ import annotations

import functools

from . import Patch


def _make_replacement(original):
    @functools.wraps(original)
    def __post_init__(self):
        original(self)
        # Installed on the CPU platform only (PATCH.platforms).
        model_config, scheduler_config = self.model_config, self.scheduler_config
        if (
            model_config is not None
            and model_config.is_mm_prefix_lm
            and scheduler_config.is_multimodal_model
            and not scheduler_config.disable_chunked_mm_input
        ):
            from vllm.logger import init_logger

            init_logger("vllm.omni_plugin").info_once(
                "Forcing --disable-chunked-mm-input on CPU for a model with multimodal-bidirectional "
                "attention (vllm-omni-plugin patch cpu_mm_prefix_no_chunking)."
            )
            scheduler_config.disable_chunked_mm_input = True

    return __post_init__


PATCH = Patch(
    name="cpu_mm_prefix_no_chunking",
    target="vllm.config.vllm:VllmConfig.__post_init__",
    why=(
        "On the CPU platform vLLM may split an image of an mm-prefix model (BAGEL) across prefill "
        "chunks; its first part then cannot attend to the rest, so bidirectional image attention "
        "(patches cpu_mm_prefix_*) would be wrong. CUDA and ROCm force --disable-chunked-mm-input."
    ),
    how=(
        "Run the original __post_init__, then (installed on the CPU platform only), for a multimodal model with "
        "model_config.is_mm_prefix_lm, set scheduler_config.disable_chunked_mm_input = True "
        "(the CUDA platform's rule, applied after the platform hook). Other configs are untouched."
    ),
    upstream=(
        "Upstream could take the same five lines in CpuPlatform.check_and_update_config "
        "(vllm/platforms/cuda.py has them); not proposed yet."
    ),
    checked=("0.32.0",),
    signature="(self)",
    requires=(
        "vllm.config.scheduler:SchedulerConfig.disable_chunked_mm_input",
    ),
    make_replacement=_make_replacement,
    platforms=("cpu",),
)
