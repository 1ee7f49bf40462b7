"""Ulysses: all-to-all from [seq/W, all heads] to [all seq, heads/W] and back.

Each rank then runs ordinary attention (attention_block) over the whole
sequence for its share of the heads. Query heads must divide by W. K,V heads:
if Hkv divides by W each rank gets Hkv/W of them; if W divides by Hkv (GQA with
few kv heads) each rank gets the one kv head its query heads use, so a kv head
is sent to the W/Hkv ranks that need it and to no one else.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longtrain import ranges
from longtrain.kernels.attention import Bounds, attention_block
from longtrain.parallel.comm import COUNTERS, nbytes
from longtrain.parallel.sharding import Segment, segment_positions, segments_from_positions


def head_split(n_heads: int, world: int, what: str, q_heads: int | None = None) -> list[list[int]]:
    """Head indices each of `world` ranks receives. ValueError when heads cannot be split."""
    if n_heads % world == 0:
        per = n_heads // world
        return [list(range(j * per, (j + 1) * per)) for j in range(world)]
    if q_heads is not None and world % n_heads == 0:
        per_kv = world // n_heads  # ranks sharing one kv head
        return [[j // per_kv] for j in range(world)]
    raise ValueError(f"Ulysses needs the {what} heads ({n_heads}) divisible by the sequence-parallel "
                     f"degree ({world})" + (" or the degree divisible by them" if q_heads else ""))


def _a2a(send: torch.Tensor, group, kind: str) -> torch.Tensor:
    """all_to_all_single on dim 0 of send [W, ...]; slot j goes to rank j."""
    send = send.contiguous()
    recv = torch.empty_like(send)
    with ranges.scope("sp_comm/all_to_all"):
        dist.all_to_all_single(recv, send, group=group)
    w = send.shape[0]
    per = nbytes(send) // w
    COUNTERS.bytes_sent["a2a"] += per * (w - 1)
    COUNTERS.bytes_recv["a2a"] += per * (w - 1)
    COUNTERS.bytes_by_kind[kind] += per * (w - 1)
    COUNTERS.sends_by_kind[kind] += w - 1
    return recv


def _scatter_heads(x: torch.Tensor, heads: list[list[int]], group, kind: str) -> torch.Tensor:
    """[B, Sl, H, D] -> [B, W*Sl, h, D]: my head share over the shards of all ranks (rank order)."""
    w = len(heads)
    idx = torch.tensor(heads, device=x.device)  # [W, h]
    send = x[:, :, idx].permute(2, 0, 1, 3, 4)   # [W, B, Sl, h, D]
    recv = _a2a(send, group, kind)               # slot i: rank i's shard of my heads
    b, sl, h, d = recv.shape[1], recv.shape[2], recv.shape[3], recv.shape[4]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, w * sl, h, d)


def _gather_heads(y: torch.Tensor, heads: list[list[int]], n_heads: int, group, kind: str) -> torch.Tensor:
    """Inverse of _scatter_heads: [B, W*Sl, h, D] -> [B, Sl, H, D]; duplicated heads are summed."""
    w = len(heads)
    b, s, h, d = y.shape
    send = y.reshape(b, w, s // w, h, d).permute(1, 0, 2, 3, 4)  # slot i: rows of rank i
    recv = _a2a(send, group, kind)                               # slot j: my rows of rank j's heads
    out = y.new_zeros(b, s // w, n_heads, d)
    idx = torch.tensor(heads, device=y.device).reshape(-1)
    out.index_add_(2, idx, recv.permute(1, 2, 0, 3, 4).reshape(b, s // w, w * h, d))
    return out


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, heads, group, kind):
        ctx.heads, ctx.group, ctx.kind, ctx.n = heads, group, kind, x.shape[2]
        return _scatter_heads(x, heads, group, kind)

    @staticmethod
    def backward(ctx, g):
        return _gather_heads(g.contiguous(), ctx.heads, ctx.n, ctx.group, ctx.kind + "_grad"), None, None, None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, heads, n_heads, group, kind):
        ctx.heads, ctx.group, ctx.kind = heads, group, kind
        return _gather_heads(y, heads, n_heads, group, kind)

    @staticmethod
    def backward(ctx, g):
        return _scatter_heads(g.contiguous(), ctx.heads, ctx.group, ctx.kind + "_grad"), None, None, None, None


def gather_sequence(q, k, v, group, rank: int, world: int, segs: tuple[tuple[Segment, ...], ...]):
    """All-to-all q, k, v into head shares over the group's whole token set, sorted by position.

    Returns (q, k, v, q_head_split, positions-sorted segments, permutation or None).
    """
    hq, hkv = q.shape[2], k.shape[2]
    qh = head_split(hq, world, "query")
    kvh = head_split(hkv, world, "key/value", q_heads=hq) if hkv != hq else qh
    qg = SeqToHeads.apply(q, qh, group, "a2a_q")
    kg = SeqToHeads.apply(k, kvh, group, "a2a_k")
    vg = SeqToHeads.apply(v, kvh, group, "a2a_v")
    pos = torch.cat([segment_positions(segs[j]) for j in range(world)])
    perm = torch.argsort(pos)
    if torch.equal(perm, torch.arange(pos.numel())):
        perm = None
    else:
        idx = perm.to(q.device)
        qg, kg, vg = (t.index_select(1, idx) for t in (qg, kg, vg))
        pos = pos[perm]
    return qg, kg, vg, qh, segments_from_positions(pos.tolist()), perm


def scatter_sequence(out: torch.Tensor, qh: list[list[int]], n_heads: int, group,
                     perm: torch.Tensor | None) -> torch.Tensor:
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        out = out.index_select(1, inv.to(out.device))
    return HeadsToSeq.apply(out, qh, n_heads, group, "a2a_out")


def ulysses_attention(q, k, v, group, rank: int, world: int, segs, *, causal: bool,
                      scale: float, window: int | None, bounds: Bounds | None) -> torch.Tensor:
    """Local shards [B, S/W, H, D] in; local output shard out. Differentiable."""
    qg, kg, vg, qh, gsegs, perm = gather_sequence(q, k, v, group, rank, world, segs)
    if len(gsegs) != 1 or gsegs[0][0] != 0:
        raise ValueError(f"ulysses expects the group to hold the whole sequence, got runs {gsegs}")
    out, _ = attention_block(qg, kg, vg, causal=causal, softmax_scale=scale, window=window,
                             cu_seqlens=bounds)
    COUNTERS.compute_blocks += 1
    COUNTERS.compute_pairs += qg.shape[1] * kg.shape[1]
    return scatter_sequence(out, qh, q.shape[2], group, perm)
