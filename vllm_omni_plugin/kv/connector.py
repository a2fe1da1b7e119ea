"""OmniKVConnector: hands the AR stage's prompt KV + per-request model metadata over.

Selected like any vLLM connector:

    LLM(..., kv_transfer_config={"kv_connector": "OmniKVConnector", "kv_role": "kv_producer",
                                 "kv_connector_extra_config": {"transfer_dir": "/dev/shm/x"}})
    vllm serve ... --kv-transfer-config '{"kv_connector":"OmniKVConnector","kv_role":"kv_producer"}'

A request opts in through its sampling params
(`extra_args={"kv_transfer_params": store.request_params()}`); others are
untouched. For an opted-in request:

  scheduler side  tracks the request's block ids across steps (chunked prefill,
                  preemption) and, in the step that computes its last prompt
                  token, tells the workers to save it (`SaveSpec`).
  worker side     after that step's forward (`wait_for_save`), gathers every
                  layer's K/V of exactly the prompt's tokens from the paged
                  cache (`layout.gather_kv`), adds the model's metadata for the
                  request (`kv_transfer_metadata(spec)` of the model registered
                  with `register_metadata_source`), writes it to the transfer
                  store keyed by request id.
  request output  kv_transfer_params = {"omni_kv": {"status": "saved", "request_id": ...,
                  "path": ..., "num_tokens": ...}}; `store.take_transferred` reads and
                  frees it. The id is the engine's (vLLM suffixes the caller's id).

The save is synchronous: it finishes inside the step that completes the
prefill, before that step's output reaches the scheduler, so the request's
blocks are never needed after it finishes (request_finished frees them at
once) and `status: saved` in the output is always true. Only rank 0 of a
tensor-parallel group writes (each rank holds a slice of the heads; this
connector is for single-rank AR stages, as BAGEL's is).
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .cpu_isa import cpu_layout
from .layout import gather_kv, layout_for_backend, slot_mapping
from .store import PARAMS_KEY, KVTransferStore, TransferredKV

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


def _layer_layout(layer: Any, cache: torch.Tensor) -> str:
    """The `kv.layout` layout of one attention layer's cache (CPU_ATTN: checked through its kernel)."""
    backend = layer.attn_backend.get_name()
    if backend != "CPU_ATTN":
        return layout_for_backend(backend)
    if cache.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"the omni KV hand-over reads unquantized caches; this engine runs kv_cache_dtype="
            f"{getattr(layer, 'kv_cache_dtype', cache.dtype)!r}: leave --kv-cache-dtype at auto for the AR stage"
        )
    isa = getattr(layer, "isa", None)
    layout = cpu_layout(isa, cache.dtype, layer.head_size, cache.shape[2])
    if layout is None:  # patch cpu_attn_known_kv_layout chooses a known kernel for omni engines
        raise ValueError(
            f"CPU_ATTN kernel {isa!r} ({cache.dtype}, head_size {layer.head_size}, block_size {cache.shape[2]}) "
            "writes a KV layout vllm_omni_plugin.kv.layout does not read, and patch cpu_attn_known_kv_layout "
            "did not replace it (is the plugin loaded? `vllm-omni doctor` lists the patches)"
        )
    return layout


@dataclass(frozen=True)
class SaveSpec:
    """One request whose prompt is complete in the cache at the end of this step."""

    req_id: str
    block_ids: tuple[int, ...]
    num_tokens: int  # the prompt's length: exactly these tokens are handed over
    prompt_token_ids: tuple[int, ...]
    # (modality, offset, length) of each multimodal placeholder in the prompt
    mm_ranges: tuple[tuple[str, int, int], ...] = ()


@dataclass
class OmniKVMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)


class MetadataSource(Protocol):
    """What a model offers the connector (OmniBagelForConditionalGeneration does)."""

    def kv_transfer_metadata(self, spec: SaveSpec) -> dict[str, Any]: ...


# The model of this worker process that describes its requests to the connector.
# Why a process-wide registration and not a record made inside the model's
# forward: with CUDA graphs a forward is replayed without running any Python,
# and a host-side record there would also need the batch's request ids, which
# a forward does not see. The facts depend only on the scheduler's SaveSpec
# (prompt length, multimodal ranges) and the model's config, so the connector
# asks the model for them at save time. A worker process builds one model
# (the connector serves single-rank AR stages), so one slot is enough; it is
# held weakly so a model that goes away is not kept alive by the connector.
_source: "weakref.ReferenceType[MetadataSource] | None" = None


# NIXL transport: the worker side publishes in the step that completes a prompt and leaves
# the handle in the transfer directory, keyed by the engine's request id; the scheduler side
# (the EngineCore process; the worker may be another) hands it out in request_finished.
_nixl_producer: Any = None


def register_metadata_source(source: MetadataSource) -> None:
    """Make `source` the model this process's connector asks for per-request metadata."""
    global _source
    _source = weakref.ref(source)


def metadata_source() -> MetadataSource | None:
    return _source() if _source is not None else None


def wants_transfer(kv_transfer_params: dict[str, Any] | None) -> bool:
    report = (kv_transfer_params or {}).get(PARAMS_KEY)
    return isinstance(report, dict) and bool(report.get("transfer"))


@dataclass
class _Tracked:
    """Scheduler-side state of one opted-in request."""

    request: "Request"
    block_ids: list[int] = field(default_factory=list)
    saved: bool = False


class OmniKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.get_from_extra_config
        # transport: "auto" keeps GPU K/V on the GPU (CUDA IPC) and uses files otherwise (store.py);
        # "nixl" publishes each context for a consumer on another host (kv/nixl.py, `--omni-stage ar`).
        transport = extra("transport", "auto")
        self.nixl = transport == "nixl"
        self.store = KVTransferStore(extra("transfer_dir", None), "auto" if self.nixl else transport)
        self._lease_s = float(extra("lease_s", 60.0))
        self._block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._tracked: dict[str, _Tracked] = {}
        # worker side: layer name -> (cache, layout, head_dim), in layer order
        self._layers: list[tuple[str, torch.Tensor, str, int]] = []
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized

        self._writes = role != KVConnectorRole.WORKER or not model_parallel_is_initialized() or get_tensor_model_parallel_rank() == 0

    # ------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False  # a producer never loads

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        return

    def on_new_request(self, request: "Request") -> None:
        if wants_transfer(request.kv_transfer_params):
            self._tracked[request.request_id] = _Tracked(request)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> OmniKVMetadata:
        meta = OmniKVMetadata()
        steps: list[tuple[str, int]] = []  # (req_id, tokens computed by the end of this step)
        for new in scheduler_output.scheduled_new_reqs:
            if (t := self._tracked.get(new.req_id)) is not None:
                t.block_ids = list(new.block_ids[0])
                steps.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if (t := self._tracked.get(req_id)) is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:  # resumed after preemption: the full block list
                t.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                t.block_ids.extend(new_blocks[0])
            steps.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in steps:
            t = self._tracked[req_id]
            prompt_len = t.request.num_prompt_tokens
            if t.saved or computed + scheduler_output.num_scheduled_tokens[req_id] < prompt_len:
                continue
            t.saved = True
            meta.saves.append(SaveSpec(
                req_id=req_id,
                block_ids=tuple(t.block_ids[: -(-prompt_len // self._block_size)]),
                num_tokens=prompt_len,
                prompt_token_ids=tuple(t.request.prompt_token_ids or ()),
                mm_ranges=tuple((f.modality, f.mm_position.offset, f.mm_position.length) for f in t.request.mm_features),
            ))
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        t = self._tracked.pop(request.request_id, None)
        if t is None:
            return False, None
        if not t.saved:
            return False, {PARAMS_KEY: {"status": "not_saved", "reason": "finished before its prompt was prefilled"}}
        if self.nixl:
            path = self._handle_path(request.request_id)
            try:
                handle = json.loads(path.read_text())
            except OSError as e:
                return False, {PARAMS_KEY: {"status": "not_saved", "reason": f"no NIXL handle: {e}"}}
            path.unlink(missing_ok=True)
            return False, {PARAMS_KEY: {"status": "published", "request_id": request.request_id,
                                        "num_tokens": request.num_prompt_tokens, "nixl": handle}}
        report = {
            "status": "saved",
            "request_id": request.request_id,  # the engine's id: the store's key
            "path": str(self.store.path(request.request_id)),
            "num_tokens": request.num_prompt_tokens,
        }
        return False, {PARAMS_KEY: report}

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        attention = self._vllm_config.compilation_config.static_forward_context
        layers = []
        for name, cache in kv_caches.items():
            layer = attention[name]
            cache = cache.view(layer.kv_cache_torch_dtype) if cache.dtype == torch.int8 else cache
            layers.append((name, cache, _layer_layout(layer, cache), layer.head_size))
        self._layers = sorted(layers, key=lambda x: extract_layer_index(x[0]))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        # Nothing per layer: the whole prompt is read once, in wait_for_save of the
        # step that completes it (earlier chunks are already in the paged cache).
        return

    def wait_for_save(self) -> None:
        if not self._writes or not self.has_connector_metadata():
            return
        self.store.release_consumed()  # shared GPU buffers the consumer has taken since the last step
        meta = self._get_connector_metadata()
        if not isinstance(meta, OmniKVMetadata) or not meta.saves:
            return
        source = metadata_source()
        if torch.cuda.is_available() and self._layers and self._layers[0][1].is_cuda:
            # The K/V are valid once this step's forward ran; waiting here (once per saving step)
            # also keeps that compute out of the hand-over time measured below.
            torch.cuda.current_stream().synchronize()
        for spec in meta.saves:
            # The producer's share of the hand-over (gather + store) is measured by the consumer from
            # this and the file's modification time (store.take_file: metadata["save_seconds"]).
            started = time.time()
            facts = source.kv_transfer_metadata(spec) if source is not None else {}
            slots = slot_mapping(spec.block_ids, self._block_size, spec.num_tokens)
            pairs = [gather_kv(cache, layout, head_dim, slots) for _, cache, layout, head_dim in self._layers]
            item = TransferredKV(
                request_id=spec.req_id,
                keys=tuple(k for k, _ in pairs),
                values=tuple(v for _, v in pairs),
                metadata={**facts, "num_tokens": spec.num_tokens, "save_started_unix": started},
            )
            if self.nixl:
                handle = self._producer().publish(item)
                handle["metadata"]["save_seconds"] = time.time() - started
                path = self._handle_path(spec.req_id)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(handle))
                tmp.replace(path)  # whole before the step's output reaches the scheduler
            else:
                self.store.put(item)

    def _handle_path(self, request_id: str):
        return self.store.path(request_id).with_suffix(".nixl.json")

    def _producer(self):
        """This engine process's NIXL producer (made on the first publish)."""
        global _nixl_producer
        if _nixl_producer is None:
            import os

            from .nixl import LEASE_STATS, LeasedProducer

            self.store.root.mkdir(parents=True, exist_ok=True)
            _nixl_producer = LeasedProducer(f"omni-ar-{os.getpid()}-{time.time_ns()}", self._lease_s,
                                            str(self.store.root / LEASE_STATS))
        return _nixl_producer
