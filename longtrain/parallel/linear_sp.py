"""Sequence-parallel lightning attention: ranks exchange D x D states, never K or V.

The global sequence is cut into G equal chunks (zigzag: G = 2W, rank r holds
chunks r and 2W-1-r; contiguous: G = W, rank r holds chunk r). For a chunk c of
L tokens starting at p0, with lambda = exp(-decay):
  st_c  = sum_t lambda^(L-1-t) k_t v_t^T over its last document   (its state from zero)
  a_c   = lambda^L, or 0 when a document starts inside [p0, p0 + L)
  E_c   = a_c E_(c-1) + st_c                                       (true state after c)
  S_in  = E_(c-1), or 0 when a document starts exactly at p0
Every rank computes st_c of its own chunks, one all-gather shares them (forward;
its backward is a reduce-scatter of the state gradients), every rank forms the
prefix E for its chunks, and runs lightning_attention on each local chunk with
S_in as initial_state. Communication per layer: one all-gather of
(chunks per rank) x B x H x Dk x Dv fp32 values, independent of the sequence length.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from longtrain import ranges
from longtrain.kernels.documents import DocBounds, as_doc_bounds
from longtrain.kernels.lightning import lightning_attention

LAYOUTS = ("zigzag", "contiguous")


def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def chunk_ids(rank: int, world: int, layout: str) -> tuple[list[int], int]:
    """(global chunk indices held by `rank` in local order, number of chunks)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank], 2 * world
    return [rank], world


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherStates(torch.autograd.Function):
    """[m, ...] per rank -> [W, m, ...]; backward sums the gradients of every rank's copy."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        flat = x.contiguous().view(-1)
        out = flat.new_empty(world * flat.numel())
        with ranges.scope("sp_comm/all_gather"):
            _all_gather(out, flat, group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, g):
        flat = g.contiguous().view(-1)
        out = flat.new_empty(flat.numel() // ctx.world)
        with ranges.scope("sp_comm/reduce_scatter"):
            _reduce_scatter(out, flat, group=ctx.group)
        return out.view(g.shape[1:]), None, None


class _Tie(torch.autograd.Function):
    """Identity on x that puts `dep` in its graph with a zero gradient: every rank must
    run the reduce-scatter of the gathered states in its backward, also a rank whose
    outputs use none of them (contiguous rank 0, or documents starting at its chunks)."""

    @staticmethod
    def forward(ctx, x, dep):
        ctx.dep_meta = (dep.shape, dep.dtype, dep.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.dep_meta
        return g, torch.zeros(shape, dtype=dtype, device=device)


def _chunk_docs(cu: DocBounds | None, p0: int, L: int):
    """Local bounds of [p0, p0+L) (host DocBounds or None), doc start inside?, doc start at p0?,
    last start. All host arithmetic: the bounds never leave (or wait for) the device."""
    if cu is None:
        return None, False, False, 0
    starts = sorted(set(cu.starts_in(p0, L)))
    at_start = bool(starts) and starts[0] == p0
    return cu.window(p0, L), bool(starts), at_start, (starts[-1] - p0 if starts else 0)


def _state_from_zero(k: torch.Tensor, v: torch.Tensor, lam_log: torch.Tensor,
                     first: int) -> torch.Tensor:
    """sum_{t >= first} lambda^(L-1-t) k_t v_t^T in lam_log's dtype (fp32/fp64): [B, H, Dk, Dv]."""
    L, dt = k.shape[1], lam_log.dtype
    t = torch.arange(L, device=k.device, dtype=dt)
    w = torch.exp(-lam_log[None, :] * (L - 1 - t)[:, None]) * (t >= first).to(dt)[:, None]  # [L, H]
    return torch.einsum("bthd,bthe->bhde", k.to(dt) * w[None, :, :, None], v.to(dt))


def linear_sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                        group: dist.ProcessGroup | None = None, *, layout: str = "zigzag",
                        cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Lightning attention over a sequence sharded across the ranks of `group`.

    q, k [B, S_local, H, Dk], v [B, S_local, H, Dv]: this rank's tokens in `layout`
    ("zigzag" or "contiguous", the same layouts as parallel.sharding); decay [H].
    cu_seqlens: int [n_docs + 1] over the GLOBAL sequence (0 .. W * S_local), the
    same on every rank: host bounds (a DocBounds, as the trainer hands them, or ints) keep the
    layer free of host syncs; a tensor is read back once per call. Returns this rank's out
    [B, S_local, H, Dv]; differentiable w.r.t. q, k, v. Equals lightning_attention on the
    unsharded sequence.
    """
    rank, world = _rank_world(group)
    ids, n_chunks = chunk_ids(rank, world, layout)
    B, S_loc, H, Dk = q.shape
    if S_loc % len(ids):
        raise ValueError(f"{layout} layout needs a local length divisible by {len(ids)}, got {S_loc}")
    L = S_loc // len(ids)
    cu = as_doc_bounds(cu_seqlens)
    if cu is not None and cu.total != L * n_chunks:
        raise ValueError(f"cu_seqlens must run from 0 to the global length {L * n_chunks}, "
                         f"got {cu[0]}..{cu.total}")
    if world == 1:
        return lightning_attention(q, k, v, decay, cu_seqlens=cu)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = decay.detach().to(device=q.device, dtype=dt)
    docs = [_chunk_docs(cu, c * L, L) for c in range(n_chunks)]
    qs, ks, vs = q.split(L, dim=1), k.split(L, dim=1), v.split(L, dim=1)
    local_states = torch.stack([_state_from_zero(ks[j], vs[j], s, docs[c][3])
                                for j, c in enumerate(ids)])
    gathered = _GatherStates.apply(local_states, group, world)     # [W, m, B, H, Dk, Dv]
    owner = {}
    for r in range(world):
        for j, c in enumerate(chunk_ids(r, world, layout)[0]):
            owner[c] = (r, j)
    carry = torch.exp(-s * L).view(1, H, 1, 1)
    entering: dict[int, torch.Tensor | None] = {}
    E = None                                 # true state after the chunks seen so far
    for c in range(max(ids) + 1):
        _local, has_start, at_start, _last = docs[c]
        entering[c] = None if (E is None or at_start) else E
        st = gathered[owner[c]]
        E = st if (E is None or has_start) else carry * E + st
    outs = []
    for j, c in enumerate(ids):
        local_cu = docs[c][0]
        outs.append(lightning_attention(qs[j], ks[j], vs[j], decay, initial_state=entering[c],
                                        cu_seqlens=local_cu))
    if all(entering[c] is None for c in ids):
        outs[0] = _Tie.apply(outs[0], gathered)
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
