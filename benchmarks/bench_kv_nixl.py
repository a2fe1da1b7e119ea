"""KV hand-over over NIXL across two hosts vs the same link's raw TCP, in one run.

    sudo python benchmarks/bench_kv_nixl.py [--sizes-mb 8 64 256] [--repeat 3]

The hosts are two network namespaces joined by a veth pair (`vllm_omni_plugin/kv/netns.py`;
root), UCX pinned to TCP on the veth. For each size: raw TCP -- one socket, the receiver
times accept-to-last-byte -- and NIXL -- the consumer's `NixlConsumer.pull` of a context of
that size (registration, one READ, the notification), timed in the consumer; one consumer
pulls --repeat + 1 contexts from one producer: the first pull also connects (reported on
its own), the best of the others is the steady state. Reports MB/s, and NIXL as % of raw
TCP (target >= 50% for contexts >= 50 MB). UCX settings come from the environment (e.g.
UCX_TCP_TX_SEG_SIZE / UCX_TCP_RX_SEG_SIZE, UCX_TCP_SNDBUF / UCX_TCP_RCVBUF). Table last; JSON to $OUT/bench_kv_nixl.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

RECEIVER = textwrap.dedent("""
    import socket, sys, time
    n, port = int(sys.argv[1]), int(sys.argv[2])
    srv = socket.create_server(("0.0.0.0", port)); print("ready", flush=True)
    conn, _ = srv.accept(); started = time.perf_counter(); buf = bytearray(1 << 22); view = memoryview(buf); got = 0
    while got < n:
        k = conn.recv_into(view)
        if not k: break
        got += k
    print(time.perf_counter() - started, got, flush=True)
""")
SENDER = textwrap.dedent("""
    import socket, sys
    n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    data = memoryview(bytes(n)); s = socket.create_connection((host, port)); s.sendall(data); s.close()
""")
PRODUCER = textwrap.dedent("""
    import json, sys, time, torch
    from vllm_omni_plugin.kv.nixl import NixlProducer
    n, count = int(sys.argv[1]), int(sys.argv[2]); producer = NixlProducer("bench-ar", lease_s=600)
    for i in range(count):
        print(json.dumps(producer.publish(f"bench-{i}", {"kv": torch.ones(n, dtype=torch.uint8)}, {})), flush=True)
    while producer.held:
        producer.poll(); time.sleep(0.005)
""")
CONSUMER = textwrap.dedent("""
    import json, sys, time
    from vllm_omni_plugin.kv.nixl import NixlConsumer
    consumer = NixlConsumer("bench-dit", timeout_s=600)
    for line in sys.stdin:
        handle = json.loads(line)
        started = time.perf_counter(); got, _ = consumer.pull(handle); seconds = time.perf_counter() - started
        assert int(got["kv"].sum()) == handle["nbytes"]
        print(seconds, flush=True)
""")


def raw_tcp(a, b, n: int, port: int) -> float:
    receiver = b.popen([sys.executable, "-c", RECEIVER, str(n), str(port)], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "ready"
    a.popen([sys.executable, "-c", SENDER, str(n), b.address, str(port)]).wait(600)
    seconds, got = receiver.stdout.readline().split()
    receiver.wait(60)
    assert int(got) == n
    return float(seconds)


def nixl(a, b, n: int, count: int) -> list[float]:
    """Seconds of each of `count` pulls by one consumer from one producer (the first one
    also makes the UCX connection; the others reuse it, as a DiT server pulling from the
    same AR server does)."""
    env = {"NIXL_LOG_LEVEL": "WARN"}  # NIXL logs to stdout at INFO
    producer = a.popen([sys.executable, "-c", PRODUCER, str(n), str(count)], stdout=subprocess.PIPE, text=True,
                       env={**a.env(), **env})
    try:
        handles = "".join(producer.stdout.readline() for _ in range(count))
        consumer = b.popen([sys.executable, "-c", CONSUMER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env={**b.env(), **env})
        out, _ = consumer.communicate(handles, timeout=900)
        return [float(x) for x in out.split()]
    finally:
        producer.kill()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from vllm_omni_plugin.kv import netns
    from vllm_omni_plugin.kv.nixl import nixl_available

    for problem in (netns.usable(), nixl_available()):
        if problem:
            raise SystemExit(problem)
    rows = []
    with netns.veth_hosts("omni-bench") as (a, b):
        for mb in args.sizes_mb:
            n = mb * 2**20
            tcp = min(raw_tcp(a, b, n, 47000 + i) for i in range(args.repeat))
            pulls = nixl(a, b, n, args.repeat + 1)
            cold, warm = pulls[0], min(pulls[1:])
            rows.append({"size_mb": mb, "tcp_s": round(tcp, 4), "nixl_first_s": round(cold, 4),
                         "nixl_s": round(warm, 4), "tcp_mb_s": round(mb / tcp, 1), "nixl_first_mb_s": round(mb / cold, 1),
                         "nixl_mb_s": round(mb / warm, 1), "nixl_pct_of_tcp": round(100 * tcp / warm, 1)})
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_kv_nixl.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    print("\n| context MB | raw TCP MB/s | NIXL first pull MB/s | NIXL MB/s | NIXL % of TCP |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_mb']} | {r['tcp_mb_s']} | {r['nixl_first_mb_s']} | {r['nixl_mb_s']} | {r['nixl_pct_of_tcp']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
