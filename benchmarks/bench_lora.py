"""What per-request LoRA costs the step batcher (CPU): 8 concurrent requests with no adapter, all with one
adapter, and over 4 different adapters (2 requests each), interleaved per round in one run.

    python benchmarks/bench_lora.py [--repeat 5] [--rank 8] [--size 256] [--steps 4] [--threads 1]
    python benchmarks/bench_lora.py --preset full --device cuda --size 512 --steps 10 --repeat 3   # the GPU run

The DiT is a Qwen-Image transformer wider than the tests' tiny one (4 layers, 8 heads x 64 = 512 wide),
so that its matmuls, not Python, are most of a step, as on a real model; the text encoder and VAE are
the tiny checkpoint's. The adapters target the attention projections of both streams (to_q/k/v/out.0,
add_q/k/v_proj, to_add_out) at --rank. Each round runs the three workloads in turn on one engine
(every step batches all 8 requests: checked); reported: median requests/s per workload and its ratio
to no adapter, and the median time to load (check + read + register) one adapter file.
`--preset full`: Qwen-Image's real sizes built in memory on --device (seeded random weights, bf16 on CUDA),
the adapters at the same targets and rank; nothing else changes.

Prints a table; JSON to $OUT/bench_lora.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
REQUESTS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="bench", choices=("bench", "full"),
                        help="bench: the wider-than-tiny CPU DiT above; full: Qwen-Image's real sizes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from diffusers import DiffusionPipeline, QwenImageTransformer2DModel

    from vllm_omni_plugin.checkpoints import make_checkpoint
    from vllm_omni_plugin.checkpoints.lora import make_lora
    from vllm_omni_plugin.diffusion import DiffusionEngine, EngineConfig, SamplingParams
    from vllm_omni_plugin.diffusion.lora import LoraPolicy
    from vllm_omni_plugin.diffusion.pipelines import wrap

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    if args.preset == "full":
        from vllm_omni_plugin.families.qwen_image.checkpoint import build_in_memory

        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        pipe = build_in_memory("qwen-image", "full", seed=0, dtype=dtype, device=args.device)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = DiffusionPipeline.from_pretrained(make_checkpoint("qwen-image", "tiny", tmp / "ckpt"),
                                                 torch_dtype=torch.float32)
        torch.manual_seed(0)
        pipe.transformer = QwenImageTransformer2DModel(num_layers=4, num_attention_heads=8, attention_head_dim=64,
                                                       joint_attention_dim=128, axes_dims_rope=(8, 28, 28)).eval()
    ours = wrap(pipe, model_id="bench-lora")
    paths = [make_lora(pipe, tmp / f"lora{i}", rank=args.rank, targets=TARGETS, seed=i) for i in range(4)]
    loras = ours.enable_lora(LoraPolicy(allowed_dirs=(str(tmp),), max_loras=5))
    for i, p in enumerate(paths):
        loras.register(f"l{i}", str(p))
    engine = DiffusionEngine(ours, EngineConfig(max_running=REQUESTS))

    workloads = {
        "no adapter": [None] * REQUESTS,
        "one adapter": [(("l0", 1.0),)] * REQUESTS,
        "4 adapters": [((f"l{i % 4}", 1.0),) for i in range(REQUESTS)],
    }

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(lora: list) -> float:
        for i, lo in enumerate(lora):
            engine.add_request(f"r{i}", SamplingParams(prompt=f"prompt {i}", height=args.size, width=args.size,
                                                       num_inference_steps=args.steps, seed=i, lora=lo))
        engine.stats.batch_sizes.clear()
        sync()
        started = time.perf_counter()
        final = engine.run()
        sync()
        elapsed = time.perf_counter() - started
        assert all(e.kind == "finished" for e in final.values()), final
        assert engine.stats.batch_sizes == [REQUESTS] * args.steps, engine.stats.batch_sizes
        return REQUESTS / elapsed

    run(workloads["no adapter"])  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in workloads}
    load_s: list[float] = []
    for _ in range(args.repeat):
        for name, lora in workloads.items():
            rates[name].append(run(lora))
        started = time.perf_counter()
        loras.register("fresh", str(paths[1]))
        load_s.append(time.perf_counter() - started)
        loras.unregister("fresh")

    base = statistics.median(rates["no adapter"])
    result = {
        "command": "python benchmarks/bench_lora.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "requests_per_s": {k: round(statistics.median(v), 3) for k, v in rates.items()},
        "ratio_to_no_adapter": {k: round(statistics.median(v) / base, 3) for k, v in rates.items()},
        "adapter_load_ms_median": round(statistics.median(load_s) * 1000, 1),
        "adapter_file_bytes": paths[1].stat().st_size,
    }
    print(f"{'workload':<14} {'req/s':>8} {'ratio':>7}")
    for k in workloads:
        print(f"{k:<14} {result['requests_per_s'][k]:>8.3f} {result['ratio_to_no_adapter'][k]:>7.3f}")
    print(f"adapter load (check + read + register, {result['adapter_file_bytes']} B): "
          f"{result['adapter_load_ms_median']} ms median; load average {result['loadavg_1_5_15']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_lora.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
