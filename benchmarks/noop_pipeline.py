"""A step-wise pipeline that computes nothing: the engine's own costs (queue, step loop, client,
process boundary) with no model in the way. Used by bench_engine_process.py; importable by the
engine-core process when this folder is on PYTHONPATH."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from vllm_omni_plugin.diffusion.capabilities import Capabilities
from vllm_omni_plugin.diffusion.interface import StepwisePipeline
from vllm_omni_plugin.diffusion.output import DiffusionOutput
from vllm_omni_plugin.diffusion.params import PipelineDefaults, ResolvedParams
from vllm_omni_plugin.diffusion.state import CfgLayout, DiffusionState


class NoopPipeline(StepwisePipeline):
    family = "noop"
    capabilities = Capabilities(output="image", fields=frozenset({"num_inference_steps", "height", "width"}))

    def __init__(self) -> None:
        super().__init__(SimpleNamespace(scheduler=None, dtype=torch.float32), "noop")  # no weights: the dtype it reports

    def defaults(self) -> PipelineDefaults:
        return PipelineDefaults(values={"num_inference_steps": 1, "height": 8, "width": 8})

    def prepare(self, params: ResolvedParams, request_id: str) -> DiffusionState:
        return self.make_state(params, request_id, CfgLayout(), None, {}, None, torch.zeros(1, 1), None,
                               torch.arange(params.num_inference_steps), {}, 1)

    def batch_key(self, state: DiffusionState) -> Any:
        return "noop"

    def denoise_step(self, states: list[DiffusionState]) -> list[torch.Tensor]:
        return [s.latents for s in states]

    def scheduler_step(self, states: list[DiffusionState], preds: list[torch.Tensor]) -> None:
        for s in states:
            s.step_index += 1

    def decode(self, state: DiffusionState) -> DiffusionOutput:
        p = state.params
        return DiffusionOutput(state.request_id, "image", p, images=[Image.new("RGB", (p.width, p.height))])


@dataclass(frozen=True)
class NoopBuilder:
    """`build(device)` of EngineSpec: the no-op pipeline."""

    def __call__(self, device: Any) -> NoopPipeline:
        return NoopPipeline()
