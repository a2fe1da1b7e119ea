"""float32 vs bfloat16 on this CPU: the measurement behind the CPU default dtype (orchestrator/stage_dtype.py).

    python benchmarks/bench_cpu_dtype.py [--size 1024] [--repeat 20]

Times the two operations a DiT / AR step is made of on CPU, a GEMM (torch.matmul,
oneDNN/MKL) and attention (scaled_dot_product_attention), in each dtype, and prints
the CPU features that decide the answer: AMX tiles and AVX512-BF16 run bfloat16
natively (faster than float32); AVX2-only CPUs convert it in software (slower).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _time(fn, repeat: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}; amx_tile {torch.cpu._is_amx_tile_supported()}; "
          f"avx512 {torch.cpu._is_avx512_supported()}; avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}")
    n = args.size
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        q = k = v = torch.randn(1, 8, n, 64).to(dtype)
        gemm = _time(lambda: a @ b, args.repeat)
        attn = _time(lambda: F.scaled_dot_product_attention(q, k, v), args.repeat)
        print(f"{str(dtype):16s} gemm {n}x{n}x{n}: {gemm * 1e3:8.2f} ms ({2 * n ** 3 / gemm / 1e9:6.1f} GFLOP/s)   "
              f"sdpa 8 heads x {n} tokens x 64: {attn * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
