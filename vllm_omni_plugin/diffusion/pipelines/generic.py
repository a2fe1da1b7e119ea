"""Monolithic fallback: any diffusers pipeline, served through its own `__call__`.

A model diffusers supports works on day one, without step batching: the engine
runs such a request as one unit (progress still comes per step, through
diffusers' `callback_on_step_end`). The pipeline's own defaults are the default
values of its `__call__` signature.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from ..capabilities import ALWAYS_HONOURED, Capabilities, Knob
from ..interface import DiffusionPipelineBase, ProgressFn
from ..output import DiffusionOutput
from ..params import FAMILY_PARAMS, PipelineDefaults, ResolvedParams

# Our field name -> the names diffusers pipelines use for it.
_ALIASES = {
    "num_outputs_per_prompt": ("num_images_per_prompt", "num_videos_per_prompt"),
    "images": ("image",),
}
_OUR_FIELDS = (
    "prompt",
    "negative_prompt",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "num_outputs_per_prompt",
    "num_frames",
    "max_sequence_length",
    *FAMILY_PARAMS,  # the families' fields keep diffusers' names (true_cfg_scale, layers ...)
)
# __call__ arguments that are plumbing, not request knobs.
_NOT_KNOBS = frozenset({"output_type", "return_dict", "callback_on_step_end_tensor_inputs", "callback_steps"})


class GenericPipeline(DiffusionPipelineBase):
    monolithic = True
    family = "generic"

    def __init__(self, pipe: Any, model_id: str = "") -> None:
        super().__init__(pipe, model_id)
        self._signature = inspect.signature(type(pipe).__call__).parameters
        self.capabilities = self._declared()

    def _declared(self) -> Capabilities:
        """The declaration read off the diffusers pipeline: the fields its `__call__` takes, its
        other simply-typed arguments as knobs, video if it has a video processor, images if it
        takes `image` (how many it needs is the pipeline's own business: 0 or more)."""
        fields = {ours for ours in _OUR_FIELDS if self._call_name(ours) is not None}
        if hasattr(self.pipe, "video_processor") and "num_frames" in fields:
            fields.add("fps")  # the frame rate of the exported video
        mapped = {self._call_name(ours) for ours in (*_OUR_FIELDS, "images")}
        knobs = {
            name: Knob(type(p.default), description=f"`{name}` of {type(self.pipe).__name__}.__call__ "
                       f"(default {p.default!r}).")
            for name, p in self._signature.items()
            if name not in mapped and name not in _NOT_KNOBS
            and type(p.default) in (bool, int, float, str)
        }
        return Capabilities(
            output="video" if hasattr(self.pipe, "video_processor") else "image",
            input_images=(0, None) if self._call_name("images") else (0, 0),
            fields=frozenset(fields - ALWAYS_HONOURED),
            knobs=knobs,
        )

    def _call_name(self, ours: str) -> str | None:
        for name in (ours, *_ALIASES.get(ours, ())):
            if name in self._signature:
                return name
        return None

    def defaults(self) -> PipelineDefaults:
        values: dict[str, Any] = {}
        for ours in _OUR_FIELDS:
            name = self._call_name(ours)
            if name is not None:
                default = self._signature[name].default
                if default is not inspect.Parameter.empty and isinstance(default, (int, float, str)):
                    values[ours] = default
        values.setdefault("num_inference_steps", 50)  # only if the signature has none
        return PipelineDefaults(values=values)

    def call_kwargs(self, params: ResolvedParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for ours in (*_OUR_FIELDS, "images"):
            value = getattr(params, ours)
            name = self._call_name(ours)
            if value is None or name is None:
                continue
            if ours == "images":
                value = value[0] if len(value) == 1 else list(value)
            kwargs[name] = value
        for key, value in params.extra.items():
            if key in self._signature:
                kwargs[key] = value
        kwargs["generator"] = params.generator()
        kwargs["output_type"] = {"pil": "pil", "np": "np", "latent": "latent"}[params.output_type]
        return kwargs

    def run_whole(self, params: ResolvedParams, request_id: str, progress: ProgressFn | None) -> DiffusionOutput:
        kwargs = self.call_kwargs(params)
        if progress is not None and "callback_on_step_end" in self._signature:
            total = params.num_inference_steps

            def on_step(pipe: Any, i: int, t: Any, tensors: dict) -> dict:
                progress(request_id, i + 1, total)
                return {}

            kwargs["callback_on_step_end"] = on_step
            kwargs["callback_on_step_end_tensor_inputs"] = []
        result = self.pipe(**kwargs)
        if params.output_type == "latent":
            return DiffusionOutput(request_id, "latent", params, latents=_first_field(result))
        if hasattr(result, "frames"):
            frames = result.frames
            videos = [list(v) for v in (frames if not isinstance(frames, np.ndarray) else list(frames))]
            return DiffusionOutput(request_id, "video", params, videos=videos, fps=params.fps)
        return DiffusionOutput(request_id, "image", params, images=list(result.images))


def _first_field(result: Any) -> Any:
    for name in ("images", "frames", "latents"):
        if hasattr(result, name):
            return getattr(result, name)
    return result[0]
