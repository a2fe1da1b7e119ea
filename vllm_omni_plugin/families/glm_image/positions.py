"""GLM-Image's M-RoPE positions: the prompt's, and the generated image grids'.

GLM-Image numbers its AR sequence the way transformers' `GlmImageModel.get_rope_index`
does (checked against it in tests/test_glm_image_vllm.py):

  prompt    text tokens count up on all three rows; a source image's tokens
            (i2i) sit on a 2-D grid: row t = p, row h = p + y, row w = p + x, and
            the image takes max(h, w) positions;
  generated the target grids named at the end of the prompt
            (`<sop>H W<eop>` groups, the first being the image the DiT renders,
            a second the small preview text-to-image draws first) are generated
            LAST GROUP FIRST, each on its own 2-D grid starting where the previous
            one ended; then one end position, repeated for anything after.

vLLM's runner numbers generated tokens `context_len + delta` with ONE integer
`delta` per request (`SupportsMRoPE.get_mrope_input_positions`), the same
value on all three rows, in an int32 buffer: a straight line, not a grid. The
model therefore gives each request a *slot* in a `DecodeGridTable` (where its
grids start and their sizes) and hands vLLM a delta that makes generated token
`step`'s number `CODE_BASE + slot * SLOT_TOKENS + step`; its forward turns
such numbers back into real 3-D positions (`DecodeGridTable.positions`) before
the rotary embedding. The number carries the slot, so the batch order does
not matter (principle 6, keyed without request ids, which a forward lacks).
Slots are reused round-robin: NUM_SLOTS requests may be generating at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CODE_BASE = 1 << 30  # real positions stay far below (max_position_embeddings 131072)
SLOT_TOKENS = 1 << 15  # generated tokens per request: a 127 x 127 grid + preview + end
NUM_SLOTS = ((1 << 31) - CODE_BASE) // SLOT_TOKENS  # 32768; codes stay inside int32
MAX_GRID_SIDE = 127

Grid = tuple[int, int]


def decode_tokens(grids: Sequence[Grid]) -> int:
    """Tokens the AR stage generates for `grids` (every grid, then the end token)."""
    return sum(h * w for h, w in grids) + 1


def prompt_positions(num_tokens: int, images: Sequence[tuple[int, int, int, int]]) -> tuple[torch.Tensor, int]:
    """The prompt's [3, num_tokens] positions and the position after it.

    Args:
        num_tokens: prompt length.
        images: (offset, length, grid_h, grid_w) of each source image's token run, in order.

    Returns:
        (positions, next_position): the first generated grid starts at next_position.
    """
    rows: list[torch.Tensor] = []
    index = 0  # token index
    pos = 0  # position value
    for offset, length, h, w in images:
        if length != h * w:
            raise ValueError(f"an image run of {length} tokens does not fill its {h}x{w} grid")
        text = offset - index
        rows.append(torch.arange(pos, pos + text).expand(3, -1))
        pos += text
        ys = torch.arange(h).repeat_interleave(w)
        xs = torch.arange(w).repeat(h)
        rows.append(torch.stack([torch.full_like(ys, pos), pos + ys, pos + xs]))
        pos += max(h, w)
        index = offset + length
    rows.append(torch.arange(pos, pos + num_tokens - index).expand(3, -1))
    pos += num_tokens - index
    return torch.cat(rows, dim=1).long(), pos


class DecodeGridTable:
    """Per-slot (start, h1, w1, h2, w2) of generating requests, and the code <-> position map."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.table = torch.zeros(NUM_SLOTS, 5, dtype=torch.long, device=device)
        self._next = 0

    def register(self, num_prompt_tokens: int, start: int, decode_grids: Sequence[Grid]) -> int:
        """Take a slot for one request; returns the M-RoPE delta vLLM numbers its generated tokens with.

        Args:
            num_prompt_tokens: prompt length (vLLM numbers generated token `step` as
                num_prompt_tokens + step + delta).
            start: the position the first decode grid starts at.
            decode_grids: one or two grids, in generation order.
        """
        if not 1 <= len(decode_grids) <= 2:
            raise ValueError(f"GLM-Image generates one or two image grids, the prompt names {len(decode_grids)}")
        for h, w in decode_grids:
            if not (1 <= h <= MAX_GRID_SIDE and 1 <= w <= MAX_GRID_SIDE):
                raise ValueError(f"target grid {h}x{w} tokens: each side must be 1..{MAX_GRID_SIDE}")
        if decode_tokens(decode_grids) > SLOT_TOKENS:
            raise ValueError(f"{decode_tokens(decode_grids)} generated tokens exceed {SLOT_TOKENS}")
        slot, self._next = self._next, (self._next + 1) % NUM_SLOTS
        grids = [*decode_grids, (0, 0)][:2]
        self.table[slot] = torch.tensor([start, *grids[0], *grids[1]], dtype=torch.long)
        return CODE_BASE + slot * SLOT_TOKENS - num_prompt_tokens

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Replace generated-token codes in the [3, N] `positions` by their real 3-D positions, IN PLACE.

        Codes carry the same value on all three rows (vLLM writes them so); other
        columns are left unchanged. Returns `positions` itself.

        In place because the tensor handed on to the compiled language model must be
        the runner's own position buffer: vLLM's piecewise CUDA graphs (prefill and
        mixed batches) replay their kernels on the input addresses seen at capture and
        copy no inputs (`CUDAGraphWrapper`'s contract). A fresh tensor here made every
        replay read freed memory: wrong positions, and at times an illegal memory access
        (H200, 2026-12-02; eager decoding was right).
        """
        # No early exit on "no codes in this batch": that would sync the device every
        # step and cannot be captured in a CUDA graph; the lookup is a few small kernels.
        p = positions[0]
        is_code = p >= CODE_BASE
        code = (p - CODE_BASE).clamp(min=0)
        step = code % SLOT_TOKENS
        start, h1, w1, h2, w2 = self.table[code // SLOT_TOKENS].unbind(-1)
        n1, n2 = h1 * w1, h2 * w2
        start2 = start + torch.maximum(h1, w1)
        end = start2 + torch.maximum(h2, w2)
        in1 = step < n1
        in2 = ~in1 & (step < n1 + n2)
        s2 = (step - n1).clamp(min=0)
        w1, w2 = w1.clamp(min=1), w2.clamp(min=1)
        t = torch.where(in1, start, torch.where(in2, start2, end))
        hh = torch.where(in1, start + step // w1, torch.where(in2, start2 + s2 // w2, end))
        ww = torch.where(in1, start + step % w1, torch.where(in2, start2 + s2 % w2, end))
        return positions.copy_(torch.where(is_code.unsqueeze(0), torch.stack([t, hh, ww]), positions))
