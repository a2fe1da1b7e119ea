"""Per-request denoising state: everything one request needs between steps.

A state owns its scheduler (a deep copy of the pipeline's, never shared), its
latents, its text embeddings and its CFG layout, so the engine can run steps of
many requests in any order and in any grouping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

import torch

from .params import ResolvedParams


@dataclass(frozen=True)
class CfgLayout:
    """How a request's noise prediction is formed from model forwards.

    kind:
      "none"        one forward on the conditional branch
      "cfg"         uncond + scale * (cond - uncond)           (Wan)
      "true_cfg"    same, optionally rescaled to the cond norm  (Qwen-Image)
    `scales` holds the scale of each step (Wan2.2 switches scale with its expert);
    `renorm` rescales the combined prediction to the norm of the conditional one.
    """

    kind: str = "none"
    scales: tuple[float, ...] = ()
    renorm: bool = False

    @property
    def branches(self) -> int:
        return 1 if self.kind == "none" else 2


@dataclass
class DiffusionState:
    """One request between steps. `rows` = num_outputs_per_prompt latent rows."""

    request_id: str
    params: ResolvedParams
    latents: torch.Tensor
    scheduler: Any
    timesteps: torch.Tensor
    cfg: CfgLayout
    generator: torch.Generator
    # Conditional / unconditional model inputs, keyed by the model's argument names.
    cond: dict[str, Any] = field(default_factory=dict)
    uncond: dict[str, Any] | None = None
    # Family-specific tensors and numbers (image latents, shapes, expert boundary ...).
    extras: dict[str, Any] = field(default_factory=dict)
    step_index: int = 0
    # Tokens one branch of one row feeds the model (image + text); for the token budget.
    tokens_per_row: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    @property
    def current_timestep(self) -> torch.Tensor:
        return self.timesteps[self.step_index]

    @property
    def step_tokens(self) -> int:
        """Tokens the next denoise step of this request costs (all rows, all CFG branches)."""
        return self.tokens_per_row * self.rows * self.cfg.branches

    def guidance_scale_now(self) -> float:
        return self.cfg.scales[self.step_index] if self.cfg.scales else 1.0

    def release(self) -> None:
        """Drop every tensor this state holds (abort / finish): the memory goes back."""
        self.latents = torch.empty(0)
        self.cond = {}
        self.uncond = None
        self.extras = {}
        self.scheduler = None


BatchKey = Hashable
