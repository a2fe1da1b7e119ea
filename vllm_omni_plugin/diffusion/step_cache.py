"""Step caching for the DiT: a first-block cache kept per request and CFG branch.

Idea (First-Block Cache, as in para-attn's FBCache and cache-dit's DBCache F1B0):
after the first transformer block, compare this step's first-block residual
(`block0(x) - x` on the image tokens) with the one of the last step that ran in
full. If the relative L1 change is below the request's `cache_threshold`, the
remaining blocks are skipped and their residual from that last full step is
added instead; otherwise they run and the residuals are stored.

Why hand-written rather than cache-dit: cache-dit (and para-attn) keep ONE cache
per transformer call, which assumes one request per forward. Our engine batches
rows of different requests at different steps into one forward, so the cache
must be per (request, CFG branch), and the decision per row block: here a
forward runs the remaining blocks only on the rows that need them (the others
pass through untouched) and each request carries its residuals in its state.

Exactness: without a threshold (None, the default) nothing is stored and the
blocks are the transformer's own modules, called with the same tensors; with
threshold 0 a step is never skipped (a relative change is never < 0), so the
output equals no caching bit for bit. Only the Qwen-Image family's
`transformer_blocks` (dual-stream: `block(...) -> (text, image)`) is wired.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch


@dataclass
class RowBlock:
    """Rows [start, start+rows) of a forward belonging to one (request, branch); `store` is its cache."""

    start: int
    rows: int
    threshold: float | None
    store: dict[str, torch.Tensor]


@dataclass
class CacheContext:
    """The per-forward plan the block list reads while the transformer runs."""

    blocks: list[RowBlock]
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None  # SP ranks: AND of skip flags
    shard: Callable[[torch.Tensor], torch.Tensor] | None = None  # SP: this rank's part of a block input
    compute: torch.Tensor | None = None  # row indices that run the remaining blocks (None: all)
    after_first: torch.Tensor | None = None
    skipped: list[RowBlock] = field(default_factory=list)
    computed: list[RowBlock] = field(default_factory=list)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old| (FBCache's measure)."""
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


class CachedBlockList(torch.nn.ModuleList):
    """The transformer's block list; with a CacheContext set, iteration yields caching wrappers.

    Without a context (`context is None`, every request uncached), iteration yields
    the original blocks: the transformer runs exactly as before.
    """

    context: CacheContext | None = None
    #: (request, branch) blocks that skipped / ran the later blocks, over all forwards
    skipped: int = 0
    computed: int = 0

    def __iter__(self):
        ctx = self.context
        blocks = list(super().__iter__())
        if ctx is None or len(blocks) < 2:
            yield from blocks
            return
        yield _First(blocks[0], ctx)
        for block in blocks[1:-1]:
            yield _Rest(block, ctx)
        yield _Last(blocks[-1], ctx)


def _subset(kwargs: dict[str, Any], idx: torch.Tensor | None) -> dict[str, Any]:
    if idx is None:
        return kwargs
    out = dict(kwargs)
    for name in ("encoder_hidden_states_mask", "temb"):
        if out.get(name) is not None:
            out[name] = out[name].index_select(0, idx)
    return out


class _First:
    def __init__(self, block: torch.nn.Module, ctx: CacheContext) -> None:
        self.block, self.ctx = block, ctx

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs: Any):
        ctx = self.ctx
        text, image = self.block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs)
        residual = image - (ctx.shard(hidden_states) if ctx.shard is not None else hidden_states)
        wants = []
        for rb in ctx.blocks:
            first = residual[rb.start : rb.start + rb.rows]
            prev = rb.store.get("first")
            wants.append(
                rb.threshold is not None and prev is not None and "rest" in rb.store
                and relative_change(first, prev) < rb.threshold
            )
        skip = torch.tensor(wants, dtype=torch.bool)
        if ctx.agree is not None:
            skip = ctx.agree(skip)
        rows = []
        for rb, s in zip(ctx.blocks, skip.tolist()):
            if s:
                ctx.skipped.append(rb)
            else:
                ctx.computed.append(rb)
                if rb.threshold is not None:
                    rb.store["first"] = residual[rb.start : rb.start + rb.rows].clone()
                rows.extend(range(rb.start, rb.start + rb.rows))
        ctx.after_first = image
        if not ctx.skipped:
            return text, image
        ctx.compute = torch.tensor(rows, dtype=torch.long, device=image.device)
        return text.index_select(0, ctx.compute), image.index_select(0, ctx.compute)


class _Rest:
    def __init__(self, block: torch.nn.Module, ctx: CacheContext) -> None:
        self.block, self.ctx = block, ctx

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs: Any):
        if not self.ctx.computed:  # every row reuses its cache: nothing to run
            return encoder_hidden_states, hidden_states
        return self.block(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            **_subset(kwargs, self.ctx.compute),
        )


class _Last(_Rest):
    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs: Any):
        ctx = self.ctx
        text, image = super().__call__(hidden_states, encoder_hidden_states, **kwargs)
        base = ctx.after_first
        if not ctx.skipped:  # the plain path: store residuals of caching rows, output untouched
            for rb in ctx.computed:
                if rb.threshold is not None:
                    sl = slice(rb.start, rb.start + rb.rows)
                    rb.store["rest"] = image[sl] - base[sl]
            return text, image
        out = base.clone()
        if ctx.computed:
            out.index_copy_(0, ctx.compute, image)
            for rb in ctx.computed:
                if rb.threshold is not None:
                    sl = slice(rb.start, rb.start + rb.rows)
                    rb.store["rest"] = out[sl] - base[sl]
        for rb in ctx.skipped:
            sl = slice(rb.start, rb.start + rb.rows)
            out[sl] = base[sl] + rb.store["rest"]
        return text, out


def install(transformer: torch.nn.Module, attribute: str = "transformer_blocks") -> CachedBlockList:
    """Replace `transformer.<attribute>` by a CachedBlockList holding the same modules (same state-dict keys)."""
    blocks = getattr(transformer, attribute)
    if isinstance(blocks, CachedBlockList):
        return blocks
    cached = CachedBlockList(list(blocks))
    setattr(transformer, attribute, cached)
    return cached


@contextlib.contextmanager
def active(blocks: CachedBlockList, ctx: CacheContext) -> Iterator[CacheContext]:
    """Run the transformer with `ctx` (the block list yields caching wrappers meanwhile)."""
    blocks.context = ctx
    try:
        yield ctx
    finally:
        blocks.context = None
        blocks.skipped += len(ctx.skipped)
        blocks.computed += len(ctx.computed)
