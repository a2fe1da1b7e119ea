"""What Qwen-Image's transformer needs before its forward is captured as a CUDA graph.

A CUDA graph records device work only: an op that reads host data into a device tensor (a
blocking host-to-device copy, which also synchronises the stream) cannot be captured. Two of
diffusers' Qwen-Image forward (0.42) do:

* `compute_text_seq_len_from_mask` (called whenever a text mask is passed, i.e. whenever rows
  of different text lengths share a forward) builds `torch.as_tensor(text_seq_len, device=...)`
  from a python int. Replaced here by `_text_seq_len_from_mask`: the same three values from
  device ops only (`new_full`: a fill kernel). A declared replacement of one diffusers symbol:
    target     diffusers.models.transformers.transformer_qwenimage:compute_text_seq_len_from_mask
    why        the host-data copy inside the forward refuses capture
    how        the original's computation with the python-int tensor made by `new_full`; equal
               values for every mask (tests/diffusion/test_cuda_graphs.py compares both)
    upstream   could take it (a one-line change; the forward discards the value it affects)
    checked    diffusers 0.42.1 (the signature is checked; a changed one refuses CUDA graphs)
  Applied once per process, only when CUDA graphs are switched on for a Qwen-Image DiT.
* `zero_cond_t` models (Qwen-Image-Edit-2511) build `modulate_index` with `torch.tensor(...,
  device=...)` from the python `img_shapes` on every forward: refused (`check_capturable`).
"""

from __future__ import annotations

import inspect

import torch

_SIGNATURE = "(encoder_hidden_states: torch.Tensor, encoder_hidden_states_mask: torch.Tensor | None) -> "\
             "tuple[int, torch.Tensor | None, torch.Tensor | None]"


def _text_seq_len_from_mask(
    encoder_hidden_states: torch.Tensor, encoder_hidden_states_mask: torch.Tensor | None
) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """diffusers' `compute_text_seq_len_from_mask`, with no host data: (text length for RoPE,
    per-row length to the last active token (the full length for an empty row), bool mask)."""
    batch_size, text_seq_len = encoder_hidden_states.shape[:2]
    mask = encoder_hidden_states_mask
    if mask is None:
        return text_seq_len, None, None
    if mask.shape[:2] != (batch_size, text_seq_len):
        raise ValueError(f"`encoder_hidden_states_mask` shape {mask.shape} must match "
                         f"(batch_size, text_seq_len)=({batch_size}, {text_seq_len}).")
    mask = mask.to(torch.bool)
    positions = torch.arange(text_seq_len, device=encoder_hidden_states.device, dtype=torch.long)
    active = torch.where(mask, positions, positions.new_zeros(()))
    per_row = torch.where(mask.any(dim=1), active.max(dim=1).values + 1, positions.new_full((), text_seq_len))
    return text_seq_len, per_row, mask


def install_text_length_fix() -> None:
    """Point diffusers' Qwen-Image forward at `_text_seq_len_from_mask` (idempotent)."""
    from diffusers.models.transformers import transformer_qwenimage as module

    current = module.compute_text_seq_len_from_mask
    if current is _text_seq_len_from_mask:
        return
    if str(inspect.signature(current)) != _SIGNATURE:
        raise ValueError("cuda_graphs: diffusers' transformer_qwenimage.compute_text_seq_len_from_mask changed "
                         f"(signature {inspect.signature(current)}); its host-free replacement was checked "
                         "against diffusers 0.42.1 only")
    module.compute_text_seq_len_from_mask = _text_seq_len_from_mask


def check_capturable(transformer: torch.nn.Module) -> None:
    """Refuse a Qwen-Image DiT whose forward reads host data on every call; install the text-length fix."""
    if getattr(transformer, "zero_cond_t", False):
        raise ValueError("cuda_graphs: this Qwen-Image DiT has zero_cond_t (Qwen-Image-Edit-2511), whose forward "
                         "copies a host-built modulate_index to the GPU on every call; a CUDA graph cannot "
                         "capture it")
    install_text_length_fix()
