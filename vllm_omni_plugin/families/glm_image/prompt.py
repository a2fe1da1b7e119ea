"""GLM-Image's AR prompt: the requested size as target grids, and back.

The size a request asks for becomes, in ONE place (`target_grids`), the
`<sop>H W<eop>` groups at the end of the AR prompt that GLM-Image generates
to (the same arithmetic as transformers' `GlmImageProcessor._get_target_shape`;
tests/test_glm_image_vllm.py compares the prompts token for token):

    text-to-image   {prompt}<sop>H W<eop><sop>h w<eop>{image start}
    image-to-image  {source images}{prompt}<sop>H W<eop>{image start}

H x W is the image grid in 32-pixel tokens (the DiT renders it), h x w a
~16 x 16 preview text-to-image draws first. The model (`glm_image.py`)
reads the groups back from the prompt's token ids (`parse_grids`) to place
the generated tokens on their grids.

No vLLM import here: the orchestrator and the request builder use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ...diffusion.capabilities import InvalidParams

TOKEN_PIXELS = 32  # one AR image token covers 32 x 32 pixels
PREVIEW_SIDE = 16  # the preview grid has ~PREVIEW_SIDE^2 tokens
MIN_SIDE = 256
MAX_SIDE = 2048
GRID_BOS = "<sop>"
GRID_EOS = "<eop>"


class UnsupportedSize(InvalidParams):
    """A size GLM-Image cannot render; the message lists the sizes it can."""


ALLOWED_SIZES = (
    f"height and width multiples of {TOKEN_PIXELS} between {MIN_SIDE} and {MAX_SIDE} "
    f"(e.g. 1024x1024, 512x512, 768x1344)"
)


def check_size(height: int, width: int) -> None:
    """Raise UnsupportedSize unless GLM-Image renders height x width exactly."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value % TOKEN_PIXELS or not MIN_SIDE <= value <= MAX_SIDE:
            raise UnsupportedSize(f"GLM-Image cannot render {name}={value!r}; allowed: {ALLOWED_SIZES}", "size")


@dataclass(frozen=True)
class TargetGrids:
    """The grids a request's AR prompt names (in tokens of 32 px)."""

    height: int
    width: int
    preview: tuple[int, int] | None  # text-to-image only

    @property
    def prompt_groups(self) -> list[tuple[int, int]]:
        """The `<sop>H W<eop>` groups in prompt order."""
        return [(self.height, self.width)] + ([self.preview] if self.preview else [])

    @property
    def decode_grids(self) -> list[tuple[int, int]]:
        """The grids in the order the AR stage generates them (last group first)."""
        return self.prompt_groups[::-1]

    def suffix(self, image_start: str) -> str:
        """The prompt's tail: the grid groups, then the image-start token generation continues from."""
        return "".join(f"{GRID_BOS}{h} {w}{GRID_EOS}" for h, w in self.prompt_groups) + image_start


def target_grids(height: int, width: int, *, text_to_image: bool) -> TargetGrids:
    """The requested pixel size as the AR prompt's grids (after `check_size`)."""
    check_size(height, width)
    token_h, token_w = height // TOKEN_PIXELS, width // TOKEN_PIXELS
    preview = None
    if text_to_image:
        ratio = token_h / token_w
        preview = (int(math.sqrt(ratio) * PREVIEW_SIDE), int(math.sqrt(1 / ratio) * PREVIEW_SIDE))
    return TargetGrids(token_h, token_w, preview)


def parse_grids(token_ids: Sequence[int], grid_bos_id: int, grid_eos_id: int, decode) -> list[tuple[int, int]]:
    """The `<sop>H W<eop>` groups in a prompt's token ids, in prompt order.

    Args:
        token_ids: the prompt.
        grid_bos_id, grid_eos_id: ids of `<sop>` and `<eop>`.
        decode: token ids -> text (the tokenizer's decode).

    Returns:
        [(H, W), ...]; a group that is not two integers raises ValueError.
    """
    groups: list[tuple[int, int]] = []
    start = None
    for i, tok in enumerate(token_ids):
        if tok == grid_bos_id:
            start = i + 1
        elif tok == grid_eos_id and start is not None:
            text = decode(list(token_ids[start:i])).split()
            if len(text) != 2 or not all(t.isdigit() for t in text):
                raise ValueError(f"a GLM-Image grid group must be '<sop>H W<eop>', got {decode(list(token_ids[start:i]))!r}")
            groups.append((int(text[0]), int(text[1])))
            start = None
    return groups
