"""KV hand-over between hosts over NIXL (UCX underneath: TCP here, RDMA / NVLink where present).

The producer (the AR side) packs a request's tensors into one registered buffer and
returns a *handle*: a JSON-able dict holding its NIXL agent's metadata, the buffer's
descriptor and the tensors' layout, keyed by request id -- what travels in vLLM's
`kv_transfer_params` (the control plane). The consumer (the DiT side, another host) adds
the producer's agent, allocates one buffer, and issues one NIXL READ of the whole context
with a notification naming the request. The producer frees the buffer when that
notification arrives, or when the lease expires (the consumer died); `poll` says which.

    producer = NixlProducer("ar-0", lease_s=60)
    handle = producer.publish("req-1", {"k.0": k, "v.0": v}, {"positions": 7})
    ...                                   # handle reaches the consumer (JSON)
    tensors, meta = NixlConsumer("dit-0").pull(handle)
    producer.poll()                       # -> {"req-1": "acked"}

We use the nixl agent API directly, not vLLM's `NixlConnector`: its side channel is
private and version-hashed (vLLM version, model, dtype, backend), so a non-vLLM consumer
cannot speak it. Tests pin `UCX_TLS=tcp`: without it UCX treats two network namespaces
of one machine as one node and uses shared memory, which is not what they test.
"""

from __future__ import annotations

import base64
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

#: the notification a consumer sends with its READ: b"omni-kv-done:" + request id
DONE = b"omni-kv-done:"
POLL_S = 0.0005  # how often a pull looks at its READ's state


class NixlTransferError(RuntimeError):
    """A NIXL READ failed or did not finish in time; the message names the request and the producer."""


def _nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        try:
            from nixl_cu12._api import nixl_agent, nixl_agent_config  # the wheel without the `nixl` meta package
        except ImportError as e:
            raise ImportError("the NIXL transport needs the nixl package: pip install nixl-cu12") from e
    return nixl_agent, nixl_agent_config


def nixl_available() -> str | None:
    """None where the nixl package imports, else why not (for a skip reason)."""
    try:
        _nixl()
    except ImportError as e:
        return str(e)
    return None


#: microseconds NIXL's progress thread sleeps between its passes. nixl's Python wrapper (1.5)
#: sets 0, a thread that spins a core per agent even when idle: on the CPU hosts of the tests
#: that took 50% of a core per agent from the AR engine and the DiT, and it moved 64 MB no
#: faster (0.51-0.71 s at 0 vs 0.32-0.36 s at 1000 us, loopback TCP, 2 cores, 2026-12-02).
PROGRESS_DELAY_US = 1000
_agent_lock = threading.Lock()


def _agent(name: str):
    nixl_agent, nixl_agent_config = _nixl()
    bind = sys.modules[nixl_agent.__module__].nixlBind
    base = bind.nixlAgentConfig

    class _Config(base):  # the wrapper's own config, but for the progress thread's delay
        pthrDelay = property(base.pthrDelay.__get__,
                             lambda self, us: base.pthrDelay.__set__(self, max(us, PROGRESS_DELAY_US)))

    with _agent_lock:  # the wrapper builds its config from `nixlBind.nixlAgentConfig`
        bind.nixlAgentConfig = _Config
        try:
            return nixl_agent(name, nixl_agent_config(backends=["UCX"]))
        finally:
            bind.nixlAgentConfig = base


def _pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """One contiguous uint8 host buffer holding every tensor, and where each lies in it."""
    layout, offset = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        layout.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                       "offset": offset, "nbytes": nbytes})
        offset += nbytes
    buf = torch.empty(max(offset, 1), dtype=torch.uint8)
    for entry, t in zip(layout, tensors.values()):
        buf[entry["offset"]:entry["offset"] + entry["nbytes"]] = t.detach().contiguous().cpu().view(-1).view(torch.uint8)
    return buf, layout


def _unpack(buf: torch.Tensor, layout: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for e in layout:
        piece = buf[e["offset"]:e["offset"] + e["nbytes"]]
        out[e["name"]] = piece.view(getattr(torch, e["dtype"])).reshape(e["shape"])
    return out


@dataclass
class _Published:
    buf: torch.Tensor
    reg: Any
    expires: float


class NixlProducer:
    """Publishes request contexts for remote consumers; holds each until acked or expired."""

    def __init__(self, name: str, lease_s: float = 60.0) -> None:
        """Args:
            name: this agent's name, unique among the agents that talk to each other.
            lease_s: how long a published context waits for its consumer before it is freed.
        """
        self.name = name
        self.lease_s = lease_s
        self.agent = _agent(name)
        self._published: dict[str, _Published] = {}

    def publish(self, request_id: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
        """Register the request's tensors for a remote READ.

        Args:
            request_id: the key of the hand-over (the consumer's notification names it).
            tensors: name -> tensor (any dtype, any device; copied into one host buffer).
            metadata: JSON-able keyed metadata that travels with the handle.

        Returns:
            the handle (JSON-able) for the consumer.
        """
        if request_id in self._published:
            raise ValueError(f"request {request_id!r} is already published")
        buf, layout = _pack(tensors)
        reg = self.agent.register_memory(buf)
        descs = self.agent.get_xfer_descs(buf)
        self._published[request_id] = _Published(buf, reg, time.monotonic() + self.lease_s)
        return {
            "request_id": request_id,
            "agent": self.name,
            "agent_metadata": base64.b64encode(self.agent.get_agent_metadata()).decode(),
            "descs": base64.b64encode(self.agent.get_serialized_descs(descs)).decode(),
            "nbytes": int(buf.numel()),
            "layout": layout,
            "metadata": metadata,
        }

    def poll(self) -> dict[str, str]:
        """Free what consumers acknowledged ("acked") and what outlived its lease ("expired").

        Returns:
            request id -> why it was freed, for the requests freed by this call.
        """
        freed: dict[str, str] = {}
        for messages in self.agent.get_new_notifs().values():
            for msg in messages:
                if msg.startswith(DONE):
                    freed[msg[len(DONE):].decode()] = "acked"
        now = time.monotonic()
        freed.update({rid: "expired" for rid, p in self._published.items() if p.expires <= now and rid not in freed})
        for rid in list(freed):
            published = self._published.pop(rid, None)
            if published is None:
                del freed[rid]  # an ack for something already expired
                continue
            self.agent.deregister_memory(published.reg)
        return freed

    @property
    def held(self) -> list[str]:
        return list(self._published)


class NixlConsumer:
    """Pulls published contexts from remote producers with one NIXL READ each."""

    def __init__(self, name: str, timeout_s: float = 60.0) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.agent = _agent(name)
        self._remotes: dict[str, str] = {}

    def pull(self, handle: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """READ the context a handle names; the producer frees it on the notification.

        Args:
            handle: what `NixlProducer.publish` returned.

        Returns:
            (name -> tensor on the host, the handle's metadata).

        Raises:
            NixlTransferError: the READ failed (NIXL's own errors included, e.g. a producer that
                cannot be reached) or did not finish within `timeout_s`.
        """
        rid, producer = handle["request_id"], handle["agent"]
        try:
            return self._pull(handle, rid, producer)
        except NixlTransferError:
            raise
        except Exception as e:  # noqa: BLE001 - nixl's own errors (nixlBackendError, ...): one type, named
            # e.g. a producer whose host or process is gone: UCX cannot connect ("NIXL_ERR_BACKEND")
            raise NixlTransferError(f"NIXL READ of request {rid} from {producer} failed: "
                                    f"{type(e).__name__}: {e}") from e

    def _pull(self, handle: dict[str, Any], rid: str, producer: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # Always (re)load the producer's metadata: it carries the registrations (remote keys)
        # the producer had when it published, and a cached older copy lacks this buffer's.
        self._remotes[producer] = self.agent.add_remote_agent(base64.b64decode(handle["agent_metadata"]))
        remote = self.agent.deserialize_descs(base64.b64decode(handle["descs"]))
        buf = torch.empty(max(handle["nbytes"], 1), dtype=torch.uint8)
        reg = self.agent.register_memory(buf)
        try:
            local = self.agent.get_xfer_descs(buf)
            xfer = self.agent.initialize_xfer("READ", local, remote, self._remotes[producer], DONE + rid.encode())
            state = self.agent.transfer(xfer)
            deadline = time.monotonic() + self.timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise NixlTransferError(f"NIXL READ of request {rid} from {producer} took over {self.timeout_s} s")
                # NIXL's progress thread moves the data: a busy loop here would take its core
                time.sleep(POLL_S)
                state = self.agent.check_xfer_state(xfer)
            self.agent.release_xfer_handle(xfer)
            if state != "DONE":
                raise NixlTransferError(f"NIXL READ of request {rid} from {producer} failed ({state})")
            return _unpack(buf, handle["layout"]), handle["metadata"]
        finally:
            self.agent.deregister_memory(reg)


# ---------------------------------------------------------------- the AR / DiT servers' side
# `vllm serve MODEL --omni --omni-stage ar`: OmniKVConnector (transport "nixl") publishes each
# opted-in request's TransferredKV through one `LeasedProducer` of its engine process, and its
# request output's kv_transfer_params carry the handle; the DiT server's `pull_transferred`
# turns that report back into the TransferredKV the colocated path reads from its store.

#: the file (in the connector's transfer_dir) where the producer keeps its lease counters for
#: the AR server's /metrics (the engine process writes it, the API server process reads it)
LEASE_STATS = "nixl-leases.json"


class LeaseExpired(NixlTransferError):
    """The producer's lease on a published context ran out before the consumer pulled it."""


class LeasedProducer:
    """A NixlProducer shared by the engine's threads: publishes, and frees on ack or lease expiry
    from a background thread (the engine may be idle while a lease runs out)."""

    def __init__(self, name: str, lease_s: float, stats_path: str | None = None, period_s: float = 0.05) -> None:
        import json
        import threading

        self._json = json
        self.producer = NixlProducer(name, lease_s=lease_s)
        self.lock = threading.Lock()
        self.freed = {"acked": 0, "expired": 0}
        self.published = 0
        self.stats_path = stats_path
        self._period = period_s
        self._write_stats()
        threading.Thread(target=self._poll_forever, name="omni-nixl-lease", daemon=True).start()

    def publish(self, item: Any) -> dict[str, Any]:
        """Publish one TransferredKV (kv/store.py); the handle, with the lease's end (unix time)."""
        tensors = {f"k.{i}": k for i, k in enumerate(item.keys)}
        tensors.update({f"v.{i}": v for i, v in enumerate(item.values)})
        with self.lock:
            handle = self.producer.publish(item.request_id, tensors, item.metadata)
            self.published += 1
        handle["expires_unix"] = time.time() + self.producer.lease_s
        handle["num_layers"] = len(item.keys)
        self._write_stats()
        return handle

    def _poll_forever(self) -> None:
        while True:
            time.sleep(self._period)
            with self.lock:
                freed = self.producer.poll()
            if freed:
                for why in freed.values():
                    self.freed[why] += 1
                self._write_stats()

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        import os

        tmp = f"{self.stats_path}.tmp"
        with open(tmp, "w") as f:
            self._json.dump({"published": self.published, "held": len(self.producer.held), **self.freed}, f)
        os.replace(tmp, self.stats_path)


_consumer: NixlConsumer | None = None


def pull_transferred(report: dict[str, Any], timeout_s: float = 60.0):
    """The DiT server's read of a published context: the TransferredKV (kv/store.py) its handle names.

    Raises:
        LeaseExpired: the lease ended before the pull (the producer freed the context).
        NixlTransferError: the READ failed or took longer than `timeout_s`.
    """
    import os

    from .store import TransferredKV

    global _consumer
    handle = report["nixl"]
    if time.time() >= handle["expires_unix"]:
        raise LeaseExpired(f"the KV of request {handle['request_id']} published by {handle['agent']} expired "
                           "(its lease ended) before this server pulled it; raise --omni-kv-lease on the AR server")
    if _consumer is None:
        _consumer = NixlConsumer(f"omni-dit-{os.getpid()}-{time.time_ns()}", timeout_s=timeout_s)
    started = time.perf_counter()
    tensors, metadata = _consumer.pull(handle)
    metadata = {**metadata, "pull_seconds": time.perf_counter() - started}
    layers = handle["num_layers"]
    return TransferredKV(handle["request_id"], tuple(tensors[f"k.{i}"] for i in range(layers)),
                         tuple(tensors[f"v.{i}"] for i in range(layers)), metadata)
