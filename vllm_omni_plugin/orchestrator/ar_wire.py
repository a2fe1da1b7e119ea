"""An AR prompt with image inputs on the wire, between a DiT server and an AR server (`--omni-stage`).

vLLM's /v1/completions takes text or token ids, not `multi_modal_data`; its chat route
takes image parts but wraps them in the chat template and knows only vLLM's own
modalities (BAGEL's img2img prefills carry a `vae_image`). So a hand-over whose AR
prompt has images goes to the AR server's PREFILL_ROUTE, which hands the very prompt
dict the colocated hand-over gives vLLM's engine client to the AR server's engine
client (server/ar_stage.py): vLLM's multimodal processor runs there on the same
images, and the output is the same.

    {"prompt": str | "prompt_token_ids": [int],
     "multi_modal_data": {modality: [PNG, base64, ...]},   # each modality: a list of images
     "sampling": {"max_tokens", "temperature", "kv_transfer_params"},
     "request_id": str}

PNG is lossless for the RGB / RGBA / L images a hand-over builds: the AR server decodes
the pixels the DiT server sent. An image given alone (not in a list) comes back alone.
"""

from __future__ import annotations

import base64
import io
from typing import Any

#: the AR server's route for AR prompts with image inputs (server/ar_stage.py); under /v1,
#: so vLLM's --api-key guards it like its own routes
PREFILL_ROUTE = "/v1/omni/prefill"

_MODES = ("RGB", "RGBA", "L")


def png_base64(image: Any) -> str:
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"an AR prompt's multi_modal_data crosses hosts as images only, got {type(image).__name__}")
    if image.mode not in _MODES:
        raise TypeError(f"an AR prompt's image crosses hosts in modes {_MODES}, got {image.mode}")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _image(data: str) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.load()
    return image


def encode_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    """The JSON body part of an AR prompt dict (`prompt` or `prompt_token_ids`, `multi_modal_data`)."""
    unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
    if unknown:
        raise TypeError(f"an AR prompt crosses hosts without {sorted(unknown)}")
    out = {k: (list(v) if k == "prompt_token_ids" else v) for k, v in prompt.items() if k != "multi_modal_data"}
    mm = prompt.get("multi_modal_data") or {}
    out["multi_modal_data"] = {m: ([png_base64(i) for i in v] if isinstance(v, (list, tuple)) else png_base64(v))
                               for m, v in mm.items()}
    return out


def decode_prompt(body: dict[str, Any]) -> dict[str, Any]:
    """The AR prompt dict `encode_prompt` wrote (the images decoded).

    Raises:
        ValueError: the body is not such a prompt.
    """
    text, ids = body.get("prompt"), body.get("prompt_token_ids")
    if (text is None) == (ids is None) or not (isinstance(text, str) or isinstance(ids, list)):
        raise ValueError("an AR prefill takes exactly one of `prompt` (str) and `prompt_token_ids` (list)")
    mm = body.get("multi_modal_data") or {}
    if not isinstance(mm, dict):
        raise ValueError("`multi_modal_data` must map modalities to PNG images (base64)")
    try:
        images = {m: ([_image(i) for i in v] if isinstance(v, list) else _image(v)) for m, v in mm.items()}
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"`multi_modal_data` holds an image that could not be decoded: {e}") from e
    prompt: dict[str, Any] = {"prompt": text} if text is not None else {"prompt_token_ids": [int(t) for t in ids]}
    if images:
        prompt["multi_modal_data"] = images
    return prompt
