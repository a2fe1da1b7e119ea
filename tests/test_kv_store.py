"""The KV transfer store on its own (no vLLM): transports, round trip, the producer's timing."""

from __future__ import annotations

import time

import pytest
import torch

from vllm_omni_plugin.engine import codec
from vllm_omni_plugin.kv.store import KVHandle, KVTransferStore, TransferredKV, peek_file, peek_transferred, take_file


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


def test_a_peeked_transfer_stays_in_the_store_until_its_handle_is_taken(tmp_path):
    """What crosses to the DiT stage's process: the handle (header facts), never the tensors."""
    store = KVTransferStore(tmp_path)
    item = _item("req-a", latent_position=5, num_tokens=7)
    path = store.put(item)
    report = {"omni_kv": {"status": "saved", "path": str(path), "request_id": "req-a"}}
    handle = peek_transferred(report)
    assert isinstance(handle, KVHandle) and path.exists()
    assert (handle.num_layers, handle.num_tokens, handle.nbytes) == (3, 7, 2 * 3 * 7 * 2 * 64 * 4)
    assert handle.metadata["latent_position"] == 5
    frames = codec.encode(handle)
    assert len(frames) == 1 and len(frames[0]) < 1000  # a few hundred bytes, whatever the context's size
    got = codec.decode(frames).take()
    assert not path.exists() and all(torch.equal(a, b) for a, b in zip(got.keys + got.values, item.keys + item.values))
    handle.discard()  # a no-op once taken
    with pytest.raises(KeyError, match="holds request 'req-b', not 'req-a'"):
        peek_file(store.put(_item("req-b")), "req-a")
    pulled = {"omni_kv": {"status": "pulled", "transferred": item}}  # from another host: in memory already
    assert peek_transferred(pulled) is item


def test_transport_choices_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown KV transport 'shm'"):
        KVTransferStore(tmp_path, "shm")
    with pytest.raises(ValueError, match="cuda_ipc needs CUDA tensors"):
        KVTransferStore(tmp_path, "cuda_ipc").put(_item("req-a"))
    assert not KVTransferStore(tmp_path).uses_ipc(_item("req-a"))  # auto on CPU tensors: files
