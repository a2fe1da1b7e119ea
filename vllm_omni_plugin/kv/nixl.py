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


def _agent(name: str):
    nixl_agent, nixl_agent_config = _nixl()
    return nixl_agent(name, nixl_agent_config(backends=["UCX"]))


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
            NixlTransferError: the READ failed or did not finish within `timeout_s`.
        """
        rid, producer = handle["request_id"], handle["agent"]
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
