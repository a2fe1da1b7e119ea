"""What the BAGEL diffusion stage receives per request: the prefilled context.

BAGEL generates an image by running its latent tokens through the generation
expert while they attend to the KV cache of a context that the understanding
side prefilled (text; for img2img also the input image as VAE and ViT tokens).
Classifier-free guidance needs one such context per branch:

    cond       the full context                     (text2img: prompt;
                                                     img2img: image + prompt)
    cfg_text   the context without the prompt text  (text2img: empty, or the
                                                     negative prompt; img2img: image)
    cfg_img    the context without the input image  (img2img only: prompt)

This module is the ONE shape of that hand-over, the DiT stage's typed stage
input (diffusion/handover.py): the AR hand-over builds it from the KV the
connector transferred (families/bagel/orchestrator.py); a standalone DiT
builds it without vLLM (`encode_context`). Everything in it is keyed by
request id, never by arrival order (ARCHITECTURE.md, principle 6).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Union

import torch

from ....kv.store import KVHandle


@dataclass(frozen=True)
class BranchKV:
    """The prefilled KV cache of one CFG branch.

    keys[i], values[i]: layer i, shape (tokens, kv_heads, head_dim) -- the layout
        vLLM's paged caches hold per token once the block dimension is gathered.
        Keys are stored as the attention consumes them: after k_norm and after
        RoPE at each token's own position (vLLM caches post-RoPE keys).
        `tokens` may be 0 (BAGEL's text2img text-CFG branch is an empty context).
    latent_position: the RoPE position every generated token shares (BAGEL puts
        the whole image block -- start marker, latents, end marker -- at one
        position): the next position after the context.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    latent_position: int

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError(f"BranchKV needs one (K, V) pair per layer, got {len(self.keys)} keys, {len(self.values)} values")
        shape = self.keys[0].shape
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.dim() != 3 or k.shape != shape or v.shape != shape:
                raise ValueError(
                    f"layer {i}: K {tuple(k.shape)} / V {tuple(v.shape)}; expected both "
                    f"(tokens, kv_heads, head_dim) = {tuple(shape)} in every layer"
                )
        if self.latent_position < 0:
            raise ValueError(f"latent_position must be >= 0, got {self.latent_position}")

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "BranchKV":
        move = lambda ts: tuple(t.to(device=device, dtype=dtype) for t in ts)  # noqa: E731
        return BranchKV(move(self.keys), move(self.values), self.latent_position)


@dataclass(frozen=True)
class BranchRef:
    """A CFG branch's KV still in the AR stage's transfer store (kv/store.py): its `KVHandle`.

    What the hand-over gives the DiT stage so the KV crosses to the stage's process (if it
    has its own) through the store's shared memory -- a file under /dev/shm on CPU, a CUDA IPC
    handle on GPU -- and never through the request's message: the DiT stage reads it once,
    where it runs, when it prepares the request (`BagelContext.loaded`).
    """

    kv: KVHandle
    latent_position: int

    @property
    def num_tokens(self) -> int:
        return self.kv.num_tokens

    @property
    def num_layers(self) -> int:
        return self.kv.num_layers

    def load(self) -> BranchKV:
        """Read the branch (the store's file is freed as it is read)."""
        t = self.kv.take()
        return BranchKV(t.keys, t.values, self.latent_position)


Branch = Union[BranchKV, BranchRef]


@dataclass(frozen=True)
class BagelContext:
    """One request's hand-over from the AR stage to the diffusion stage.

    height, width: the target image size in pixels (multiples of the latent
    downsample, 16 for BAGEL). `cfg_img` is None for text2img. A branch is its KV
    (`BranchKV`) or a reference to it in the transfer store (`BranchRef`, what the AR
    hand-over makes), read by `loaded()` in the DiT stage's process.
    """

    request_id: str
    cond: Branch
    cfg_text: Branch
    cfg_img: Branch | None
    height: int
    width: int

    def __post_init__(self) -> None:
        layers = {b.num_layers for b in self.branches().values()}
        if len(layers) != 1:
            raise ValueError(f"request {self.request_id}: branches disagree on the layer count {sorted(layers)}")

    @property
    def is_img2img(self) -> bool:
        return self.cfg_img is not None

    def loaded(self) -> "BagelContext":
        """This context with every branch's KV read (from the transfer store: `BranchRef.load`)."""
        if not any(isinstance(b, BranchRef) for b in self.branches().values()):
            return self
        load = lambda b: b.load() if isinstance(b, BranchRef) else b  # noqa: E731
        return replace(self, cond=load(self.cond), cfg_text=load(self.cfg_text),
                       cfg_img=None if self.cfg_img is None else load(self.cfg_img))

    def discard(self) -> None:
        """Free what the store still holds for this context (a request that ended before its DiT
        stage read it: aborted, refused, its stage's process died); a no-op once read."""
        for b in self.branches().values():
            if isinstance(b, BranchRef):
                b.kv.discard()

    def branches(self) -> dict[str, Branch]:
        out = {"cond": self.cond, "cfg_text": self.cfg_text}
        if self.cfg_img is not None:
            out["cfg_img"] = self.cfg_img
        return out

    def token_counts(self) -> dict[str, int]:
        """Each branch's context length."""
        return {name: b.num_tokens for name, b in self.branches().items()}

    def shard(self, names: list[str]) -> "BagelContextShard":
        """The part one CFG-parallel rank of the DiT stage receives: the KV of the branches `names`.

        A branch still in the transfer store is read here (once: each branch runs on one rank), so
        the shard sent to a worker rank holds tensors, and rank 0 reads only its own branches."""
        branches = self.branches()
        load = lambda b: b.load() if isinstance(b, BranchRef) else b  # noqa: E731
        return BagelContextShard(self.request_id, {n: load(branches[n]) for n in names}, self.token_counts(),
                                 self.height, self.width, self.is_img2img)


@dataclass(frozen=True)
class BagelContextShard:
    """A BagelContext as one rank of a CFG-parallel DiT stage holds it (docs/bagel.md, "CFG-parallel").

    kv: the context KV of the branches this rank runs, by name; counts: every branch's context
    length (all ranks size a request's forwards alike, and so batch alike).
    """

    request_id: str
    kv: dict[str, BranchKV]
    counts: dict[str, int]
    height: int
    width: int
    is_img2img: bool

    def branches(self) -> dict[str, BranchKV]:
        return dict(self.kv)

    def loaded(self) -> "BagelContextShard":
        return self  # read when it was cut (BagelContext.shard)

    def discard(self) -> None:
        """Nothing held in the store: a shard's KV was read when it was cut."""

    def token_counts(self) -> dict[str, int]:
        return dict(self.counts)

    def shard(self, names: list[str]) -> "BagelContextShard":
        missing = set(names) - set(self.kv)
        if missing:
            raise ValueError(f"request {self.request_id}: this rank holds no KV of branch(es) {sorted(missing)}")
        return BagelContextShard(self.request_id, {n: self.kv[n] for n in names}, self.counts, self.height,
                                 self.width, self.is_img2img)
