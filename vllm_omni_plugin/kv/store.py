"""The transfer store: one file per request, keyed by request id.

The AR stage's worker writes a request's prompt K/V and the model's metadata
for it; the consumer (the diffusion stage, any process on the host) takes it by
the request id or by the `kv_transfer_params` of the request's output, and the
file is deleted as it is read, so storage lives exactly until consumption.
Large tensors go through the file system -- by default /dev/shm, i.e. shared
memory -- never pickled through a queue.

Two transports, one file per request either way (safetensors, the metadata
as JSON in its header; written to a temporary name and renamed, so a reader
never sees half a file):

  file      the tensors `k.{layer}` / `v.{layer}`, each (tokens, kv_heads,
            head_dim), are in the file. Any process on the host reads them.
  cuda_ipc  the K/V stay on the GPU: the producer stacks them into one buffer
            (2, layers, tokens, kv_heads, head_dim) and the file's header holds
            its CUDA IPC handle (torch.multiprocessing's own reduction, as
            torch's queues send CUDA tensors). The consumer opens it, copies it
            device-to-device and deletes the file; the producer keeps the buffer
            until the file is gone (`release_consumed`, called every engine
            step) or MAX_SHARED_SECONDS passed. No host round trip: a 0.5 GB
            img2img context moves in about a millisecond instead of ~0.5 s.
            Needs the consumer on the same host with access to the device
            (the AR and DiT stages of one GPU), and the producer alive until
            consumption. The handle is pickled; the store's folder is private
            to the user that runs both stages.

`transport="auto"` picks cuda_ipc for CUDA tensors and file otherwise. No
vLLM imports here: the diffusion side reads these files without vLLM.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# The key in a request's kv_transfer_params (SamplingParams.extra_args["kv_transfer_params"])
# that asks for the transfer, and under which the output reports it.
PARAMS_KEY = "omni_kv"

TRANSPORTS = ("auto", "file", "cuda_ipc")
# A shared GPU buffer nobody took (its request was aborted after the prefill) is freed after this.
MAX_SHARED_SECONDS = 600.0
_IPC_KEY = "cuda_ipc"


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
    `BranchKV` (families/bagel/dit/context.py): `BranchKV(t.keys, t.values,
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
    """Args:
        root: the folder of the per-request files (default: /dev/shm/vllm-omni-kv-<uid>).
        transport: "auto" (cuda_ipc for CUDA tensors, else file), "file" or "cuda_ipc".
    """

    def __init__(self, root: str | Path | None = None, transport: str = "auto") -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown KV transport {transport!r}; one of {', '.join(TRANSPORTS)}")
        self.root = Path(root) if root is not None else default_root()
        self.transport = transport
        self._shared: dict[Path, tuple[torch.Tensor, float]] = {}  # cuda_ipc buffers until consumed

    def path(self, request_id: str) -> Path:
        # Request ids are caller-chosen strings: hash them into a safe file name.
        return self.root / (hashlib.sha256(request_id.encode()).hexdigest()[:32] + ".safetensors")

    def uses_ipc(self, item: TransferredKV) -> bool:
        on_gpu = item.keys[0].is_cuda
        if self.transport == "cuda_ipc" and not on_gpu:
            raise ValueError("KV transport cuda_ipc needs CUDA tensors; this stage's KV cache is on "
                             f"{item.keys[0].device} (use transport file or auto)")
        return on_gpu and self.transport != "file"

    def put(self, item: TransferredKV) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        header = {"request_id": item.request_id, "metadata": json.dumps(item.metadata)}
        if self.uses_ipc(item):
            from torch.multiprocessing.reductions import reduce_tensor

            buffer = torch.stack([torch.stack(item.keys), torch.stack(item.values)])
            _, args = reduce_tensor(buffer)
            header[_IPC_KEY] = base64.b64encode(pickle.dumps(args)).decode()
            # what a reader may know before it opens the buffer (`peek_file`)
            header["kv_shape"] = json.dumps(list(buffer.shape))
            header["kv_dtype"] = str(buffer.dtype).removeprefix("torch.")
            final = self._write({}, header, item.request_id)
            self._shared[final] = (buffer, time.monotonic())
            return final
        tensors = {f"k.{i}": k.detach().cpu().contiguous() for i, k in enumerate(item.keys)}
        tensors.update({f"v.{i}": v.detach().cpu().contiguous() for i, v in enumerate(item.values)})
        return self._write(tensors, header, item.request_id)

    def release_consumed(self, now: float | None = None) -> int:
        """Free shared GPU buffers whose file was taken (or that waited too long); returns how many are held."""
        now = time.monotonic() if now is None else now
        for path, (_, since) in list(self._shared.items()):
            if not path.exists():
                del self._shared[path]
            elif now - since > MAX_SHARED_SECONDS:
                path.unlink(missing_ok=True)
                del self._shared[path]
        return len(self._shared)

    def _write(self, tensors: dict[str, torch.Tensor], header: dict[str, str], request_id: str) -> Path:
        final = self.path(request_id)
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


def _read_header(path: Path, request_id: str | None) -> tuple[dict[str, str], str, dict[str, Any]]:
    """(a transfer file's header, the request id it holds, the producer's metadata); KeyError if it
    holds another request than `request_id`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    stored_id = header.get("request_id")
    if request_id is not None and stored_id != request_id:
        raise KeyError(f"{path} holds request {stored_id!r}, not {request_id!r}")
    metadata = json.loads(header.get("metadata", "{}"))
    if "save_started_unix" in metadata:  # the producer's gather + write, ended when the file was renamed in
        metadata["save_seconds"] = max(0.0, path.stat().st_mtime - metadata["save_started_unix"])
    return header, stored_id, metadata


def take_file(path: str | Path, request_id: str | None = None) -> TransferredKV:
    path = Path(path)
    header, stored_id, metadata = _read_header(path, request_id)
    if _IPC_KEY in header:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        shared = rebuild_cuda_tensor(*pickle.loads(base64.b64decode(header[_IPC_KEY])))
        kv = shared.clone()  # our own copy: the producer may free its buffer once the file is gone
        torch.cuda.current_stream(kv.device).synchronize()
        del shared
        path.unlink()
        return TransferredKV(stored_id, tuple(kv[0].unbind(0)), tuple(kv[1].unbind(0)), metadata)
    tensors = load_file(path)
    path.unlink()
    layers = len(tensors) // 2
    return TransferredKV(
        request_id=stored_id,
        keys=tuple(tensors[f"k.{i}"] for i in range(layers)),
        values=tuple(tensors[f"v.{i}"] for i in range(layers)),
        metadata=metadata,
    )


@dataclass(frozen=True)
class KVHandle:
    """A request's transfer in the store, not read yet: what crosses to the process that reads it.

    The AR stage's file (shared memory under /dev/shm, or the CUDA IPC handle of its GPU buffer)
    stays where the producer wrote it; the handle is its path and the facts its header holds, a
    few hundred bytes whichever the context's size. The consuming stage's process calls `take()`
    (the one read of its tensors, the file freed as it is read); whoever gives up on the request
    calls `discard()` (a no-op once taken).

    num_layers, num_tokens, nbytes: of the K/V the file holds; metadata: the producer's (as
    `TransferredKV.metadata`, `save_seconds` included).
    """

    path: str
    request_id: str
    num_layers: int
    num_tokens: int
    nbytes: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def take(self) -> TransferredKV:
        return take_file(self.path, self.request_id)

    def discard(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def peek_file(path: str | Path, request_id: str | None = None) -> KVHandle:
    """A `KVHandle` of a transfer file from its header alone (no tensor is read)."""
    import math

    from safetensors import safe_open

    path = Path(path)
    header, stored_id, metadata = _read_header(path, request_id)
    if _IPC_KEY in header:  # one GPU buffer (2, layers, tokens, kv_heads, head_dim)
        shape = json.loads(header["kv_shape"])
        layers, tokens = shape[1], shape[2]
        nbytes = math.prod(shape) * _itemsize(getattr(torch, header["kv_dtype"]))
    else:  # k.{i} / v.{i}, each (tokens, kv_heads, head_dim): their shapes from the header
        with safe_open(path, framework="pt") as f:
            slices = [f.get_slice(name) for name in f.keys()]
            layers, tokens = len(slices) // 2, f.get_slice("k.0").get_shape()[0]
            nbytes = sum(math.prod(s.get_shape()) * _itemsize(_SAFETENSORS_DTYPES[s.get_dtype()]) for s in slices)
    return KVHandle(str(path), stored_id, layers, tokens, nbytes, metadata)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}


def peek_transferred(kv_transfer_params: dict[str, Any] | None) -> KVHandle | TransferredKV:
    """As `take_transferred`, but a saved transfer stays in the store: its `KVHandle` (for the
    stage that reads it, maybe in another process). A transfer pulled from another host is
    already in this process's memory: that `TransferredKV` itself."""
    report = _report(kv_transfer_params)
    return report["transferred"] if report["status"] == "pulled" else peek_file(report["path"], report["request_id"])


def take_transferred(kv_transfer_params: dict[str, Any] | None) -> TransferredKV:
    """The consumer's entry point: read (and free) the transfer a request output's kv_transfer_params report.

    The report names the engine's request id (vLLM suffixes the caller's id to
    keep it unique), which is the key the file was written under.
    """
    report = _report(kv_transfer_params)
    return report["transferred"] if report["status"] == "pulled" else take_file(report["path"], report["request_id"])


def _report(kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
    """The connector's report in a request output's kv_transfer_params: "saved" to the store, or
    "pulled" from another host over NIXL (`--omni-stage dit`); KeyError for anything else."""
    report = (kv_transfer_params or {}).get(PARAMS_KEY)
    if not report or report.get("status") not in ("saved", "pulled"):
        raise KeyError(f"no saved KV transfer in kv_transfer_params={kv_transfer_params!r}")
    return report
