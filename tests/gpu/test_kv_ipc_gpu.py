"""The KV store's cuda_ipc transport between two processes on one GPU (what the AR engine's worker
and the DiT stage do): the consumer gets the producer's tensors exactly, on the GPU, and the
producer frees its buffer once the file is taken."""

from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu


def _producer(root: str, ready, done) -> None:
    from vllm_omni_plugin.kv.store import KVTransferStore, TransferredKV

    store = KVTransferStore(root)
    g = torch.Generator(device="cuda").manual_seed(0)
    keys = tuple(torch.randn(4096, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(28))
    values = tuple(torch.randn(4096, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(28))
    store.put(TransferredKV("req-ipc", keys, values, {"save_started_unix": time.time()}))
    ready.put([float(k.float().sum()) for k in keys])
    done.get(timeout=120)  # the consumer has taken it
    ready.put(store.release_consumed())


def test_cuda_ipc_hand_over_between_processes(tmp_path):
    from vllm_omni_plugin.kv.store import KVTransferStore, take_file

    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_producer, args=(str(tmp_path), ready, done))
    proc.start()
    try:
        sums = ready.get(timeout=120)
        path = KVTransferStore(tmp_path).path("req-ipc")
        started = time.perf_counter()
        got = take_file(path, "req-ipc")
        seconds = time.perf_counter() - started
        assert got.keys[0].is_cuda and len(got.keys) == 28 and got.keys[0].shape == (4096, 4, 128)
        assert [float(k.float().sum()) for k in got.keys] == sums
        assert not path.exists()
        done.put(True)
        assert ready.get(timeout=60) == 0  # the producer let its buffer go
        nbytes = 2 * 28 * 4096 * 4 * 128 * 2
        print(f"\n[gpu-report] cuda_ipc take: {nbytes / 1e6:.0f} MB in {seconds * 1e3:.2f} ms "
              f"({nbytes / seconds / 1e9:.1f} GB/s); producer save {got.metadata['save_seconds'] * 1e3:.1f} ms")
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
