"""`make demo`: the main job on the embedded default.

1. Builds the tiny seeded Qwen-Image checkpoint, starts `vllm serve <ckpt> --omni`
   on 127.0.0.1, asks it for one image through the official `openai` client,
   saves the PNG and stops the server.
2. Builds the tiny seeded BAGEL checkpoint, loads it with plain `vllm.LLM()`
   (the plugin loads through vLLM's own entry-point machinery) in a child process
   and prints the greedy answer to a text prompt and to an image+text prompt.

Engine and server logs go to files in the output directory (named on the way);
the last line printed is the PNG's path, so `make demo | tail -1` is the image.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .server.spawn import free_port, wait_healthy

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

OUT = Path(os.environ.get("OMNI_DEMO_DIR", Path(tempfile.gettempdir()) / "vllm-omni-demo"))


def served_image() -> Path:
    import openai

    from vllm_omni_plugin.checkpoints import make_checkpoint

    ckpt = make_checkpoint("qwen-image", "tiny", OUT / "qwen-image-tiny", seed=0)
    print(f"checkpoint: {ckpt}", flush=True)
    port = free_port()
    vllm = Path(sys.executable).with_name("vllm")
    log = OUT / "server.log"
    cmd = [str(vllm), "serve", str(ckpt), "--omni", "--host", "127.0.0.1", "--port", str(port)]
    print("starting:", " ".join(cmd), f"(log: {log})", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout=300)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        result = client.images.generate(
            prompt="a red cat on a blue sofa",
            size="128x128",
            extra_body={"seed": 0, "num_inference_steps": 8},
        )
        path = OUT / "qwen-image-tiny.png"
        path.write_bytes(base64.b64decode(result.data[0].b64_json))
        print(f"image resolved with: {result.model_extra['omni']['resolved']}", flush=True)
        return path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        print("server stopped", flush=True)


def bagel_text() -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    from vllm_omni_plugin.checkpoints import make_checkpoint

    path = make_checkpoint("bagel", "tiny", OUT / "bagel-tiny", seed=0)
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


def bagel_text_quietly() -> None:
    """`bagel_text` in a child process whose vLLM logs go to a file; its answers are printed here."""
    log = OUT / "bagel.log"
    print(f"BAGEL through plain vllm.LLM() (log: {log})", flush=True)
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "vllm_omni_plugin.demo", "bagel-text"], stdout=fh,
                              stderr=subprocess.STDOUT)
    answers = [line for line in log.read_text().splitlines() if line.startswith(("checkpoint:", "text2text", "img2text"))]
    print("\n".join(answers), flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"the BAGEL part exited with {done.returncode}; see {log}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    OUT.mkdir(parents=True, exist_ok=True)
    if argv == ["bagel-text"]:  # the child process of bagel_text_quietly
        bagel_text()
        return 0
    image = served_image()
    if os.environ.get("OMNI_DEMO_SKIP_BAGEL") != "1":
        bagel_text_quietly()
    print(image, flush=True)  # the last line: the output path
    return 0


if __name__ == "__main__":
    sys.exit(main())
