"""Values across the engine-core process boundary: msgpack for structure, raw frames for data.

`encode(value)` returns ZMQ frames: frame 0 is msgpack (msgspec) of the value's
structure; each tensor, array or image becomes one raw frame of its bytes
(never a pickle), referenced from the structure by index. `decode(frames)`
rebuilds the value. The same idea as vLLM's engine-core serializer (tensors as
auxiliary buffers), written for what diffusion requests carry:

    torch.Tensor (CPU or not: moved to the host), numpy arrays, PIL images
    dataclasses (ResolvedParams, SamplingParams, DiffusionOutput, Capabilities,
      typed stage inputs ...): by their import path and fields
    tuples, frozensets, builtin types (a Knob's type), torch dtypes, exceptions
      (their class path, args and plain attributes; see `rebuild_exception`)

msgpack has no tuples; a tagged map keeps them tuples, so a value decodes to
what was encoded (`decode(encode(x)) == x`). Unknown types raise TypeError
naming the type: nothing is pickled silently.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import types
from typing import Any, Sequence

import msgspec
import numpy as np

# The tag key of a special value; a plain dict that uses it as a key is refused at encode.
_TAG = "\x00t"

_BUILTIN_TYPES = {t.__name__: t for t in (bool, int, float, str, tuple, list, dict, bytes, type(None))}

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

Frames = list  # list[bytes | memoryview | zmq.Frame]


def encode(value: Any) -> Frames:
    """The frames of `value`: [structure, raw buffer 1, raw buffer 2, ...]."""
    buffers: list[Any] = []
    tree = pack(value, buffers)
    return [_encoder.encode(tree), *buffers]


def decode(frames: Sequence[Any]) -> Any:
    """The value `encode` made `frames` from (frames: bytes, memoryviews or zmq Frames)."""
    buffers = frame_buffers(frames)
    return unpack(_decoder.decode(buffers[0]), buffers)


def frame_buffers(frames: Sequence[Any]) -> list[Any]:
    """The raw memory of received frames (zmq Frames expose it without a copy)."""
    return [f.buffer if hasattr(f, "buffer") else f for f in frames]


def pack(value: Any, buffers: list[Any]) -> Any:
    """`value` as msgpack-native structure; its big data appended to `buffers` (frame i = buffers[i-1])."""
    return _pack(value, buffers)


def unpack(tree: Any, buffers: Sequence[Any]) -> Any:
    """The value `pack` made `tree` from; `buffers[i]` is frame i (frame 0 the structure)."""
    return _unpack(tree, buffers)


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> Any:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _pack(v: Any, buffers: list[Any]) -> Any:
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return v
    if isinstance(v, list):
        return [_pack(x, buffers) for x in v]
    if isinstance(v, tuple) and not hasattr(v, "_fields"):
        return {_TAG: "tuple", "v": [_pack(x, buffers) for x in v]}
    if isinstance(v, (dict, types.MappingProxyType)):
        if _TAG in v:
            raise TypeError(f"a mapping key {_TAG!r} cannot cross the engine boundary")
        return {k: _pack(x, buffers) for k, x in v.items()}
    if isinstance(v, frozenset):
        return {_TAG: "frozenset", "v": [_pack(x, buffers) for x in sorted(v, key=repr)]}
    if isinstance(v, set):
        return {_TAG: "set", "v": [_pack(x, buffers) for x in sorted(v, key=repr)]}
    if isinstance(v, np.ndarray):
        arr = np.ascontiguousarray(v)
        buffers.append(arr.data if arr.size else b"")
        return {_TAG: "ndarray", "dtype": arr.dtype.str, "shape": list(arr.shape), "i": len(buffers)}
    if isinstance(v, np.generic):
        return v.item()
    mod = type(v).__module__
    if mod.startswith("torch"):
        return _pack_torch(v, buffers)
    if mod.startswith("PIL."):
        return _pack_image(v, buffers)
    if isinstance(v, type) and v.__name__ in _BUILTIN_TYPES and _BUILTIN_TYPES[v.__name__] is v:
        return {_TAG: "type", "v": v.__name__}
    if isinstance(v, BaseException):
        return _pack_exception(v, buffers)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        fields = {f.name: _pack(getattr(v, f.name), buffers) for f in dataclasses.fields(v)}
        return {_TAG: "dataclass", "cls": class_path(type(v)), "v": fields}
    raise TypeError(f"{type(v).__module__}.{type(v).__qualname__} cannot cross the engine-core boundary "
                    "(tensors, arrays, images, dataclasses and plain values can)")


def _pack_torch(v: Any, buffers: list[Any]) -> Any:
    import torch

    if isinstance(v, torch.dtype):
        return {_TAG: "dtype", "v": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {_TAG: "device", "v": str(v)}
    if isinstance(v, torch.Tensor):
        t = v.detach().to("cpu").contiguous()
        # bytes through a uint8 view: every dtype (bfloat16, float8 too) crosses bit for bit
        raw = t.view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
        buffers.append(raw.data if raw.size else b"")
        return {_TAG: "tensor", "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "i": len(buffers)}
    raise TypeError(f"torch value {type(v).__qualname__} cannot cross the engine-core boundary")


def _pack_image(v: Any, buffers: list[Any]) -> Any:
    from PIL import Image

    if not isinstance(v, Image.Image):
        raise TypeError(f"PIL value {type(v).__qualname__} cannot cross the engine-core boundary")
    buffers.append(v.tobytes())
    info = {k: x for k, x in v.info.items() if isinstance(x, (bool, int, float, str))}
    palette = v.getpalette(rawmode=None) if v.mode in ("P", "PA") else None  # (raw mode: as stored)
    return {_TAG: "image", "mode": v.mode, "size": list(v.size), "i": len(buffers), "info": info,
            "palette": palette, "palette_mode": v.palette.mode if palette is not None else None}


def _pack_exception(v: BaseException, buffers: list[Any]) -> Any:
    attrs = {}
    for k, x in vars(v).items():
        try:
            attrs[k] = _pack(x, [])  # plain attributes only (a field name, a status ...)
        except TypeError:
            continue
    args = []
    for a in v.args:
        try:
            args.append(_pack(a, []))
        except TypeError:
            args.append(str(a))
    return {_TAG: "exception", "cls": class_path(type(v)), "args": args, "attrs": attrs, "text": str(v)}


def _unpack(v: Any, buffers: list[Any]) -> Any:
    if isinstance(v, list):
        return [_unpack(x, buffers) for x in v]
    if not isinstance(v, dict):
        return v
    tag = v.get(_TAG)
    if tag is None:
        return {k: _unpack(x, buffers) for k, x in v.items()}
    if tag == "tuple":
        return tuple(_unpack(x, buffers) for x in v["v"])
    if tag == "frozenset":
        return frozenset(_unpack(x, buffers) for x in v["v"])
    if tag == "set":
        return {_unpack(x, buffers) for x in v["v"]}
    if tag == "ndarray":
        # a copy: the frame's memory belongs to ZMQ, and callers may write into the array
        return np.frombuffer(buffers[v["i"]], dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
    if tag == "tensor":
        import torch

        dtype = getattr(torch, v["dtype"])
        raw = bytearray(buffers[v["i"]])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(v["shape"])
    if tag == "image":
        from PIL import Image

        img = Image.frombytes(v["mode"], tuple(v["size"]), bytes(buffers[v["i"]]))
        if v.get("palette") is not None:
            img.putpalette(v["palette"], v["palette_mode"])
        img.info.update(v["info"])
        return img
    if tag == "dtype":
        import torch

        return getattr(torch, v["v"])
    if tag == "device":
        import torch

        return torch.device(v["v"])
    if tag == "type":
        return _BUILTIN_TYPES[v["v"]]
    if tag == "dataclass":
        cls = import_class(v["cls"])
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{v['cls']} is not a dataclass")
        fields = {k: _unpack(x, buffers) for k, x in v["v"].items()}
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        obj = cls(**{k: x for k, x in fields.items() if k in init})
        for k, x in fields.items():  # fields outside __init__ (init=False) keep their value
            if k not in init:
                object.__setattr__(obj, k, x)
        return obj
    if tag == "exception":
        return rebuild_exception(v["cls"], [_unpack(a, buffers) for a in v["args"]],
                                 {k: _unpack(x, buffers) for k, x in v["attrs"].items()}, v["text"])
    raise ValueError(f"unknown tag {tag!r} in an engine-core message")


class RemoteError(Exception):
    """An exception of the engine-core process whose class this process cannot rebuild.

    A subclass named after the original is made on the fly (`rebuild_exception`), so
    `type(e).__name__` still says what failed; `remote_class` is its full path.
    """

    remote_class: str = ""


_remote_classes: dict[str, type[RemoteError]] = {}


def rebuild_exception(path: str, args: list[Any], attrs: dict[str, Any], text: str) -> BaseException:
    """The exception `path(*args)` with its plain attributes, without running its __init__.

    Builtin exceptions and this package's own are rebuilt as their class (so
    `except UnsupportedField` and `isinstance(e, ValueError)` work across the
    boundary); any other class becomes a RemoteError subclass of the same name.
    """
    module, _, qualname = path.partition(":")
    cls: Any = None
    if module == "builtins":
        cls = getattr(builtins, qualname, None)
    elif module.split(".")[0] == __name__.split(".")[0]:
        try:
            cls = import_class(path)
        except (ImportError, AttributeError):
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = _remote_classes.get(path)
        if cls is None:
            cls = type(qualname.rsplit(".", 1)[-1], (RemoteError,), {"remote_class": path})
            _remote_classes[path] = cls
        exc = cls(text)
        exc.__dict__.update(attrs)
        return exc
    exc = cls.__new__(cls)
    exc.args = tuple(args)
    exc.__dict__.update(attrs)
    return exc
