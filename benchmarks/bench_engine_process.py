"""What the engine-core process costs (CPU): the diffusion engine on a thread of the server (the path
before engine/) vs in its own process behind EngineCoreClient, side by side in one run.

    python benchmarks/bench_engine_process.py [--repeat 7] [--requests 2000] [--events 200] [--threads 1]

1. e2e, tiny Qwen-Image (64x64, 2 steps, the server tests' stage defaults), interleaved per round:
   offline `Omni` (in-process, its default), offline `Omni(engine_process=True)`, and the served path
   (the real diffusion-only app -- vLLM's middleware, the omni routes, the openai client over httpx's
   ASGI transport, so no socket noise) with the engine on a thread (old) and in its process (new).
   Reports medians and the served-over-offline overhead of old and new.
2. No-op pipeline (benchmarks/noop_pipeline.py: the engine's own costs, no model): the round trip one
   request adds (submit -> result, 1 step; and `resolve`, the RPC every served request makes), the
   cost per progress event (a 1+N-step request minus a 1-step one, over N), and the requests/s the
   client sustains (a burst of --requests one-step requests awaited together), thread vs process.

Prints a table; JSON to $OUT/bench_engine_process.json when OUT is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGE_DEFAULTS = {"num_inference_steps": 2, "height": 64, "width": 64}


async def _served_runtime(model: str, engine_process: bool):
    import httpx
    import openai

    from vllm_omni_plugin.server.app import OmniRuntime
    from vllm_omni_plugin.server.config import OmniServerConfig
    from vllm_omni_plugin.server.flags import parse_args
    from vllm_omni_plugin.server.launch import build_app

    args = parse_args([model, "--default-sampling-params", json.dumps(STAGE_DEFAULTS)])
    runtime = await asyncio.to_thread(OmniRuntime.load, OmniServerConfig.from_args(args), engine_process=engine_process)
    app = build_app(args, runtime)
    for plugin in app.state.endpoint_plugins:
        await plugin.init_state(None, app.state, args)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://omni", timeout=600)
    client = openai.AsyncOpenAI(base_url="http://omni/v1", api_key="unused", http_client=http, max_retries=0)
    return runtime, http, client


def e2e(repeat: int) -> dict:
    import numpy as np

    from vllm_omni_plugin.checkpoints import make_checkpoint
    from vllm_omni_plugin.diffusion.params import SamplingParams
    from vllm_omni_plugin.omni import Omni

    model = str(make_checkpoint("qwen-image", "tiny", Path(tempfile.mkdtemp(prefix="bench-engine-")), seed=0))
    offline = {"offline (in-process)": Omni(model, stage_defaults=STAGE_DEFAULTS),
               "offline (engine process)": Omni(model, stage_defaults=STAGE_DEFAULTS, engine_process=True)}
    loop = asyncio.new_event_loop()
    served = {name: loop.run_until_complete(_served_runtime(model, flag))
              for name, flag in (("served, engine thread (old)", False), ("served, engine process (new)", True))}
    times: dict[str, list[float]] = {name: [] for name in [*offline, *served]}
    pixels: dict[str, bytes] = {}

    def offline_one(omni) -> bytes:
        (out,) = omni.generate("a red cat on a blue chair", SamplingParams(seed=0))
        return np.asarray(out.images[0].convert("RGB")).tobytes()

    async def served_one(client) -> bytes:
        import base64
        import io

        from PIL import Image

        r = await client.images.generate(prompt="a red cat on a blue chair", extra_body={"seed": 0})
        img = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB")
        return np.asarray(img).tobytes()

    for round_no in range(repeat + 1):  # round 0 warms every path up
        for name in times:
            started = time.perf_counter()
            if name in offline:
                got = offline_one(offline[name])
            else:
                got = loop.run_until_complete(served_one(served[name][2]))
            if round_no:
                times[name].append(time.perf_counter() - started)
            pixels.setdefault(name, got)
    for omni in offline.values():
        omni.shutdown()
    for runtime, http, _ in served.values():
        loop.run_until_complete(http.aclose())
        loop.run_until_complete(runtime.stop())
    loop.close()
    med = {name: statistics.median(t) for name, t in times.items()}
    base = med["offline (in-process)"]
    return {
        "median_s": med,
        "overhead_old_pct": 100 * (med["served, engine thread (old)"] / base - 1),
        "overhead_new_pct": 100 * (med["served, engine process (new)"] / base - 1),
        "offline_process_vs_inprocess_pct": 100 * (med["offline (engine process)"] / base - 1),
        "identical_pixels": len(set(pixels.values())) == 1,
    }


async def _client_costs(client, resolve, requests: int, events: int, rounds: int = 200) -> dict:
    from vllm_omni_plugin.diffusion.params import SamplingParams

    one, many = resolve(SamplingParams(num_inference_steps=1)), resolve(SamplingParams(num_inference_steps=1 + events))

    async def run(params) -> float:
        started = time.perf_counter()
        await client.result(client.submit(params))
        return time.perf_counter() - started

    for _ in range(20):
        await run(one)
    single = statistics.median([await run(one) for _ in range(rounds)])
    long = statistics.median([await run(many) for _ in range(max(rounds // 10, 5))])
    started = time.perf_counter()
    for _ in range(rounds):
        await asyncio.to_thread(resolve, SamplingParams(num_inference_steps=1))
    resolve_s = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    await asyncio.gather(*(client.result(client.submit(one)) for _ in range(requests)))
    burst = time.perf_counter() - started
    return {"request_rtt_ms": 1e3 * single, "per_event_ms": 1e3 * (long - single) / events,
            "resolve_ms": 1e3 * resolve_s, "requests_per_s": requests / burst}


def client_costs(requests: int, events: int) -> dict:
    sys.path.insert(0, str(HERE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    from noop_pipeline import NoopBuilder

    from vllm_omni_plugin.diffusion.engine import EngineConfig
    from vllm_omni_plugin.engine.client import EngineCoreClient
    from vllm_omni_plugin.engine.spec import EngineSpec
    from vllm_omni_plugin.orchestrator.engine_loop import EngineLoop

    spec = EngineSpec(NoopBuilder(), device="cpu", engine_config=EngineConfig(max_running=64))
    out = {}

    async def thread() -> dict:
        engine = spec.launch()
        loop = EngineLoop(engine, max_queue=requests)
        loop.start()
        try:
            return await _client_costs(loop, lambda r: engine.pipeline.resolve(r, None), requests, events)
        finally:
            await asyncio.to_thread(loop.stop)

    async def process() -> dict:
        client = EngineCoreClient(spec, max_queue=requests)
        await asyncio.to_thread(client.start)
        try:
            return await _client_costs(client, client.resolve, requests, events)
        finally:
            await asyncio.to_thread(client.stop)

    out["engine thread (old)"] = asyncio.run(thread())
    out["engine process (new)"] = asyncio.run(process())
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7, help="timed rounds of the e2e comparison")
    ap.add_argument("--requests", type=int, default=2000, help="no-op requests in the throughput burst")
    ap.add_argument("--events", type=int, default=200, help="extra steps of the per-event measurement")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads of every path (the engine process takes the caller's); 1 keeps a "
                         "shared 2-core box out of OpenMP oversubscription, which otherwise swamps the figures")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = {"client": client_costs(args.requests, args.events)}
    if not args.skip_e2e:
        result["e2e"] = e2e(args.repeat)

    print("\n| no-op pipeline | request round trip (ms) | per progress event (ms) | resolve (ms) | requests/s |")
    print("|---|---|---|---|---|")
    for name, r in result["client"].items():
        print(f"| {name} | {r['request_rtt_ms']:.3f} | {r['per_event_ms']:.4f} | {r['resolve_ms']:.3f} | "
              f"{r['requests_per_s']:.0f} |")
    if "e2e" in result:
        e = result["e2e"]
        print("\n| tiny Qwen-Image 64x64, 2 steps | median e2e (s) |")
        print("|---|---|")
        for name, s in e["median_s"].items():
            print(f"| {name} | {s:.4f} |")
        print(f"\nserved over offline: old {e['overhead_old_pct']:+.2f}%, new {e['overhead_new_pct']:+.2f}% "
              f"(difference {e['overhead_new_pct'] - e['overhead_old_pct']:+.2f} points); offline engine process "
              f"vs in-process {e['offline_process_vs_inprocess_pct']:+.2f}%; identical pixels: {e['identical_pixels']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_engine_process.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
