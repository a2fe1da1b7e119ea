"""Two hosts on one machine, for tests and benchmarks of the cross-host KV hand-over: two
network namespaces joined by a veth pair (needs root and iproute2).

    with veth_hosts("omni-kv") as (a, b):
        proc = a.popen([sys.executable, "-c", code])   # runs inside namespace a
        a.address                                       # "10.213.7.1", reachable from b

Processes started through `Host.popen` get `UCX_TLS=tcp` and `UCX_NET_DEVICES=<its veth>`:
without them UCX sees two namespaces of one machine as one node and moves data through
shared memory, and the test would not test the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


def usable() -> str | None:
    """None where namespaces can be made here, else why not (for a skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Host:
    namespace: str | None  # None: this machine's own namespace (`veth_host`'s local end)
    device: str
    address: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "UCX_TLS": "tcp", "UCX_NET_DEVICES": self.device}

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Start `cmd` inside this host's namespace (UCX pinned to TCP on its veth)."""
        kw.setdefault("env", self.env())
        return subprocess.Popen([*self._exec(), *cmd], **kw)

    def _exec(self) -> list[str]:
        return [] if self.namespace is None else ["ip", "netns", "exec", self.namespace]

    def tx_bytes(self) -> int:
        """Bytes this host has sent on its veth."""
        out = subprocess.run([*self._exec(), "cat", f"/sys/class/net/{self.device}/statistics/tx_bytes"],
                             capture_output=True, text=True, check=True, timeout=30)
        return int(out.stdout)


@contextmanager
def veth_hosts(prefix: str = "omni") -> Iterator[tuple[Host, Host]]:
    """Make namespaces `<prefix>-a-<pid>` / `-b-` joined by a veth pair (10.213.7.1 <-> .2);
    both are deleted (and with them the pair) when the block ends."""
    tag = os.getpid() % 100000
    a = Host(f"{prefix}-a-{tag}", f"ova{tag}", "10.213.7.1")
    b = Host(f"{prefix}-b-{tag}", f"ovb{tag}", "10.213.7.2")
    _ip("netns", "add", a.namespace)
    try:
        _ip("netns", "add", b.namespace)
        _ip("link", "add", a.device, "type", "veth", "peer", "name", b.device)
        for host in (a, b):
            _ip("link", "set", host.device, "netns", host.namespace)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/30", "dev", host.device)
            _ip("-n", host.namespace, "link", "set", host.device, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield a, b
    finally:
        for host in (a, b):  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, timeout=30)


@contextmanager
def veth_host(prefix: str = "omni") -> Iterator[tuple[Host, Host]]:
    """One other host: namespace `<prefix>-r-<pid>` joined to this machine's own namespace by a
    veth pair (10.213.N.1 there <-> 10.213.N.2 here, N from the pid: two test runs on one
    machine get two subnets, where one fixed subnet on two links of this namespace sent one run's
    traffic to the other's namespace), so this process reaches both hosts' servers (127.0.0.1
    stays this host's). Yields (the namespace, this host); deleted at the end."""
    tag = os.getpid() % 100000
    subnet = f"10.213.{8 + tag % 240}"
    remote = Host(f"{prefix}-r-{tag}", f"ovr{tag}", f"{subnet}.1")
    local = Host(None, f"ovl{tag}", f"{subnet}.2")
    _ip("netns", "add", remote.namespace)
    try:
        _ip("link", "add", local.device, "type", "veth", "peer", "name", remote.device)
        _ip("link", "set", remote.device, "netns", remote.namespace)
        _ip("-n", remote.namespace, "addr", "add", f"{remote.address}/30", "dev", remote.device)
        _ip("-n", remote.namespace, "link", "set", remote.device, "up")
        _ip("-n", remote.namespace, "link", "set", "lo", "up")
        _ip("addr", "add", f"{local.address}/30", "dev", local.device)
        _ip("link", "set", local.device, "up")
        yield remote, local
    finally:  # deleting the namespace deletes its end of the veth, and so the pair
        subprocess.run(["ip", "netns", "del", remote.namespace], capture_output=True, timeout=30)
