"""TokenRing: K,V stay home; queries travel, partial results come back.

Forward, at step s = 1..W-1 rank r
  - receives the query rows of owner r-s that its keys can see, and sends its own
    query rows to r+s (only the rows rank r+s needs; nothing if the masks make the
    pair empty) — one communicator ("up" direction);
  - attends the received queries to its local K,V and sends the partial
    (out in the input dtype, lse fp32) straight back to owner r-s, while it
    receives the partial for its own queries from r+s — a second communicator
    ("down" direction), so on a full mesh both directions of every link carry
    data at once and both overlap compute.
The next step's queries are in flight while the current step computes; partials
are merged one step late so their transfer overlaps the next computation.
Sending each query block directly to its holder (instead of forwarding it around
the ring) moves the same bytes per rank and lets empty pairs send nothing.

Backward (upstream TokenRing has none): the same pattern. With the queries
travel dO and, per row, lse and delta = rowsum(dO * out) (fp32), which is all the
holder needs from `out`; dK, dV accumulate at home in fp32 because K,V never
leave; the dQ partials go back to the owner and are summed in fp32.
"""

from __future__ import annotations

import os

import torch

from longtrain.parallel.comm import P2P, wait
from longtrain.parallel.ring_common import RingSpec, attention_function, backward_calls, forward_calls, merge_, new_acc


def prefetch_depth() -> int:
    """Steps of queries kept in flight ahead of the computation (LONGTRAIN_TOKENRING_PREFETCH).

    1 = the next step only (least memory). Larger values post several query blocks at
    once: on a full mesh each goes over its own link, so transfers run in parallel;
    each extra step costs one more query-sized receive buffer.
    """
    return max(1, int(os.environ.get("LONGTRAIN_TOKENRING_PREFETCH", "2")))


class _Ahead:
    """Query transfers posted up to `depth` steps ahead of the step being computed."""

    def __init__(self, post, world: int):
        self.post, self.world, self.depth = post, world, prefetch_depth()
        self.posted: dict[int, object] = {}
        self.next = 1

    def fill(self, step: int) -> None:
        while self.next < self.world and self.next <= step + self.depth:
            self.posted[self.next] = self.post(self.next)
            self.next += 1

    def pop(self, step: int):
        return self.posted.pop(step)


def tokenring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rs: RingSpec
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    r, w = rs.rank, rs.world
    b, _, h, d = q.shape
    acc_out, acc_lse = new_acc(q)

    def post_q(s: int):
        """Queries for step s: mine to r+s, owner r-s's to me. Returns (plan, rows, buffer, works)."""
        p2p = P2P(rs.group)
        src_plan = rs.plan(r - s, r)
        buf = rows = None
        if not src_plan.empty:
            rows = src_plan.rows
            buf = p2p.recv(q.new_empty(b, rows[1] - rows[0], h, d), (r - s) % w, "up", tag=s)
        dst_plan = rs.plan(r, r + s)
        if not dst_plan.empty:
            a, e = dst_plan.rows
            p2p.send(q[:, a:e], (r + s) % w, "q", "up", tag=s)
        return src_plan, rows, buf, p2p.start()

    def post_partial(s: int, out_p, lse_p):
        """Partial of owner r-s back to it; the partial of my queries from r+s to me."""
        p2p = P2P(rs.twin, rs.twin_tag)
        mine = rs.plan(r, r + s)
        got = None
        if not mine.empty:
            a, e = mine.rows
            got = (a, e, p2p.recv(q.new_empty(b, e - a, h, d), (r + s) % w, "down", tag=2 * s),
                   p2p.recv(torch.empty(b, h, e - a, dtype=torch.float32, device=q.device),
                            (r + s) % w, "down", tag=2 * s + 1))
        if out_p is not None:
            p2p.send(out_p, (r - s) % w, "partial", "down", tag=2 * s)
            p2p.send(lse_p, (r - s) % w, "partial", "down", tag=2 * s + 1, count_block=False)
        return got, p2p.start()

    inflight = _Ahead(post_q, w)
    inflight.fill(0)
    forward_calls(q, k, v, rs.plan(r, r), rs, acc_out, acc_lse)
    pending = None  # partials in flight, merged one step later
    sends = []
    for s in range(1, w):
        inflight.fill(s)
        plan, rows, buf, works = inflight.pop(s)
        wait(works)
        out_p = lse_p = None
        if not plan.empty:
            po, pl = new_acc(buf)
            forward_calls(buf, k, v, plan.shifted(rows[0]), rs, po, pl)
            out_p, lse_p = po.to(q.dtype), pl
        got, pworks = post_partial(s, out_p, lse_p)
        sends.append(pworks)
        if pending is not None:
            _merge_partial(pending, acc_out, acc_lse)
        pending = (got, pworks)
    if pending is not None:
        _merge_partial(pending, acc_out, acc_lse)
    for works in sends:
        wait(works)
    return acc_out.to(q.dtype), acc_lse


def _merge_partial(pending, acc_out, acc_lse) -> None:
    got, works = pending
    wait(works)
    if got is not None:
        a, e, o, l = got
        merge_(acc_out[:, a:e], acc_lse[:, :, a:e], o, l)


def tokenring_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, rs: RingSpec
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, w = rs.rank, rs.world
    b, _, h, d = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.zeros(q.shape, **f32)
    dk = torch.zeros(k.shape, **f32)
    dv = torch.zeros(v.shape, **f32)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B,H,S]
    qd = torch.stack([q, dout.to(q.dtype)])       # travels together
    ld = torch.stack([lse, delta])                # fp32 [2,B,H,S]

    def post_q(s: int):
        p2p = P2P(rs.group)
        src_plan = rs.plan(r - s, r)
        got = None
        if not src_plan.empty:
            a, e = src_plan.rows
            got = (src_plan.shifted(a), e - a,
                   p2p.recv(q.new_empty(2, b, e - a, h, d), (r - s) % w, "up", tag=2 * s),
                   p2p.recv(torch.empty(2, b, h, e - a, **f32), (r - s) % w, "up", tag=2 * s + 1))
        dst_plan = rs.plan(r, r + s)
        if not dst_plan.empty:
            a, e = dst_plan.rows
            p2p.send(qd[:, :, a:e], (r + s) % w, "q_bwd", "up", tag=2 * s)
            p2p.send(ld[..., a:e], (r + s) % w, "q_bwd", "up", tag=2 * s + 1, count_block=False)
        return got, p2p.start()

    def post_dq(s: int, dq_p):
        p2p = P2P(rs.twin, rs.twin_tag)
        mine = rs.plan(r, r + s)
        got = None
        if not mine.empty:
            a, e = mine.rows
            got = (a, e, p2p.recv(q.new_empty(b, e - a, h, d), (r + s) % w, "down", tag=s))
        if dq_p is not None:
            p2p.send(dq_p, (r - s) % w, "dq", "down", tag=s)
        return got, p2p.start()

    inflight = _Ahead(post_q, w)
    inflight.fill(0)
    backward_calls(dout, q, k, v, out, lse, None, rs.plan(r, r), rs, dq, dk, dv)
    pending = None
    sends = []
    for s in range(1, w):
        inflight.fill(s)
        got, works = inflight.pop(s)
        wait(works)
        dq_p = None
        if got is not None:
            plan, n, qd_in, ld_in = got
            acc = torch.zeros(b, n, h, d, **f32)
            backward_calls(qd_in[1], qd_in[0], k, v, None, ld_in[0], ld_in[1], plan, rs, acc, dk, dv)
            dq_p = acc.to(q.dtype)
        got_dq, dworks = post_dq(s, dq_p)
        sends.append(dworks)
        if pending is not None:
            _add_dq(pending, dq)
        pending = (got_dq, dworks)
    if pending is not None:
        _add_dq(pending, dq)
    for works in sends:
        wait(works)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _add_dq(pending, dq) -> None:
    got, works = pending
    wait(works)
    if got is not None:
        a, e, g = got
        dq[:, a:e] += g


TokenRingAttention = attention_function("TokenRingAttention", tokenring_forward, tokenring_backward)
