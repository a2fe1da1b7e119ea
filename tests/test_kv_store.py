"""The KV transfer store on its own (no vLLM): transports, round trip, the producer's timing."""

from __future__ import annotations

import time

import pytest
import torch

from vllm_omni_plugin.kv.store import KVTransferStore, TransferredKV, take_file


def _item(rid: str, device: str = "cpu", **metadata) -> TransferredKV:
    g = torch.Generator().manual_seed(0)
    keys = tuple(torch.randn(7, 2, 64, generator=g).to(device) for _ in range(3))
    values = tuple(torch.randn(7, 2, 64, generator=g).to(device) for _ in range(3))
    return TransferredKV(rid, keys, values, dict(metadata))


def test_file_transport_round_trip_frees_the_file_and_times_the_producer(tmp_path):
    store = KVTransferStore(tmp_path)
    item = _item("req-a", latent_position=5, save_started_unix=time.time())
    path = store.put(item)
    assert "req-a" in store and len(store) == 1
    got = take_file(path, "req-a")
    assert not path.exists() and len(store) == 0
    assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, item.keys + item.values))
    assert got.metadata["latent_position"] == 5
    assert 0.0 <= got.metadata["save_seconds"] < 60
    assert store.release_consumed() == 0  # nothing shared on the file transport


def test_a_file_is_taken_by_its_own_request_only(tmp_path):
    store = KVTransferStore(tmp_path)
    path = store.put(_item("req-a"))
    with pytest.raises(KeyError, match="holds request 'req-a', not 'req-b'"):
        take_file(path, "req-b")


def test_transport_choices_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown KV transport 'shm'"):
        KVTransferStore(tmp_path, "shm")
    with pytest.raises(ValueError, match="cuda_ipc needs CUDA tensors"):
        KVTransferStore(tmp_path, "cuda_ipc").put(_item("req-a"))
    assert not KVTransferStore(tmp_path).uses_ipc(_item("req-a"))  # auto on CPU tensors: files
