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

The pieces TokenRing shares (RingSpec, the fp32 merge, the per-call loops, the autograd
wrapper) live in ring_common.py.
"""

from __future__ import annotations

import torch

from longtrain.parallel.comm import P2P, wait
from longtrain.parallel.ring_common import RingSpec, attention_function, backward_calls, forward_calls, new_acc


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rs: RingSpec
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in q.dtype, lse fp32) of the local queries against the whole ring's keys."""
    r, w, d = rs.rank, rs.world, rs.hops
    acc_out, acc_lse = new_acc(q)
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


RingAttention = attention_function("RingAttention", ring_forward, ring_backward)
