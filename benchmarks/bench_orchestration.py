"""Per-request orchestration overhead and stage-to-stage transfer bandwidth of multi-stage BAGEL.

Runs on the CPU build of vLLM with the tiny BAGEL checkpoint (vLLM has no GPU build on the
benchmark box). For N text2img requests, one at a time, the orchestrator records where the wall
time went (StageTimings): AR prefill on vLLM (submit -> final output), KV transfer (read + free of
the shared-memory file), diffusion (queue -> decoded image), and the rest, which is the
orchestrator's own overhead. Side by side in the same run: the same requests through the DiT
stage alone, prefilling its context in-process (no vLLM, no transfer).

    .venv/bin/python benchmarks/bench_orchestration.py [--requests 10] [--steps 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    from vllm_omni_plugin import Omni
    from vllm_omni_plugin.checkpoints import make_checkpoint
    from vllm_omni_plugin.diffusion.engine import DiffusionEngine
    from vllm_omni_plugin.diffusion.params import SamplingParams
    from vllm_omni_plugin.families.bagel.pipeline import load_bagel_pipeline
    from vllm_omni_plugin.families.bagel.orchestrator import StageTimings

    path = make_checkpoint("bagel", "tiny", tempfile.mkdtemp(prefix="bench-bagel-"))
    omni = Omni(str(path), dtype="float32", device="cpu",
                ar_engine_args={"dtype": "float32", "max_model_len": 512, "enforce_eager": True})
    stages = omni._stages
    standalone = DiffusionEngine(load_bagel_pipeline(str(path), dtype="float32", device="cpu"))
    prompt = "a red cat sitting on a blue chair in the sun, " * 4

    def params(i: int) -> SamplingParams:
        return SamplingParams(prompt=prompt, height=32, width=32, num_inference_steps=args.steps, seed=i)

    stages_runs: list[StageTimings] = []
    alone: list[float] = []
    for i in range(args.requests + 1):  # the first of each is a warm-up
        t = StageTimings()
        omni._background.run(stages.generate_image(params(i), timings=t))
        started = time.perf_counter()
        standalone.add_request(f"alone-{i}", params(i))
        standalone.run()
        if i:
            stages_runs.append(t)
            alone.append(time.perf_counter() - started)
    omni.shutdown()

    med = lambda xs: statistics.median(xs)  # noqa: E731
    total = med([t.total for t in stages_runs])
    ar = med([t.ar_prefill for t in stages_runs])
    transfer = med([t.transfer for t in stages_runs])
    dit = med([t.diffusion for t in stages_runs])
    overhead = med([t.total - t.ar_prefill - t.transfer - t.diffusion for t in stages_runs])
    nbytes = stages_runs[0].transferred_bytes
    rows = [
        ("requests (sequential, medians)", f"{args.requests}"),
        ("multi-stage total per request", f"{total * 1e3:.1f} ms"),
        ("  AR prefill on vLLM (submit -> output)", f"{ar * 1e3:.1f} ms"),
        ("  KV transfer read + free", f"{transfer * 1e3:.2f} ms for {nbytes / 1024:.0f} KiB"),
        ("  diffusion stage", f"{dit * 1e3:.1f} ms"),
        ("  orchestrator overhead (the rest)", f"{overhead * 1e3:.2f} ms"),
        ("transfer bandwidth (read + free)", f"{nbytes / transfer / 1e9:.2f} GB/s"),
        ("DiT stage alone, in-process prefill", f"{med(alone) * 1e3:.1f} ms"),
        ("multi-stage / alone", f"{total / med(alone):.2f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
