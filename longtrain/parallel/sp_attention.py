"""`sequence_parallel_attention`: one entry point for ring, TokenRing, Ulysses and hybrid."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from longtrain.kernels.attention import as_bounds, attention_block, check_qkv, default_scale
from longtrain.parallel.comm import COUNTERS, split_group, twin_group
from longtrain.parallel.ring import RingAttention
from longtrain.parallel.ring_common import RingSpec
from longtrain.parallel.rules import SP_IMPLS, default_ulysses_degree
from longtrain.parallel.sharding import group_rank_world, layout_segments, segment_positions, segments_from_positions
from longtrain.parallel.tokenring import TokenRingAttention
from longtrain.parallel.ulysses import gather_sequence, head_split, scatter_sequence, ulysses_attention

ONE_COMM_TAG = 1 << 16  # tag offset of the second stream when both share one communicator


def _ring_spec(group, rank: int, world: int, segs, causal: bool, window, bounds, scale: float,
               one_communicator: bool) -> RingSpec:
    if one_communicator:
        return RingSpec(group, group, rank, world, segs, causal, window, bounds, scale, ONE_COMM_TAG)
    return RingSpec(group, twin_group(group), rank, world, segs, causal, window, bounds, scale)


def sequence_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                group: dist.ProcessGroup | None = None, *, impl: str = "tokenring",
                                causal: bool = True, layout: str = "zigzag",
                                softmax_scale: float | None = None, window: int | None = None,
                                cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                                ulysses_degree: int | None = None,
                                one_communicator: bool = False) -> torch.Tensor:
    """Attention over a sequence sharded across the ranks of `group` (None: default group).

    q [B, S/W, Hq, D], k/v [B, S/W, Hkv, D] are this rank's shards in `layout`
    ("zigzag" | "contiguous", see sharding.py); Hq a multiple of Hkv (GQA; K,V are
    never replicated on the wire except where Ulysses must give one kv head to
    several ranks). Masks use global positions: causal, window=N (N keys including
    self), cu_seqlens int [n_docs+1] document starts over the FULL sequence (no
    attention across documents). impl: "ring" (K,V travel), "tokenring" (Q travels,
    partials return), "ulysses" (all-to-all heads; Hq divisible by W), "hybrid"
    (Ulysses inside groups of `ulysses_degree` consecutive ranks, ring across; default
    degree = largest proper divisor of W that splits the heads), "hybrid-tokenring"
    (same with TokenRing across). one_communicator: run the two streams of ring/TokenRing
    (K,V and dK,dV; queries and partials) on `group` alone instead of a second communicator,
    for fabrics where two concurrent NCCL communicators deadlock (nccl #574, #781); same results.
    Returns this rank's output shard [B, S/W, Hq, D] in
    q.dtype; merges happen in fp32. Differentiable w.r.t. q, k, v.
    """
    if impl not in SP_IMPLS:
        raise ValueError(f"impl must be one of {SP_IMPLS}, got {impl!r}")
    check_qkv(q, k, v, window)
    if k.shape[1] != q.shape[1]:
        raise ValueError("q and k/v shards must hold the same tokens")
    scale = default_scale(q.shape[-1], softmax_scale)
    window = None if window is None else int(window)
    rank, world = group_rank_world(group)
    seq_len = q.shape[1] * world
    segs = layout_segments(seq_len, world, layout)
    bounds = as_bounds(cu_seqlens)
    if world == 1:
        out, _ = attention_block(q, k, v, causal=causal, softmax_scale=scale, window=window,
                                 cu_seqlens=bounds)
        return out
    if group is None:
        group = dist.group.WORLD
    if impl == "ulysses":
        return ulysses_attention(q, k, v, group, rank, world, segs, causal=causal, scale=scale,
                                 window=window, bounds=bounds)
    if impl in ("ring", "tokenring"):
        rs = _ring_spec(group, rank, world, segs, causal, window, bounds, scale, one_communicator)
        fn = RingAttention if impl == "ring" else TokenRingAttention
        return fn.apply(q, k, v, rs)
    # hybrid: Ulysses inside groups of u consecutive ranks, ring / TokenRing across them
    hq, hkv = q.shape[2], k.shape[2]
    u = ulysses_degree or default_ulysses_degree(world, hq, hkv)
    if world % u:
        raise ValueError(f"ulysses_degree {u} must divide the sequence-parallel degree {world}")
    head_split(hq, u, "query")
    if hkv != hq:
        head_split(hkv, u, "key/value", q_heads=hq)
    across = "tokenring" if impl == "hybrid-tokenring" else "ring"
    if u == 1:
        return sequence_parallel_attention(q, k, v, group, impl=across, causal=causal, layout=layout,
                                           softmax_scale=scale, window=window, cu_seqlens=bounds,
                                           one_communicator=one_communicator)
    inner, outer = split_group(group, u)
    g, i = divmod(rank, u)
    qg, kg, vg, qh, my_segs, perm = gather_sequence(q, k, v, inner, i, u, segs[g * u:(g + 1) * u])
    n_outer = world // u
    if n_outer == 1:
        out, _ = attention_block(qg, kg, vg, causal=causal, softmax_scale=scale, window=window,
                                 cu_seqlens=bounds)
        COUNTERS.compute_blocks += 1
        COUNTERS.compute_pairs += qg.shape[1] * kg.shape[1]
    else:
        outer_segs = tuple(
            segments_from_positions(sorted(segment_positions([s for r in range(j * u, (j + 1) * u)
                                                              for s in segs[r]]).tolist()))
            for j in range(n_outer))
        assert outer_segs[g] == my_segs
        rs = _ring_spec(outer, g, n_outer, outer_segs, causal, window, bounds, scale, one_communicator)
        fn = RingAttention if across == "ring" else TokenRingAttention
        out = fn.apply(qg, kg, vg, rs)
    return scatter_sequence(out, qh, hq, inner, perm)
