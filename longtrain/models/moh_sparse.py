"""MoH's sparse routed attention (models/moh.py): each routed head attends only with the queries of the
tokens that chose it, in exact log-sum-exp-merged parts (the compact causal problem, the staircase of
earlier keys, masked diagonal blocks for windows and documents). Plain-torch math twin on CPU."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor



def auto_block_size(S: int) -> int:
    # the diagonal call costs ~P keys per token (all rows, whole tiles); each prefix run costs
    # kernel calls and a [prefix, D] gradient pass, ~S^2/P per head: S/8 measured best at 2k-8k
    target = min(1024, max(128, S // 8))
    return 1 << (target.bit_length() - 1)  # a power of two: divides typical lengths, no padding


def doc_starts(cu_seqlens: Tensor | None, S: int, device: torch.device) -> Tensor | None:
    """First position of each position's document, [S] long (None without packing).

    Same convention as kernels.attention_block: document starts over the sequence, shared by
    every row; positions at or past cu_seqlens[-1] form one trailing document.
    """
    if cu_seqlens is None:
        return None
    cu = (cu_seqlens.on(device) if hasattr(cu_seqlens, "on")  # DocBounds: one cached copy per micro-batch
          else torch.as_tensor(cu_seqlens, dtype=torch.long).to(device))
    doc = torch.searchsorted(cu, torch.arange(S, device=device), right=True) - 1
    return cu[doc.clamp_min(0)]


def diagonal_mask(P: int, S: int, B: int, window: int | None, cu_seqlens: Tensor | None,
                  dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Additive mask of the diagonal blocks ([1, 1|nblk, P, P]); None = plain causal."""
    if window is None and cu_seqlens is None:
        return None
    nblk = (S + P - 1) // P
    i = torch.arange(P, device=device)[:, None]
    j = torch.arange(P, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (i - j < window)
    keep = keep[None]
    if cu_seqlens is not None:  # per block: blocks are the 'heads' of the diagonal call
        d = doc_starts(cu_seqlens, nblk * P, device).view(nblk, P)
        keep = keep & (d[:, :, None] == d[:, None, :])
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf")).unsqueeze(0)


def prefix_runs(br: Tensor, pos: Tensor, ds: Tensor, P: int, S: int,
                window: int | None) -> list[tuple[int, ...]]:
    """Runs of chosen queries sharing (row*E + head, block, document) that see keys before their block.

    Each: (q0, q1, br, pre_lo, pre_hi, band_lo, band_hi): keys [pre_lo, pre_hi) are visible to
    every query of the run, keys [band_lo, band_hi) to some (masked explicitly).
    """
    if pos.numel() == 0:
        return []
    nblk = (S + P - 1) // P
    key = (br * nblk + pos // P) * S + ds
    _, counts = torch.unique_consecutive(key, return_counts=True)
    ends = counts.cumsum(0)
    starts = ends - counts
    meta = torch.stack([starts, ends, br[starts], pos[starts], pos[ends - 1], ds[starts]], 1).tolist()
    segs = []
    for q0, q1, brr, p0, p1, d in meta:
        s0 = (p0 // P) * P
        if d >= s0:
            continue  # the document starts in this block: the diagonal call covers every key
        band_lo = max(d, p0 - window + 1) if window is not None else d
        pre_lo = max(d, p1 - window + 1) if window is not None else d
        band_lo, pre_lo = min(band_lo, s0), min(pre_lo, s0)
        if band_lo < s0:
            segs.append((q0, q1, brr, pre_lo, s0, band_lo, pre_lo))
    return segs


_FORCE_MATH = False  # tests: run the parts through the plain-torch math twin


def has_cpu_flash(t: Tensor) -> bool:
    return t.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _kernel(t: Tensor) -> bool:
    return has_cpu_flash(t) and not _FORCE_MATH


def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None,
               scale: float) -> tuple[Tensor, Tensor]:
    """q/k/v [B,H,L,D] -> out [B,H,L,D] (q dtype), lse [B,H,L] fp32 (top-left causal if causal)."""
    if _kernel(q):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return o, l.float()
    s = _math_scores(q, k, causal, mask, scale)
    lse = s.logsumexp(-1)
    return (torch.exp(s - lse[..., None]) @ upcast(v)).to(q.dtype), lse


def _flash_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
               mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one part given the MERGED out/lse of its rows. All [B,H,L,D]; fp32 out."""
    if _kernel(q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.to(q.dtype), q, k, v, o.to(q.dtype), lse.float().contiguous(), 0.0, causal,
            attn_mask=mask, scale=scale)
        return upcast(dq), upcast(dk), upcast(dv)
    qf, kf, vf, dof = upcast(q), upcast(k), upcast(v), upcast(do)
    p = torch.exp(_math_scores(q, k, causal, mask, scale) - lse[..., None])
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * upcast(o)).sum(-1, keepdim=True))
    return (ds @ kf) * scale, (ds.transpose(-1, -2) @ qf) * scale, p.transpose(-1, -2) @ dof


def _math_scores(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None, scale: float) -> Tensor:
    s = (upcast(q) @ upcast(k).transpose(-1, -2)) * scale
    if causal:
        L, M = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, M, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s + mask
    return s


def _to_blocks(t: Tensor, P: int) -> Tensor:
    """[B,E,S,D] -> [B*E, nblk, P, D]: query blocks as the 'heads' of one kernel call (a view
    unless S needs padding to whole blocks)."""
    B, E, S, D = t.shape
    nblk = (S + P - 1) // P
    if nblk * P != S:
        t = F.pad(t, (0, 0, 0, nblk * P - S))
    return t.reshape(B * E, nblk, P, D)


def _from_blocks(t: Tensor, B: int, S: int) -> Tensor:
    BE, nblk, P, D = t.shape
    return t.reshape(B, BE // B, nblk * P, D)[:, :, :S]


class SparseQueryAttention(torch.autograd.Function):
    """Causal attention of the chosen queries (flat indices over [B,E,S]) of routed heads over
    all keys of their head; q/k/v [B,E,S,D]. Returns out [N,D] in the order of `flat`."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, flat: Tensor, pos: Tensor, lb: Tensor,
                segs: list[tuple[int, ...]], mask: Tensor | None, P: int, scale: float) -> Tensor:
        B, E, S, D = q.shape
        nblk = (S + P - 1) // P
        od, ld = _flash_fwd(_to_blocks(q, P), _to_blocks(k, P), _to_blocks(v, P), mask is None, mask, scale)
        drow = (flat // S) * (nblk * P) + pos  # row of each chosen query in od
        out = upcast(od.reshape(-1, D).index_select(0, drow))
        lse = ld.reshape(-1).index_select(0, drow)
        qs = q.reshape(-1, D).index_select(0, flat)
        kf, vf = k.view(B * E, S, D), v.view(B * E, S, D)
        for q0, q1, brr, pre_lo, pre_hi, band_lo, band_hi in segs:
            qq = qs[q0:q1][None, None]
            if pre_hi > pre_lo:
                o1, l1 = _flash_fwd(qq, kf[brr, pre_lo:pre_hi][None, None], vf[brr, pre_lo:pre_hi][None, None],
                                    False, None, scale)
                _merge(out, lse, q0, q1, upcast(o1[0, 0]), l1[0, 0])
            if band_hi > band_lo:
                bm = _band_mask(pos[q0:q1], lb[q0:q1], band_lo, band_hi, q.dtype)
                o2, l2 = _flash_fwd(qq, kf[brr, band_lo:band_hi][None, None], vf[brr, band_lo:band_hi][None, None],
                                    False, bm, scale)
                dead = torch.isinf(bm).all(-1)  # no visible band key: the op reports lse 0 there
                _merge(out, lse, q0, q1, upcast(o2[0, 0]).masked_fill(dead[:, None], 0.0),
                       l2[0, 0].masked_fill(dead, float("-inf")))
        ctx.save_for_backward(q, k, v, flat, drow, pos, lb, out, lse, ld, mask)
        ctx.segs, ctx.P, ctx.scale = segs, P, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, flat, drow, pos, lb, out, lse, ld, mask = ctx.saved_tensors
        P, scale = ctx.P, ctx.scale
        B, E, S, D = q.shape
        dout = upcast(dout)
        # diagonal blocks: rows not chosen get dout = 0 and so contribute nothing
        n = ld.numel()
        dod = dout.new_zeros(n, D).index_copy_(0, drow, dout)
        om = out.new_zeros(n, D).index_copy_(0, drow, out)
        lm = ld.reshape(-1).clone().index_copy_(0, drow, lse)
        shp = (B * E, n // (B * E * P), P, D)
        dqd, dkd, dvd = _flash_bwd(dod.view(shp), _to_blocks(q, P), _to_blocks(k, P), _to_blocks(v, P),
                                   om.view(shp), lm.view(shp[:3]), mask is None, mask, scale)
        dq = _from_blocks(dqd, B, S).contiguous()
        dk = _from_blocks(dkd, B, S).contiguous()
        dv = _from_blocks(dvd, B, S).contiguous()
        if ctx.segs:
            qs = q.reshape(-1, D).index_select(0, flat)
            dqs = torch.zeros(qs.shape, dtype=dq.dtype, device=dq.device)
            kf, vf = k.view(B * E, S, D), v.view(B * E, S, D)
            dkf, dvf = dk.view(B * E, S, D), dv.view(B * E, S, D)
            for q0, q1, brr, pre_lo, pre_hi, band_lo, band_hi in ctx.segs:
                qq, do, o = qs[q0:q1][None, None], dout[q0:q1][None, None], out[q0:q1][None, None]
                l_ = lse[q0:q1][None, None]
                for lo, hi, m in ((pre_lo, pre_hi, None),
                                  (band_lo, band_hi, None if band_hi <= band_lo else
                                   _band_mask(pos[q0:q1], lb[q0:q1], band_lo, band_hi, q.dtype))):
                    if hi <= lo:
                        continue
                    g_q, g_k, g_v = _flash_bwd(do, qq, kf[brr, lo:hi][None, None], vf[brr, lo:hi][None, None], o, l_,
                                               False, m, scale)
                    dqs[q0:q1] += g_q[0, 0]
                    dkf[brr, lo:hi] += g_k[0, 0]
                    dvf[brr, lo:hi] += g_v[0, 0]
            dq.view(-1, D).index_add_(0, flat, dqs)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 7


def _merge(out: Tensor, lse: Tensor, q0: int, q1: int, o: Tensor, l_: Tensor) -> None:
    """Merge a partial (o, l_) into rows q0:q1 of the running (out, lse), in place."""
    lt = torch.logaddexp(lse[q0:q1], l_)
    out[q0:q1] = torch.exp(lse[q0:q1] - lt)[:, None] * out[q0:q1] + torch.exp(l_ - lt)[:, None] * o
    lse[q0:q1] = lt


def _band_mask(pos: Tensor, lb: Tensor, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
    j = torch.arange(lo, hi, device=pos.device)[None, :]
    keep = (j >= lb[:, None]) & (j <= pos[:, None])
    return torch.zeros(keep.shape, dtype=dtype, device=pos.device).masked_fill_(~keep, float("-inf"))


class CompactCausalAttention(torch.autograd.Function):
    """Routed-head attention without window or documents, per (row, head):
    the chosen queries against the keys of the chosen positions form an ordinary causal problem
    in compacted order (query i sees compacted keys 0..i) -> one causal flash call; the keys of
    the other positions form a staircase (query i sees the first p_i - i of them) -> an unmasked
    prefix call per run of C queries plus a thin masked band. Merged by log-sum-exp.
    q/k/v [B,E,S,D]; chosen positions `sel` [B,E,S] bool. Returns out [N,D] (flat order)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sel: Tensor, C: int, scale: float) -> Tensor:
        D = q.shape[-1]
        heads, outs, lses, gathered = _compact_plan(sel, C, q.dtype), [], [], []
        for b, r, p, perm, runs in heads:
            n = p.numel()
            qs = q[b, r].index_select(0, p)
            kp, vp = k[b, r].index_select(0, perm), v[b, r].index_select(0, perm)  # chosen keys first
            ks, vs, ku, vu = kp[:n], vp[:n], kp[n:], vp[n:]
            o, l_ = _flash_fwd(qs[None, None], ks[None, None], vs[None, None], True, None, scale)
            o, l_ = upcast(o[0, 0]).clone(), l_[0, 0].clone()
            for i0, i1, lo, hi, bm, dead in runs:
                qq = qs[i0:i1][None, None]
                if lo > 0:  # keys [0, lo) of the staircase: visible to every query of the run
                    o1, l1 = _flash_fwd(qq, ku[:lo][None, None], vu[:lo][None, None], False, None, scale)
                    _merge(o, l_, i0, i1, upcast(o1[0, 0]), l1[0, 0])
                if hi > lo:
                    o2, l2 = _flash_fwd(qq, ku[lo:hi][None, None], vu[lo:hi][None, None], False, bm, scale)
                    _merge(o, l_, i0, i1, upcast(o2[0, 0]).masked_fill(dead[:, None], 0.0),
                           l2[0, 0].masked_fill(dead, float("-inf")))
            outs.append(o)
            lses.append(l_)
            gathered.append((qs, kp, vp))
        out = torch.cat(outs) if outs else q.new_zeros(0, D, dtype=torch.float32)
        lse = torch.cat(lses) if lses else q.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.heads, ctx.gathered, ctx.scale = heads, gathered, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        dout = upcast(dout)
        dq = torch.zeros(q.shape, dtype=dout.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=dout.dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=dout.dtype, device=q.device)
        n0 = 0
        for (b, r, p, perm, runs), (qs, kp, vp) in zip(ctx.heads, ctx.gathered):
            n = p.numel()
            do, o, l_ = dout[n0:n0 + n], out[n0:n0 + n], lse[n0:n0 + n]
            n0 += n
            ks, vs, ku, vu = kp[:n], vp[:n], kp[n:], vp[n:]
            gkp = torch.zeros(kp.shape, dtype=dout.dtype, device=q.device)
            gvp = torch.zeros(vp.shape, dtype=dout.dtype, device=q.device)
            gq, gk, gv = _flash_bwd(do[None, None], qs[None, None], ks[None, None], vs[None, None],
                                    o[None, None], l_[None, None], True, None, scale)
            gq = gq[0, 0].contiguous()
            gkp[:n] = gk[0, 0]
            gvp[:n] = gv[0, 0]
            gku, gvu = gkp[n:], gvp[n:]
            for i0, i1, lo, hi, bm, _dead in runs:
                args = (do[i0:i1][None, None], qs[i0:i1][None, None])
                mo = (o[i0:i1][None, None], l_[i0:i1][None, None])
                for a, z, m in ((0, lo, None), (lo, hi, bm)):
                    if z <= a:
                        continue
                    g1, g2, g3 = _flash_bwd(*args, ku[a:z][None, None], vu[a:z][None, None], *mo, False, m, scale)
                    gq[i0:i1] += g1[0, 0]
                    gku[a:z] += g2[0, 0]
                    gvu[a:z] += g3[0, 0]
            dq[b, r].index_copy_(0, p, gq)
            dk[b, r].index_copy_(0, perm, gkp)
            dv[b, r].index_copy_(0, perm, gvp)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _compact_plan(sel: Tensor, C: int, dtype: torch.dtype) -> list[tuple[Any, ...]]:
    """Per (row, head): chosen positions p, the permutation [p, others], and staircase runs
    (i0, i1, lo, hi, band mask, dead rows) over the other keys: query i sees others[:p_i - i]."""
    B, E, S = sel.shape
    heads = []
    counts = sel.sum(-1).tolist()
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # chosen positions first, in order
    for b in range(B):
        for r in range(E):
            n = counts[b][r]
            if n == 0:
                continue
            perm = order[b, r]
            p = perm[:n]
            cnt = p - torch.arange(n, device=p.device)  # other keys before each chosen query
            starts = cnt[::C]
            lasts = cnt[torch.arange(C, n + C, C, device=p.device).clamp_max(n) - 1]
            runs = []
            for j, (lo, hi) in enumerate(zip(starts.tolist(), lasts.tolist())):
                i0, i1 = j * C, min((j + 1) * C, n)
                bm = dead = None
                if hi > lo:
                    c = cnt[i0:i1, None]
                    keep = torch.arange(lo, hi, device=p.device)[None, :] < c
                    bm = torch.zeros(keep.shape, dtype=dtype, device=p.device).masked_fill_(~keep, float("-inf"))
                    dead = c[:, 0] == lo
                runs.append((i0, i1, lo, hi, bm, dead))
            heads.append((b, r, p, perm, runs))
    return heads


def upcast(t: Tensor) -> Tensor:
    """Router math in fp32 (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()
