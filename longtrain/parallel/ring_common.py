"""What ring attention and TokenRing share: the problem as a ring of ranks sees it (`RingSpec`: which
block pairs interact, how many hops are needed), the fp32 log-sum-exp merge of partial results, the
per-pair forward/backward call loops, and one autograd wrapper for both schedules. Each schedule
itself is one file read top to bottom: ring.py (K,V travel), tokenring.py (queries travel)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.distributed as dist

from longtrain.kernels.attention import BlockSpec, Bounds, block_backward, block_forward
from longtrain.parallel.comm import COUNTERS
from longtrain.parallel.sharding import Call, PairPlan, Segment, plan_pair


NEG_INF = float("-inf")


@dataclass(frozen=True, eq=False)
class RingSpec:
    """One sequence-parallel attention problem as seen by a ring of ranks."""

    group: dist.ProcessGroup | None
    twin: dist.ProcessGroup | None   # second communicator over the same ranks
    rank: int
    world: int
    segs: tuple[tuple[Segment, ...], ...]  # per ring rank: global runs of its local tokens
    causal: bool
    window: int | None
    bounds: Bounds | None
    scale: float
    twin_tag: int = 0  # tag offset of the second stream (non-zero when twin is group itself)

    def plan(self, owner: int, holder: int) -> PairPlan:
        """Calls for owner's queries against holder's keys."""
        return plan_pair(self.segs[owner % self.world], self.segs[holder % self.world], self.causal,
                         self.window, self.bounds)

    def spec(self, c: Call) -> BlockSpec:
        if c.kind == "full":
            return BlockSpec(c.q1 - c.q0, c.k1 - c.k0, False, self.scale, None, 0, 0, None)
        if c.kind == "local_causal":
            return BlockSpec(c.q1 - c.q0, c.k1 - c.k0, True, self.scale, None, 0, 0, None)
        return BlockSpec(c.q1 - c.q0, c.k1 - c.k0, self.causal, self.scale, self.window, c.q_offset,
                     c.k_offset, self.bounds)

    @cached_property
    def hops(self) -> int:
        """Ring steps needed: the furthest hop any rank needs K,V from."""
        d = 0
        for r in range(self.world):
            for s in range(1, self.world):
                if not self.plan(r, r - s).empty:
                    d = max(d, s)
        return d


def merge_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge a partial (out [B,S,H,D], lse fp32 [B,H,S]) into fp32 accumulators in place.

    new = logaddexp(lse_acc, lse); each side is weighted by exp(its lse - new) <= 1.
    Rows where both sides are -inf stay out = 0, lse = -inf (no NaN).
    """
    new = torch.logaddexp(acc_lse, lse)
    base = new.masked_fill(new == NEG_INF, 0.0)
    a = torch.exp(acc_lse - base).transpose(1, 2).unsqueeze(-1)
    b = torch.exp(lse - base).transpose(1, 2).unsqueeze(-1)
    acc_out.mul_(a).add_(out.float() * b)
    acc_lse.copy_(new)


def forward_calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PairPlan, rs: RingSpec,
                  acc_out: torch.Tensor, acc_lse: torch.Tensor) -> None:
    """Run every call of `plan` (rows/keys local to q and k) and merge into the accumulators."""
    for c in plan.calls:
        o, l = block_forward(q[:, c.q0:c.q1], k[:, c.k0:c.k1], v[:, c.k0:c.k1], rs.spec(c))
        COUNTERS.compute_blocks += 1
        COUNTERS.compute_pairs += (c.q1 - c.q0) * (c.k1 - c.k0)
        merge_(acc_out[:, c.q0:c.q1], acc_lse[:, :, c.q0:c.q1], o, l)


def backward_calls(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor | None, lse: torch.Tensor, delta: torch.Tensor | None,
                   plan: PairPlan, rs: RingSpec, dq: torch.Tensor, dk: torch.Tensor,
                   dv: torch.Tensor) -> None:
    """Accumulate the gradients of every call of `plan` into dq/dk/dv (any float dtype)."""
    for c in plan.calls:
        rows = slice(c.q0, c.q1)
        keys = slice(c.k0, c.k1)
        g = block_backward(dout[:, rows], q[:, rows], k[:, keys], v[:, keys],
                           None if out is None else out[:, rows], lse[:, :, rows], rs.spec(c),
                           delta=None if delta is None else delta[:, :, rows])
        COUNTERS.backward_blocks += 1
        dq[:, rows] += g[0]
        dk[:, keys] += g[1]
        dv[:, keys] += g[2]


def new_acc(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d = q.shape
    return (torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device),
            torch.full((b, h, s), NEG_INF, dtype=torch.float32, device=q.device))


Schedule = Callable[..., tuple[torch.Tensor, ...]]


def attention_function(name: str, forward: Schedule, backward: Schedule) -> type[torch.autograd.Function]:
    """An autograd Function running `forward(q, k, v, rs) -> (out, lse)` and
    `backward(dout, q, k, v, out, lse, rs) -> (dq, dk, dv)`; apply(q, k, v, rs) -> out."""

    def fwd(ctx, q, k, v, rs: RingSpec):
        out, lse = forward(q, k, v, rs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rs = rs
        return out

    def bwd(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, ctx.rs)
        return dq, dk, dv, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
