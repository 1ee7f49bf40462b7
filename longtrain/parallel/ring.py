"""Ring attention: K,V travel r -> r+1 while every rank attends its queries to them.

Forward: W ranks, step s uses the K,V block of rank r-s; the next block is
received (batched isend/irecv, receive posted first) while the current one is
computed. Partial (out, lse) merge into fp32 accumulators (REFERENCES §1).
Backward: K,V rotate again; the dK,dV accumulator of each block starts at its
first remote holder, travels with it on a second communicator and arrives home
after the last hop (W-1 sends; the owner keeps its own share locally); dQ
accumulates locally in fp32. Blocks the masks make empty are not computed; when no rank
needs K,V from further than d < W-1 hops (windows with a contiguous layout) the
ring stops after d hops and the dK,dV accumulators jump home directly.

Also home of the pieces TokenRing shares: `RingSpec`, the fp32 merge and the
per-call forward/backward loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from longtrain.kernels.attention import Bounds, _Spec, block_backward, block_forward
from longtrain.parallel.comm import COUNTERS, P2P, wait
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

    def spec(self, c: Call) -> _Spec:
        if c.kind == "full":
            return _Spec(c.q1 - c.q0, c.k1 - c.k0, False, self.scale, None, 0, 0, None)
        if c.kind == "local_causal":
            return _Spec(c.q1 - c.q0, c.k1 - c.k0, True, self.scale, None, 0, 0, None)
        return _Spec(c.q1 - c.q0, c.k1 - c.k0, self.causal, self.scale, self.window, c.q_offset,
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


def _new_acc(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d = q.shape
    return (torch.zeros(b, s, h, d, dtype=torch.float32, device=q.device),
            torch.full((b, h, s), NEG_INF, dtype=torch.float32, device=q.device))


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rs: RingSpec
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q.dtype, lse fp32) of the local queries against the whole ring's keys."""
    r, w, d = rs.rank, rs.world, rs.hops
    acc_out, acc_lse = _new_acc(q)
    kv = torch.stack([k, v])
    for s in range(d + 1):
        works = None
        if s < d:
            nxt = torch.empty_like(kv)
            p2p = P2P(rs.group)
            p2p.recv(nxt, r - 1 if r else w - 1, "up", tag=s)
            p2p.send(kv, (r + 1) % w, "kv", "up", tag=s)
            works = p2p.start()
        forward_calls(q, kv[0], kv[1], rs.plan(r, r - s), rs, acc_out, acc_lse)
        if s < d:
            wait(works)
            kv = nxt
    return acc_out.to(q.dtype), acc_lse


def ring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, rs: RingSpec
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, w, d = rs.rank, rs.world, rs.hops
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    mine = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # own block's grads stay here
    incoming = None      # (handles, buffer): accumulator of the block held at the next step
    home = None
    sends = []
    for s in range(d + 1):
        kv_works = None
        if s < d:
            nxt = torch.empty_like(kv)
            p2p = P2P(rs.group)
            p2p.recv(nxt, (r - 1) % w, "up", tag=s)
            p2p.send(kv, (r + 1) % w, "kv_bwd", "up", tag=s)
            kv_works = p2p.start()
        if s == 0:
            backward_calls(dout, q, k, v, out, lse, None, rs.plan(r, r), rs, dq, mine[0], mine[1])
        else:
            # the accumulator of block r-s started at its first remote holder; it goes on to
            # r+1, or home to r-d after the last hop (W-1 sends per rank when d = W-1)
            acc = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            backward_calls(dout, q, kv[0], kv[1], out, lse, None, rs.plan(r, r - s), rs, dq, acc[0], acc[1])
            if incoming is not None:
                wait(incoming[0])
                acc += incoming[1]
            last = s == d
            direction = "up" if (not last or d == w - 1) else "down"
            p2p = P2P(rs.twin, rs.twin_tag)
            buf = p2p.recv(torch.empty_like(acc), (r + d) % w if last else (r - 1) % w, direction, tag=s)
            p2p.send(acc, (r - d) % w if last else (r + 1) % w, "dkv", direction, tag=s)
            handles = p2p.start()
            sends.append(handles)
            if last:
                home = (handles, buf)
            else:
                incoming = (handles, buf)
        if s < d:
            wait(kv_works)
            kv = nxt
    if home is not None:
        wait(home[0])
        mine += home[1]
    for handles in sends:
        wait(handles)
    return dq.to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rs: RingSpec):
        out, lse = ring_forward(q, k, v, rs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rs = rs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.rs)
        return dq, dk, dv, None
