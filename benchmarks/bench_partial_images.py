"""What streaming partial images costs: `stream: true` with `partial_images` 3 vs 0 vs no stream, served.

    python benchmarks/bench_partial_images.py [--size 256] [--steps 20] [--repeat 5] [--threads 1] [--preset bench]
    python benchmarks/bench_partial_images.py --engine --size 256 --steps 20 --repeat 3
    python benchmarks/bench_partial_images.py --engine --preset full --device cuda --size 1024 --steps 50

The DiT (unless --preset full) is a Qwen-Image transformer wider than the tests' tiny one (4 layers,
8 heads x 64 = 512 wide, as in bench_lora.py), so that the denoising dominates a request as on a real
model; the text encoder and VAE are the tiny checkpoint's. Even so the tiny VAE's decode is several DiT
steps on a CPU (torch's CPU conv3d is an im2col fallback, `aten::slow_conv3d_forward`, ~75% of a
decode), where on the real model on a GPU it is about one step: the ratios here are pessimistic.
Partial images are half-resolution previews (`partial_downscale` 2, the Qwen-Image default); `--engine`
also runs them at full resolution (`partial_downscale` 1) in the same rounds, side by side.

A real `vllm serve <that checkpoint> --omni` (spawn_server: a socket, so events arrive as the server
sends them) and the real openai client. Per round, interleaved: the same request (seed, size, steps)
without `stream`, with `stream: true, partial_images: 0`, and with `partial_images: 3`. Reports the
medians of the end-to-end time (request sent -> completed image read), the time to the first partial
image event, the ratios to the unstreamed request, and the load average (the box may be shared: the
ratios are what to read). The completed images of the three modes must be byte-identical.

`--engine`: the DiffusionEngine alone, in this process, on --device with the --preset checkpoint
built in memory (`full`: Qwen-Image's real sizes, seeded random weights: real compute, no download).
Per round, interleaved: one request with 0 and with 3 partial images (e2e, time to the first partial
event), then two requests admitted together, A with 3 partial images and B with none, against the same
pair both with none: B's e2e says whether a request waits for another's partial decodes.

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


def _engine_run(engine, requests: list[tuple[str, int]], size: int, steps: int) -> dict[str, dict]:
    """Run requests (id, partial_images) admitted together; per id: e2e and first partial (s)."""
    from vllm_omni_plugin.diffusion import SamplingParams

    for rid, k in requests:
        engine.add_request(rid, SamplingParams(prompt="a lighthouse at dusk", height=size, width=size,
                                               num_inference_steps=steps, seed=0, partial_images=k))
    started, out = time.perf_counter(), {rid: {"first_partial": None, "partials": 0} for rid, _ in requests}

    def on_event(event) -> None:
        now = time.perf_counter() - started
        if event.kind == "partial":
            out[event.request_id]["partials"] += 1
            out[event.request_id]["first_partial"] = out[event.request_id]["first_partial"] or now
        elif event.kind == "finished":
            out[event.request_id]["e2e"] = now
            out[event.request_id]["image"] = event.output.images[0].tobytes()
        elif event.kind != "step":
            raise RuntimeError(f"{event.request_id}: {event.kind} {event.error}")

    engine.run(on_event)
    return out


def _bench_checkpoint(work: Path, preset: str) -> Path:
    """The tiny Qwen-Image checkpoint on disk; preset "bench": its transformer replaced by the wider one."""
    from vllm_omni_plugin.checkpoints import make_checkpoint

    path = make_checkpoint("qwen-image", "tiny", work / "qwen-image", seed=0)
    if preset == "bench":
        import torch
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(0)
        QwenImageTransformer2DModel(num_layers=4, num_attention_heads=8, attention_head_dim=64, joint_attention_dim=128,
                                    axes_dims_rope=(8, 28, 28)).save_pretrained(Path(path) / "transformer")
    return Path(path)


def engine_main(args: argparse.Namespace) -> None:
    import torch

    from vllm_omni_plugin.diffusion import DiffusionEngine
    from vllm_omni_plugin.families.qwen_image.checkpoint import build_in_memory
    from vllm_omni_plugin.families.qwen_image.pipeline import QwenImageStepwise

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if args.preset == "full":
        pipe = build_in_memory("qwen-image", args.preset, seed=0, dtype=dtype, device=device)
    else:
        from diffusers import DiffusionPipeline

        path = _bench_checkpoint(Path(tempfile.mkdtemp(prefix="bench-partial-")), args.preset)
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    ours = QwenImageStepwise(pipe, model_id=f"qwen-image-{args.preset}")
    engine = DiffusionEngine(ours)
    print(f"built {args.preset} on {device} in {time.perf_counter() - t:.0f} s")
    size, steps = args.size, args.steps
    _engine_run(engine, [("warm0", 0)], size, steps)
    _engine_run(engine, [("warm3", 3)], size, steps)
    rows: dict[str, list[float]] = {k: [] for k in ("k0", "k3", "k3_first", "k3_full", "k3_full_first",
                                                     "pair_B_alone", "pair_B_with_A3", "pair_A3", "pair_A3_first")}
    images = set()
    for r in range(args.repeat):
        one0 = _engine_run(engine, [(f"a{r}", 0)], size, steps)[f"a{r}"]
        one3 = _engine_run(engine, [(f"b{r}", 3)], size, steps)[f"b{r}"]
        ours.partial_downscale = 1
        full3 = _engine_run(engine, [(f"c{r}", 3)], size, steps)[f"c{r}"]
        ours.partial_downscale = QwenImageStepwise.partial_downscale
        assert one3["partials"] == full3["partials"] == 3
        images |= {one0["image"], one3["image"], full3["image"]}
        rows["k0"].append(one0["e2e"])
        rows["k3"].append(one3["e2e"])
        rows["k3_first"].append(one3["first_partial"])
        rows["k3_full"].append(full3["e2e"])
        rows["k3_full_first"].append(full3["first_partial"])
        plain = _engine_run(engine, [(f"pa{r}", 0), (f"pb{r}", 0)], size, steps)
        mixed = _engine_run(engine, [(f"ma{r}", 3), (f"mb{r}", 0)], size, steps)
        rows["pair_B_alone"].append(plain[f"pb{r}"]["e2e"])
        rows["pair_B_with_A3"].append(mixed[f"mb{r}"]["e2e"])
        rows["pair_A3"].append(mixed[f"ma{r}"]["e2e"])
        rows["pair_A3_first"].append(mixed[f"ma{r}"]["first_partial"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"Qwen-Image preset {args.preset} on {name}, {size}x{size}, {steps} steps, medians of {args.repeat} "
          f"interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    print(f"one request: e2e 0 partial {med['k0']:.3f} s, 3 partial previews {med['k3']:.3f} s "
          f"(x{med['k3'] / med['k0']:.3f}); first partial at {med['k3_first']:.3f} s ({med['k3_first'] / med['k0']:.2f} of e2e)")
    print(f"             3 partial at full resolution {med['k3_full']:.3f} s (x{med['k3_full'] / med['k0']:.3f}); "
          f"first partial at {med['k3_full_first']:.3f} s")
    print(f"two requests batched: B (no partials) e2e {med['pair_B_alone']:.3f} s beside A with none, "
          f"{med['pair_B_with_A3']:.3f} s beside A with 3 (x{med['pair_B_with_A3'] / med['pair_B_alone']:.3f}); "
          f"A with 3: e2e {med['pair_A3']:.3f} s, first partial {med['pair_A3_first']:.3f} s")
    print(f"final images of the 0- and 3-partial requests identical: {len(images) == 1}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_partial_images_engine.json").write_text(json.dumps(
            {"device": name, "preset": args.preset, "size": size, "steps": steps, "repeat": args.repeat,
             "medians_s": {k: round(v, 4) for k, v in med.items()}, "rows_s": rows,
             "identical_finals": len(images) == 1}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--engine", action="store_true", help="the engine alone, in this process (see above)")
    parser.add_argument("--preset", default="bench", choices=("bench", "tiny", "full"),
                        help="bench: the wider DiT above; tiny: the tests' checkpoint; full (--engine only): real sizes")
    parser.add_argument("--device", default="cpu", help="--engine: cpu or cuda")
    args = parser.parse_args()
    if args.engine:
        return engine_main(args)
    if args.preset == "full":
        parser.error("--preset full needs --engine (it is built in memory)")

    from vllm_omni_plugin.server.spawn import spawn_server

    work = Path(tempfile.mkdtemp(prefix="bench-partial-"))
    model = _bench_checkpoint(work, args.preset)
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
    print(f"Qwen-Image ({args.preset}) {args.size}x{args.size}, {args.steps} steps, medians of {args.repeat} interleaved rounds; "
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
