"""The NIXL KV hand-over across two hosts made by the test: two network namespaces joined by
a veth pair, UCX pinned to TCP. The producer publishes a context in one, the consumer pulls
it in the other; the bytes arrive equal, the traffic crossed the veth, the producer frees
the buffer on the consumer's notification, and a context nobody pulls expires."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")
from vllm_omni_plugin.kv import netns  # noqa: E402
from vllm_omni_plugin.kv.nixl import nixl_available  # noqa: E402

if nixl_available() is not None:
    pytest.skip(nixl_available(), allow_module_level=True)

TENSORS = textwrap.dedent("""
    import torch
    def tensors(mb):
        g = torch.Generator().manual_seed(0)
        n = mb * 2**20 // 4 // 3
        return {"k.0": torch.randn(n, generator=g), "v.0": torch.randn(n, generator=g).to(torch.bfloat16),
                "positions": torch.arange(n, dtype=torch.int32)}
""")
PRODUCER = TENSORS + textwrap.dedent("""
    import json, sys, time
    from vllm_omni_plugin.kv.nixl import NixlProducer
    mb, lease = int(sys.argv[1]), float(sys.argv[2])
    producer = NixlProducer("ar-host", lease_s=lease)
    print(json.dumps(producer.publish("req-7", tensors(mb), {"prompt_len": 7, "image": [64, 64]})), flush=True)
    while producer.held:
        freed = producer.poll()
        if freed:
            print(json.dumps(freed), flush=True)
        time.sleep(0.01)
""")
CONSUMER = TENSORS + textwrap.dedent("""
    import json, sys, time, torch
    from vllm_omni_plugin.kv.nixl import NixlConsumer
    handle = json.loads(sys.stdin.readline())
    started = time.perf_counter()
    got, meta = NixlConsumer("dit-host").pull(handle)
    seconds = time.perf_counter() - started
    want = tensors(int(sys.argv[1]))
    same = set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    print(json.dumps({"same": same, "meta": meta, "seconds": seconds, "nbytes": handle["nbytes"]}), flush=True)
""")


@pytest.fixture(scope="module")
def hosts():
    """Two hosts made by the test: namespaces joined by a veth pair."""
    if netns.usable() is not None:
        pytest.skip(netns.usable())
    with netns.veth_hosts("omni-kv") as (a, b):
        yield {"a": a, "b": b}


def _in(host: netns.Host, code: str, *args: str, **kw) -> subprocess.Popen:
    # NIXL logs to stdout at INFO: WARN keeps stdout for the handle and the results
    return host.popen([sys.executable, "-c", code, *args], text=True, stdout=subprocess.PIPE,
                      env={**host.env(), "NIXL_LOG_LEVEL": "WARN"}, **kw)


def test_a_context_crosses_the_veth_byte_for_byte_and_is_freed_on_the_ack(hosts):
    mb = 48
    producer = _in(hosts["a"], PRODUCER, str(mb), "120")
    try:
        handle = producer.stdout.readline()
        assert handle.startswith("{"), handle
        sent_before = hosts["a"].tx_bytes()
        consumer = _in(hosts["b"], CONSUMER, str(mb), stdin=subprocess.PIPE)
        out, _ = consumer.communicate(handle, timeout=300)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["same"] and result["meta"] == {"prompt_len": 7, "image": [64, 64]}, result
        assert hosts["a"].tx_bytes() - sent_before >= result["nbytes"]  # over the link, not shared memory
        assert json.loads(producer.stdout.readline()) == {"req-7": "acked"}
        producer.wait(60)
        print(f"\n{result['nbytes'] / 2**20:.0f} MiB across the veth in {result['seconds']:.3f} s")
    finally:
        producer.kill()
        producer.wait()


def test_a_context_nobody_pulls_expires(hosts):
    producer = _in(hosts["a"], PRODUCER, "1", "1.5")
    try:
        assert producer.stdout.readline().startswith("{")
        assert json.loads(producer.stdout.readline()) == {"req-7": "expired"}
        producer.wait(60)
    finally:
        producer.kill()
        producer.wait()


def test_each_request_gets_its_own_context_and_ack(monkeypatch):
    """One consumer pulling several contexts from one producer (loopback, TCP): each handle
    brings the producer's registrations as they were when it was published, so the second
    and later pulls find their buffers; every request acks, keyed by its id."""
    import time

    import torch

    from vllm_omni_plugin.kv.nixl import NixlConsumer, NixlProducer

    monkeypatch.setenv("UCX_TLS", "tcp")
    producer, consumer = NixlProducer("ar-loop", lease_s=60), NixlConsumer("dit-loop")
    sizes = {"r-small": 3, "r-large": 70_000, "r-mid": 1_000}
    handles = {rid: json.loads(json.dumps(producer.publish(rid, {"k": torch.full((n,), float(n))}, {"n": n})))
               for rid, n in sizes.items()}
    for rid in ("r-mid", "r-small", "r-large"):  # not in publishing order
        got, meta = consumer.pull(handles[rid])
        assert meta == {"n": sizes[rid]} and torch.equal(got["k"], torch.full((sizes[rid],), float(sizes[rid])))
    freed: dict[str, str] = {}
    deadline = time.monotonic() + 30
    while len(freed) < 3 and time.monotonic() < deadline:
        freed.update(producer.poll())
        time.sleep(0.02)
    assert freed == {rid: "acked" for rid in sizes} and producer.held == []


def test_the_servers_producer_acks_a_pull_and_a_late_pull_finds_the_lease_expired(monkeypatch, tmp_path):
    """`--omni-stage ar`'s LeasedProducer and `--omni-stage dit`'s pull_transferred (loopback, TCP):
    a pulled context arrives whole and is counted acked; one pulled after its lease is refused
    with LeaseExpired naming the request, and counted expired (the counters the AR server's
    /metrics reads)."""
    import time

    import torch

    from vllm_omni_plugin.kv.nixl import LEASE_STATS, LeasedProducer, LeaseExpired, pull_transferred
    from vllm_omni_plugin.kv.store import TransferredKV

    monkeypatch.setenv("UCX_TLS", "tcp")
    stats = tmp_path / LEASE_STATS
    keys, values = (torch.randn(5, 2, 4), torch.randn(5, 2, 4)), (torch.randn(5, 2, 4), torch.randn(5, 2, 4))
    producer = LeasedProducer("ar-lease", lease_s=30, stats_path=str(stats), period_s=0.01)
    handle = json.loads(json.dumps(producer.publish(TransferredKV("r-1", keys, values, {"latent_position": 7}))))
    got = pull_transferred({"status": "published", "nixl": handle})
    assert got.request_id == "r-1" and got.metadata["latent_position"] == 7
    assert all(torch.equal(a, b) for a, b in zip((*got.keys, *got.values), (*keys, *values)))
    producer.producer.lease_s = 0.2
    late = json.loads(json.dumps(producer.publish(TransferredKV("r-2", keys, values, {}))))
    time.sleep(0.5)
    with pytest.raises(LeaseExpired, match="r-2"):
        pull_transferred({"status": "published", "nixl": late})
    deadline = time.monotonic() + 10
    while json.loads(stats.read_text())["acked"] + json.loads(stats.read_text())["expired"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads(stats.read_text()) == {"published": 2, "held": 0, "acked": 1, "expired": 1}


FAILING_CONSUMER = textwrap.dedent("""
    import json, sys
    from vllm_omni_plugin.kv.nixl import NixlConsumer, NixlTransferError
    try:
        NixlConsumer("dit-host", timeout_s=30).pull(json.loads(sys.stdin.readline()))
        print(json.dumps({"raised": None}), flush=True)
    except NixlTransferError as e:
        print(json.dumps({"raised": str(e)}), flush=True)
""")


def test_a_pull_from_a_producer_that_is_gone_raises_a_transfer_error_naming_it(hosts):
    """The AR host died between its answer and the pull: NIXL cannot reach the producer; the pull
    raises NixlTransferError (the DiT server's 503) naming the request and the producer, not
    nixl's own exception type (which the DiT server would answer with a 500)."""
    producer = _in(hosts["a"], PRODUCER, "1", "120")
    try:
        handle = producer.stdout.readline()
        assert handle.startswith("{"), handle
    finally:
        producer.kill()
        producer.wait()
    consumer = _in(hosts["b"], FAILING_CONSUMER, stdin=subprocess.PIPE)
    out, _ = consumer.communicate(handle, timeout=120)
    raised = json.loads(out.strip().splitlines()[-1])["raised"]
    assert raised is not None and "req-7" in raised and "ar-host" in raised and "failed" in raised, raised
