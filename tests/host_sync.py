"""A dispatch-mode recorder of the ops a CUDA graph (or a host-free step) cannot contain.

SYNC_OPS make the host wait for a device value (or have an output size that depends on one).
HOST_DATA_OPS make a tensor from python data (`torch.tensor` / `torch.as_tensor`): on a GPU that is
a blocking host-to-device copy, which a CUDA graph cannot capture. On CPU both show up as the same
aten ops, so a CPU forward can be checked for them.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.masked_select", "aten.equal",
            "aten.unique", "aten._unique", "aten.repeat_interleave.Tensor", "aten.item")
HOST_DATA_OPS = ("aten.lift_fresh",)


class SyncRecorder(TorchDispatchMode):
    """`with SyncRecorder(ops) as rec: ...` -> rec.seen: the names of the recorded ops, in order."""

    def __init__(self, ops: tuple[str, ...] = SYNC_OPS) -> None:
        super().__init__()
        self.ops = ops
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.ops):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))
