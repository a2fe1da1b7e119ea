"""BAGEL's RoPE positions for a prompt, as ByteDance's BAGEL assigns them.

ByteDance-Seed/Bagel (bagel.py `prepare_prompts`, `prepare_vit_images`,
`prepare_vae_images`) keeps one running position `r`: a text token takes r
and advances it by one; an image block -- [<|vision_start|>, the image's
tokens, <|vision_end|>] -- takes r for EVERY token in it and advances it by
one. vLLM numbers every prompt token 0..n-1 instead. No vLLM imports here:
the same numbering serves the vLLM model class (M-RoPE positions), its KV
transfer metadata and the tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

IMAGE_BLOCK_MODALITIES = ("image", "vae_image")


def bagel_positions(num_tokens: int, blocks: Iterable[tuple[int, int]]) -> tuple[list[int], int]:
    """(position of each of `num_tokens` tokens, the next free position).

    blocks: (offset, length) of each image block in the prompt, markers
    included. They must not overlap and must lie inside the prompt.
    """
    positions: list[int] = []
    row = pos = 0
    for offset, length in sorted(blocks):
        if offset < row or length < 1 or offset + length > num_tokens:
            raise ValueError(f"image block (offset={offset}, length={length}) overlaps another or leaves the {num_tokens}-token prompt")
        positions += range(pos, pos + offset - row)  # text before the block
        pos += offset - row
        positions += [pos] * length
        pos += 1
        row = offset + length
    positions += range(pos, pos + num_tokens - row)
    return positions, pos + num_tokens - row


def mrope_section(head_dim: int) -> list[int]:
    """An M-RoPE section split of head_dim // 2 rotary frequencies.

    BAGEL's RoPE is one-dimensional; the model feeds vLLM's M-RoPE three
    identical position rows, for which every split gives plain RoPE. This one
    keeps Qwen2-VL's proportions (16/24/24 of 64) so no part is empty, which
    some M-RoPE kernels do not expect.
    """
    half = head_dim // 2
    side = 3 * half // 8
    return [half - 2 * side, side, side]


def block_ranges(mm_ranges: Sequence[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """(offset, length) of the image blocks among (modality, offset, length) placeholder ranges.

    ViT blocks ("image") and img2img VAE blocks ("vae_image") alike: one position each.
    """
    return [(offset, length) for modality, offset, length in mm_ranges if modality in IMAGE_BLOCK_MODALITIES]
