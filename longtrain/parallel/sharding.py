"""Which tokens live on which sequence-parallel rank, and which blocks of them interact.

Layouts over W ranks of a sequence of S tokens:
  zigzag      2W chunks of S/(2W); rank r holds chunks r and 2W-1-r (in that order).
              Balances causal attention: every rank does the same work.
  contiguous  W chunks of S/W; rank r holds chunk r.
A world of one rank is the identity for both.

`shard_sequence` / `unshard_sequence` move tensors (tokens, labels, activations)
between the full and the local view; `shard_positions` gives the true global
positions of the local tokens (for RoPE). `plan_pair` is the block planner that
ring / TokenRing use: which (query rows, key rows) calls a pair of ranks needs,
skipping pairs that the causal / window / document masks make empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.distributed as dist

from longtrain.kernels.attention import Bounds, classify_block

LAYOUTS = ("zigzag", "contiguous")
Segment = tuple[int, int]  # (global start, length)


def group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def layout_segments(seq_len: int, world_size: int, layout: str = "zigzag") -> tuple[tuple[Segment, ...], ...]:
    """Per rank, the global (start, length) runs of its tokens in local order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    w = world_size
    if w == 1:
        return (((0, seq_len),),)
    n = 2 * w if layout == "zigzag" else w
    if seq_len % n:
        raise ValueError(f"{layout} layout over {w} ranks needs seq_len divisible by {n}, got {seq_len}")
    c = seq_len // n
    if layout == "contiguous":
        return tuple(((r * c, c),) for r in range(w))
    return tuple(((r * c, c), ((2 * w - 1 - r) * c, c)) for r in range(w))


def segments_from_positions(pos: Sequence[int]) -> tuple[Segment, ...]:
    """Maximal runs of consecutive positions, in the given order."""
    segs: list[list[int]] = []
    for p in pos:
        if segs and segs[-1][0] + segs[-1][1] == p:
            segs[-1][1] += 1
        else:
            segs.append([int(p), 1])
    return tuple((a, n) for a, n in segs)


def segment_positions(segs: Sequence[Segment]) -> torch.Tensor:
    return torch.cat([torch.arange(a, a + n) for a, n in segs])


def shard_positions(seq_len: int, group: dist.ProcessGroup | None = None, layout: str = "zigzag", *,
                    rank: int | None = None, world_size: int | None = None) -> torch.Tensor:
    """Global positions (int64 [seq_len / W]) of this rank's tokens, in local order.

    Give either a process group (None: the default group) or explicit rank and world_size.
    """
    if rank is None or world_size is None:
        if rank is not None or world_size is not None:
            raise ValueError("give both rank and world_size, or neither")
        rank, world_size = group_rank_world(group)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    return segment_positions(layout_segments(seq_len, world_size, layout)[rank])


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1,
                   layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of the full tensor x along `dim` (a new contiguous tensor)."""
    rank, w = group_rank_world(group)
    if w == 1:
        return x
    segs = layout_segments(x.shape[dim], w, layout)[rank]
    return torch.cat([x.narrow(dim, a, n) for a, n in segs], dim=dim).contiguous()


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 of stacked shards; backward sums the full gradient over ranks."""

    @staticmethod
    def forward(ctx, x, group, w, rank):
        ctx.group, ctx.rank = group, rank
        bufs = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(bufs, x.contiguous(), group=group)
        return torch.stack(bufs)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank], None, None, None


def unshard_sequence(x_local: torch.Tensor, group: dist.ProcessGroup | None = None, dim: int = 1,
                     layout: str = "zigzag") -> torch.Tensor:
    """Full tensor in natural order from every rank's shard (all-gather).

    Differentiable like torch.distributed.nn.all_gather: the gradient of the local
    shard is the sum over ranks of the gradients of its slice of the full tensor.
    """
    rank, w = group_rank_world(group)
    if w == 1:
        return x_local
    xm = x_local.movedim(dim, 0)
    gathered = _AllGatherSeq.apply(xm, group, w, rank)  # [W, S/W, ...] in layout order
    full_order = gathered.reshape(w * xm.shape[0], *xm.shape[1:])
    perm = torch.cat([segment_positions(s) for s in layout_segments(w * xm.shape[0], w, layout)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return full_order.index_select(0, inv.to(x_local.device)).movedim(0, dim)


# ----------------------------------------------------------------------------- block planning


@dataclass(frozen=True)
class Call:
    """One attention_block call: local query rows [q0, q1) against local key rows [k0, k1).

    kind: "full" (no mask), "masked" (q_offset/k_offset, the global positions of the
    first row and key, give the masks; the call spans one segment on each side), or
    "local_causal" (causal in local order, which equals global causal order there).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    q_offset: int
    k_offset: int
    kind: str


@dataclass(frozen=True)
class PairPlan:
    """What owner o's queries need from holder h's keys: the calls and the query rows used."""

    calls: tuple[Call, ...]

    @property
    def empty(self) -> bool:
        return not self.calls

    @property
    def rows(self) -> tuple[int, int]:
        return min(c.q0 for c in self.calls), max(c.q1 for c in self.calls)

    def shifted(self, dq: int) -> "PairPlan":
        return PairPlan(tuple(Call(c.q0 - dq, c.q1 - dq, c.k0, c.k1, c.q_offset, c.k_offset, c.kind)
                              for c in self.calls))

    @property
    def pairs(self) -> int:
        return sum((c.q1 - c.q0) * (c.k1 - c.k0) for c in self.calls)


def _same_doc(segs: Sequence[Segment], bounds: Bounds) -> bool:
    lo, hi = segs[0][0], segs[-1][0] + segs[-1][1] - 1
    return classify_block(lo, hi - lo + 1, lo, hi - lo + 1, causal=False, bounds=bounds) == "full"


def _local_starts(segs: Sequence[Segment]) -> list[int]:
    out, acc = [], 0
    for _, n in segs:
        out.append(acc)
        acc += n
    return out


@lru_cache(maxsize=4096)
def plan_pair(q_segs: tuple[Segment, ...], k_segs: tuple[Segment, ...], causal: bool,
              window: int | None, bounds: Bounds | None) -> PairPlan:
    """Calls that attend queries laid out as q_segs to keys laid out as k_segs.

    Empty segment pairs are dropped; full ones that share a query segment (or a key
    segment) and are adjacent locally are fused into one unmasked call.
    """
    qs, ks = _local_starts(q_segs), _local_starts(k_segs)
    kind = [[classify_block(qa, qn, ka, kn, causal=causal, window=window, bounds=bounds)
             for (ka, kn) in k_segs] for (qa, qn) in q_segs]
    nq, nk = len(q_segs), len(k_segs)

    def single(i: int, j: int) -> Call:
        return Call(qs[i], qs[i] + q_segs[i][1], ks[j], ks[j] + k_segs[j][1], q_segs[i][0],
                    k_segs[j][0], "full" if kind[i][j] == "full" else "masked")

    def fuse(line: list[tuple[int, int]], by_row: bool) -> list[Call]:
        live = [(i, j) for i, j in line if kind[i][j] != "empty"]
        if len(live) > 1 and all(kind[i][j] == "full" for i, j in live):
            idx = [j if by_row else i for i, j in live]
            if idx == list(range(idx[0], idx[0] + len(idx))):  # adjacent in local order
                first, last = single(*live[0]), single(*live[-1])
                if by_row:
                    return [Call(first.q0, first.q1, first.k0, last.k1, first.q_offset, first.k_offset, "full")]
                return [Call(first.q0, last.q1, first.k0, first.k1, first.q_offset, first.k_offset, "full")]
        return [single(i, j) for i, j in live]

    nq_rows, nk_rows = qs[-1] + q_segs[-1][1], ks[-1] + k_segs[-1][1]
    if all(kind[i][j] == "full" for i in range(nq) for j in range(nk)):
        return PairPlan((Call(0, nq_rows, 0, nk_rows, q_segs[0][0], k_segs[0][0], "full"),))
    ascending = all(a + n <= b for (a, n), (b, _) in zip(q_segs, q_segs[1:]))
    if causal and window is None and q_segs == k_segs and ascending and nq > 1 and (
            bounds is None or _same_doc(q_segs, bounds)):
        # zigzag diagonal: local order is global order, so one top-left causal call is exact
        return PairPlan((Call(0, nq_rows, 0, nk_rows, 0, 0, "local_causal"),))
    by_rows = [c for i in range(nq) for c in fuse([(i, j) for j in range(nk)], True)]
    by_cols = [c for j in range(nk) for c in fuse([(i, j) for i in range(nq)], False)]
    return PairPlan(tuple(by_rows if len(by_rows) <= len(by_cols) else by_cols))
