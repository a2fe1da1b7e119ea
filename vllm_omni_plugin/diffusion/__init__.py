"""Diffusion engine: sampling parameters, step-wise pipelines, the step-batching
engine and the loader. Depends on torch, diffusers and transformers only -- never
on vLLM (ARCHITECTURE.md, principle 3).

    params.py     SamplingParams, ResolvedParams and THE resolve() function
    state.py      DiffusionState (per request) and CfgLayout
    interface.py  the step-wise protocol; generate() is the loop over its steps
    pipelines/    one module per family (qwen_image, wan) + generic fallback
    engine.py     request queue, step-level batching, aborts, progress events
    loader.py     model_index.json -> diffusers components -> our pipeline
    output.py     DiffusionOutput (images / layers / video + fps), mp4 export
"""

from .engine import DiffusionEngine, EngineConfig, EngineEvent
from .interface import DiffusionPipelineBase, StepwisePipeline
from .loader import load_pipeline
from .output import DiffusionOutput, export_mp4
from .params import PipelineDefaults, ResolvedParams, SamplingParams, resolve
from .state import CfgLayout, DiffusionState

__all__ = [
    "CfgLayout",
    "DiffusionEngine",
    "DiffusionOutput",
    "DiffusionPipelineBase",
    "DiffusionState",
    "EngineConfig",
    "EngineEvent",
    "PipelineDefaults",
    "ResolvedParams",
    "SamplingParams",
    "StepwisePipeline",
    "export_mp4",
    "load_pipeline",
    "resolve",
]
