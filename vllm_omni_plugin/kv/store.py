"""The transfer store: one file per request, keyed by request id.

The AR stage's worker writes a request's prompt K/V and the model's metadata
for it; the consumer (the diffusion stage, any process on the host) takes it by
the request id or by the `kv_transfer_params` of the request's output, and the
file is deleted as it is read, so storage lives exactly until consumption.
Large tensors go through the file system -- by default /dev/shm, i.e. shared
memory -- never pickled through a queue.

File format: safetensors with tensors `k.{layer}` / `v.{layer}`, each
(tokens, kv_heads, head_dim), and the metadata as JSON in the header. Writes
go to a temporary name first and are renamed, so a reader never sees half a
file. No vLLM imports here: the diffusion side reads these files without vLLM.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# The key in a request's kv_transfer_params (SamplingParams.extra_args["kv_transfer_params"])
# that asks for the transfer, and under which the output reports it.
PARAMS_KEY = "omni_kv"


def request_params() -> dict[str, Any]:
    """kv_transfer_params that ask OmniKVConnector to hand this request's prompt KV over."""
    return {PARAMS_KEY: {"transfer": True}}


def default_root() -> Path:
    shm = Path("/dev/shm")
    return (shm if shm.is_dir() else Path(tempfile.gettempdir())) / f"vllm-omni-kv-{os.getuid()}"


@dataclass(frozen=True)
class TransferredKV:
    """One request's prompt KV and the AR model's metadata for it.

    keys[i], values[i]: layer i, (tokens, kv_heads, head_dim), post-RoPE keys as
    the attention cache holds them -- the layout of the diffusion stage's
    `BranchKV` (diffusion/bagel/context.py): `BranchKV(t.keys, t.values,
    t.metadata["latent_position"])`. `metadata` is what the model class reports
    for the request (`kv_transfer_metadata(spec)`), plus `num_tokens`.
    """

    request_id: str
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[0]


class KVTransferStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path(self, request_id: str) -> Path:
        # Request ids are caller-chosen strings: hash them into a safe file name.
        return self.root / (hashlib.sha256(request_id.encode()).hexdigest()[:32] + ".safetensors")

    def put(self, item: TransferredKV) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tensors = {f"k.{i}": k.detach().cpu().contiguous() for i, k in enumerate(item.keys)}
        tensors.update({f"v.{i}": v.detach().cpu().contiguous() for i, v in enumerate(item.values)})
        header = {"request_id": item.request_id, "metadata": json.dumps(item.metadata)}
        final = self.path(item.request_id)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=header)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return final

    def take(self, request_id: str) -> TransferredKV:
        """Read a request's transfer and free its storage."""
        path = self.path(request_id)
        if not path.exists():
            raise KeyError(f"no KV transfer for request {request_id!r} in {self.root}")
        return take_file(path, request_id)

    def discard(self, request_id: str) -> None:
        self.path(request_id).unlink(missing_ok=True)

    def __contains__(self, request_id: str) -> bool:
        return self.path(request_id).exists()

    def __len__(self) -> int:
        return len(list(self.root.glob("*.safetensors"))) if self.root.is_dir() else 0


def take_file(path: str | Path, request_id: str | None = None) -> TransferredKV:
    path = Path(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    stored_id = header.get("request_id")
    if request_id is not None and stored_id != request_id:
        raise KeyError(f"{path} holds request {stored_id!r}, not {request_id!r}")
    tensors = load_file(path)
    path.unlink()
    layers = len(tensors) // 2
    return TransferredKV(
        request_id=stored_id,
        keys=tuple(tensors[f"k.{i}"] for i in range(layers)),
        values=tuple(tensors[f"v.{i}"] for i in range(layers)),
        metadata=json.loads(header.get("metadata", "{}")),
    )


def take_transferred(kv_transfer_params: dict[str, Any] | None) -> TransferredKV:
    """The consumer's entry point: read (and free) the transfer a request output's kv_transfer_params report.

    The report names the engine's request id (vLLM suffixes the caller's id to
    keep it unique), which is the key the file was written under.
    """
    report = (kv_transfer_params or {}).get(PARAMS_KEY)
    if not report or report.get("status") != "saved":
        raise KeyError(f"no saved KV transfer in kv_transfer_params={kv_transfer_params!r}")
    return take_file(report["path"], report["request_id"])
