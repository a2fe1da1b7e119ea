"""Multi-GPU DiT: CFG-parallel x sequence-parallel (Ulysses / ring) over torch.distributed.

Layout: `world_size = cfg_degree * ring_degree * ulysses_degree` ranks form a
device mesh ("cfg", "ring", "ulysses").

* Sequence parallelism is diffusers' own context parallelism
  (`ModelMixin.enable_parallelism` with a `ContextParallelConfig` on our mesh):
  the transformers declare their split/gather plan (`_cp_plan`, present for
  `QwenImageTransformer2DModel` and `WanTransformer3DModel` in diffusers 0.42)
  and diffusers runs Ulysses all-to-all or ring attention inside the attention
  dispatcher. Every rank of a CFG group sees the full model output.
* CFG / batch parallelism is ours (diffusers has none): the (request, branch)
  blocks of a step are dealt over the "cfg" mesh dimension (a request's two
  branches on two ranks, requests spread by load; StepwisePipeline.cfg_split),
  each CFG group runs the forwards of its blocks, and the outputs are
  all-gathered so every rank holds every prediction and steps its (identical)
  schedulers itself.

Why not another library: xfuser/xDiT 0.7 wraps whole diffusers pipelines and
its own runtime state (one request per call), so it cannot run the step-batched
rows of many requests; yunchang is the attention kernel layer that diffusers'
Ulysses/ring already covers; para-attn 0.3 targets torch<=2.7 and patches
pipelines globally; cache-dit's parallelism for Qwen-Image and Wan delegates to
the same diffusers context parallelism used here. Only the CFG split and the
engine mirroring (workers.py) are hand-written.

Every rank runs the same engine on the same requests (SPMD): rank 0 decides
(queue, aborts, admissions) and broadcasts that plan each step; preparation,
batching and scheduler steps are deterministic, so the ranks stay in lockstep.
"""

from __future__ import annotations

import datetime
import pickle
from dataclasses import dataclass
from typing import Any, Mapping
from unittest import mock

import torch
import torch.distributed as dist

# Worker ranks wait in the plan broadcast while the engine is idle: no timeout for that.
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks each DiT parallelism uses (1 everywhere = one device, no torch.distributed).

    cfg_degree      ranks splitting each step's batch: the two CFG branches of a request run on
                    two of them, and requests are dealt out over all of them (see
                    StepwisePipeline.cfg_split); 2 = cond and uncond in parallel
    ulysses_degree  Ulysses sequence parallelism (all-to-all over heads)
    ring_degree     ring attention sequence parallelism
    """

    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("cfg_degree", "ulysses_degree", "ring_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.ulysses_degree * self.ring_degree

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "ParallelConfig":
        """From a stage config / CLI mapping; unknown keys are an error naming them."""
        values = dict(values or {})
        unknown = set(values) - {"cfg_degree", "ulysses_degree", "ring_degree"}
        if unknown:
            raise ValueError(f"unknown parallel setting(s) {sorted(unknown)}; known: cfg_degree, ulysses_degree, ring_degree")
        return cls(**values)


class ParallelGroup:
    """This rank's place in the mesh and the collectives the engine needs.

    Args:
        config: the degrees; their product must equal the initialised world size.
        device: this rank's device (its mesh device type picks NCCL or gloo).
        dtype: the model's output dtype (a rank with no block in a step still
            joins the output gather, with a payload of this dtype).
    """

    def __init__(self, config: ParallelConfig, device: torch.device, dtype: torch.dtype) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("ParallelGroup needs torch.distributed initialised (see workers.init_rank)")
        if dist.get_world_size() != config.world_size:
            raise ValueError(
                f"parallel config needs {config.world_size} ranks (cfg {config.cfg_degree} x ring "
                f"{config.ring_degree} x ulysses {config.ulysses_degree}), the process group has {dist.get_world_size()}"
            )
        self.config = config
        self.device = device
        self.payload_dtype = dtype
        self.rank = dist.get_rank()
        self.mesh = init_device_mesh(
            device.type,
            (config.cfg_degree, config.ring_degree, config.ulysses_degree),
            mesh_dim_names=("cfg", "ring", "ulysses"),
        )
        self.cfg_rank = self.mesh["cfg"].get_local_rank()
        self.cfg_group = self.mesh["cfg"].get_group()
        # gloo twin of the CFG group for the host-side shape exchange (on CPU the mesh is gloo already)
        self.cfg_object_group = self.cfg_group if device.type == "cpu" else self._gloo_cfg_group()
        # Plans are Python objects (parameters, PIL images): broadcast them on a CPU group.
        self.object_group = (
            dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if device.type != "cpu" else dist.group.WORLD
        )
        #: rank 0: bytes `send_object` sent to each rank so far (what the stage-input shards cost)
        self.sent_bytes: dict[int, int] = {}

    def _gloo_cfg_group(self) -> Any:
        # new_group is collective over all ranks: every rank creates every CFG group, keeps its own.
        ranks = self.mesh.mesh.reshape(self.config.cfg_degree, -1)
        mine = None
        for column in ranks.t().tolist():
            group = dist.new_group(ranks=column, backend="gloo", timeout=IDLE_TIMEOUT)
            if self.rank in column:
                mine = group
        return mine

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def cfg_rank_of(self, rank: int) -> int:
        """The "cfg" mesh coordinate of global rank `rank`."""
        return int((self.mesh.mesh == rank).nonzero()[0][0])

    def send_object(self, obj: Any, dst: int) -> int:
        """Rank 0: pickle `obj` and send it to rank `dst` alone over the CPU group; returns the bytes sent.

        Point to point, not a broadcast: each rank gets its own payload (a multi-stage DiT's
        context KV of the CFG branches that rank runs, StepwisePipeline.stage_input_shard).
        """
        payload = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8)
        dist.send(torch.tensor([payload.numel()], dtype=torch.int64), dst, group=self.object_group)
        dist.send(payload, dst, group=self.object_group)
        self.sent_bytes[dst] = self.sent_bytes.get(dst, 0) + payload.numel()
        return payload.numel()

    def recv_object(self, src: int = 0) -> Any:
        """The object `send_object` sent this rank."""
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=self.object_group)
        payload = torch.empty(int(size[0]), dtype=torch.uint8)
        dist.recv(payload, src, group=self.object_group)
        return pickle.loads(payload.numpy().tobytes())

    def broadcast_plan(self, plan: Any) -> Any:
        """Rank 0's `plan` on every rank."""
        box = [plan]
        dist.broadcast_object_list(box, src=0, group=self.object_group)
        return box[0]

    def gather_blocks(self, local: list[torch.Tensor], counts: list[int]) -> list[list[torch.Tensor]]:
        """All-gather block outputs over the CFG dimension.

        Args:
            local: this CFG rank's outputs, in its block order.
            counts: how many blocks each CFG rank produced (known to all ranks).
        Returns:
            per CFG rank, its outputs in its block order (this rank's own are `local` as is).
        """
        if self.config.cfg_degree == 1:
            return [local]
        # Shapes first (a tiny CPU tensor over gloo: reading them back must not wait
        # for the GPU, or the host could not queue the next step while this one
        # runs), then one flat payload, padded to the longest, on the device group.
        ndim = 6
        most = max(counts)
        shapes = torch.zeros(most, ndim + 1, dtype=torch.int64)
        for i, t in enumerate(local):
            shapes[i, 0] = t.dim()
            shapes[i, 1 : 1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        all_shapes = [torch.empty_like(shapes) for _ in range(self.config.cfg_degree)]
        dist.all_gather(all_shapes, shapes, group=self.cfg_object_group)
        dims = [[tuple(row[1 : 1 + row[0]].tolist()) for row in s[:n]] for s, n in zip(all_shapes, counts)]
        sizes = [sum(int(torch.Size(d).numel()) for d in per) for per in dims]
        dtype = local[0].dtype if local else self.payload_dtype
        flat = torch.zeros(max(sizes), dtype=dtype, device=self.device)
        if local:
            mine = torch.cat([t.reshape(-1) for t in local])
            flat[: mine.numel()] = mine
        gathered = [torch.empty_like(flat) for _ in range(self.config.cfg_degree)]
        dist.all_gather(gathered, flat, group=self.cfg_group)
        out: list[list[torch.Tensor]] = []
        for r, (buf, per) in enumerate(zip(gathered, dims)):
            if r == self.cfg_rank:
                out.append(local)
                continue
            pieces = buf[: sizes[r]].split([int(torch.Size(d).numel()) for d in per]) if per else []
            out.append([p.view(d) for p, d in zip(pieces, per)])
        return out

    def all_agree(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise AND of boolean `flags` over this rank's sequence-parallel group.

        Step caching decides on each rank's own sequence shard; all shards of a
        forward must skip the same rows, or their collectives would not match.
        """
        if self.config.sp_degree == 1:
            return flags
        t = flags.to(device=self.device, dtype=torch.int32)
        group = self.mesh["ring", "ulysses"]._flatten().get_group()
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        return t.bool().cpu()


def enable_sequence_parallel(transformer: Any, group: ParallelGroup) -> None:
    """Shard the transformer's sequence over the ("ring", "ulysses") mesh with diffusers' context parallelism.

    Arbitrary text lengths are allowed through diffusers' "anything" modes when a
    single kind of SP is used; combining ring and Ulysses needs sequence lengths
    divisible by the SP degree (diffusers' rule).
    """
    from diffusers import ContextParallelConfig

    cfg = group.config
    if cfg.sp_degree == 1:
        return
    if getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(f"{type(transformer).__name__} declares no context-parallel plan: sequence parallelism unsupported")
    if cfg.ring_degree > 1:
        # Ring attention merges partial results through their log-sum-exp, which
        # torch's plain SDPA does not return; cuDNN attention does (Hopper, bf16).
        if group.device.type != "cuda":
            raise ValueError("ring_degree > 1 needs CUDA (diffusers' ring attention needs an LSE-returning kernel)")
        transformer.set_attention_backend("_native_cudnn")
    cp = ContextParallelConfig(
        ring_degree=cfg.ring_degree,
        ulysses_degree=cfg.ulysses_degree,
        ulysses_anything=cfg.ulysses_degree > 1 and cfg.ring_degree == 1,
        ring_anything=cfg.ring_degree > 1 and cfg.ulysses_degree == 1,
        mesh=group.mesh,
    )
    if group.device.type == "cpu":
        # diffusers picks `rank % torch.accelerator.device_count()` as the device,
        # which divides by zero without an accelerator; our mesh already fixes the
        # placement, so on CPU (gloo: tests, no GPU) the count is reported as 1.
        with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
            transformer.enable_parallelism(config=cp)
    else:
        transformer.enable_parallelism(config=cp)


def sequence_shard(transformer: Any, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's shard of `x` along `dim`, cut exactly as diffusers' context-parallel input hook cuts it.

    Step caching compares a block's output with its input; under sequence
    parallelism the first block's hook shards the input inside the call, so the
    cache shards its copy the same way.
    """
    from diffusers.hooks.context_parallel import EquipartitionSharder, PartitionAnythingSharder

    cp = transformer._parallel_config.context_parallel_config
    if cp.ulysses_anything or cp.ring_anything:
        return PartitionAnythingSharder.shard_anything(x, dim, cp._flattened_mesh)
    return EquipartitionSharder.shard(x, dim, cp._flattened_mesh)
