"""What streaming partial images costs: `stream: true` with `partial_images` 3 vs 0 vs no stream, served.

    python benchmarks/bench_partial_images.py [--size 256] [--steps 20] [--repeat 5] [--threads 1]

A real `vllm serve <tiny Qwen-Image> --omni` (spawn_server: a socket, so events arrive as the server
sends them) and the real openai client. Per round, interleaved: the same request (seed, size, steps)
without `stream`, with `stream: true, partial_images: 0`, and with `partial_images: 3`. Reports the
medians of the end-to-end time (request sent -> completed image read), the time to the first partial
image event, the ratios to the unstreamed request, and the load average (the box may be shared: the
ratios are what to read). The completed images of the three modes must be byte-identical.

Prints a table; JSON to $OUT/bench_partial_images.json when OUT is set.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _round(client, body: dict, mode: str) -> dict:
    started = time.perf_counter()
    if mode == "plain":
        answer = client.images.generate(**body)
        return {"e2e": time.perf_counter() - started, "first_partial": None, "final": answer.data[0].b64_json}
    first, final = None, None
    k = 3 if mode == "partial3" else 0
    for event in client.images.generate(**body, stream=True, partial_images=k):
        if event.type.endswith("partial_image") and first is None:
            first = time.perf_counter() - started
        elif event.type.endswith("completed"):
            final = event.b64_json
    return {"e2e": time.perf_counter() - started, "first_partial": first, "final": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    args = parser.parse_args()

    from vllm_omni_plugin.checkpoints import make_checkpoint
    from vllm_omni_plugin.server.spawn import spawn_server

    work = Path(tempfile.mkdtemp(prefix="bench-partial-"))
    model = make_checkpoint("qwen-image", "tiny", work / "qwen-image", seed=0)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    body = dict(prompt="a lighthouse at dusk", size=f"{args.size}x{args.size}",
                extra_body={"seed": 0, "num_inference_steps": args.steps})
    modes = ("plain", "partial0", "partial3")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    loads = []
    with spawn_server(model, log=work / "server.log", env=env) as server:
        client = server.client(timeout=900)
        for mode in modes:  # warm-up (first-call costs, the partial VAE copy)
            _round(client, body, mode)
        for _ in range(args.repeat):
            for mode in modes:
                runs[mode].append(_round(client, body, mode))
            loads.append(os.getloadavg()[0])
    finals = {base64.b64decode(r["final"]) for rs in runs.values() for r in rs}
    plain = statistics.median(r["e2e"] for r in runs["plain"])
    result = {"size": args.size, "steps": args.steps, "repeat": args.repeat, "threads": args.threads,
              "load_average_1min": [round(x, 2) for x in loads], "identical_finals": len(finals) == 1, "modes": {}}
    print(f"tiny Qwen-Image {args.size}x{args.size}, {args.steps} steps, medians of {args.repeat} interleaved rounds; "
          f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'mode':<24}{'e2e s':>9}{'x plain':>9}{'first partial s':>17}{'x plain e2e':>13}")
    for mode in modes:
        e2e = statistics.median(r["e2e"] for r in runs[mode])
        firsts = [r["first_partial"] for r in runs[mode] if r["first_partial"] is not None]
        first = statistics.median(firsts) if firsts else None
        result["modes"][mode] = {"e2e_s": round(e2e, 4), "e2e_over_plain": round(e2e / plain, 3),
                                 "first_partial_s": None if first is None else round(first, 4),
                                 "first_partial_over_plain_e2e": None if first is None else round(first / plain, 3)}
        label = {"plain": "no stream", "partial0": "stream, partial_images 0", "partial3": "stream, partial_images 3"}
        print(f"{label[mode]:<24}{e2e:>9.3f}{e2e / plain:>9.2f}"
              f"{'-' if first is None else f'{first:.3f}':>17}{'-' if first is None else f'{first / plain:.2f}':>13}")
    print(f"completed images byte-identical across the modes: {result['identical_finals']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_partial_images.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
