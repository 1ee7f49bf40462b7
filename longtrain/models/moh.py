"""Mixture-of-Head attention (MoH, SkyworkAI/MoH; REFERENCES §4).

Heads are experts. Heads `0 .. shared_heads-1` are always on; among the other
`E = n_heads - shared_heads` heads each token picks `routed_heads` (k):

* router "learned" (MoH paper): p = softmax(W_r x) over the E routed heads,
  top-k, routed gate_i = p_i / sum_{j in top-k} p_j * k (so they sum to k);
  shared gate = softmax(W_s x) * shared_heads (sum = shared_heads; a single
  shared head has gate 1 and no W_s); two-stage weights
  [a1, a2] = softmax(W_0 x) * 2 multiply the shared and routed gates.
  Output = W_o concat_h(gate_h * head_h). Load-balance loss (training only)
  aux = coef * E * sum_i f_i P_i, f_i = fraction of tokens whose top-k holds
  head i (sum_i f_i = k), P_i = mean of p_i; under uniform p it equals coef * k.
* router "query_norm" (MoH-LLaMA3): no parameters; score of routed head h for a
  token = ||q_h|| (pre-RoPE) / sum over routed heads of ||q_h||; the top-k are
  on with gate 1, the rest off (a binary mask), shared heads gate 1.

Compute: the reference code runs every head and masks. Here, when the ops
object is the single-process `LocalAttention`, shared heads go through
`ops.softmax` and each routed head attends only with the queries of the
tokens that chose it (all keys of that head stay visible to them), so routed
attention work scales with k/E:
  * no window, no documents: per (row, head) the chosen queries against the
    chosen positions' keys are an ordinary causal problem in compacted order
    (one causal flash call); the other positions' keys form a staircase (query
    i sees the first p_i - i of them): an unmasked call per run of C queries
    plus a thin masked band;
  * windows or packed documents: query blocks of P positions; the diagonal
    blocks of all routed heads in one batched masked call, the keys before the
    block visible to a whole run in one unmasked call, a masked band for windows.
Parts merge exactly by log-sum-exp; the backward hands every part the merged
(out, lse), as ring attention does. Any other ops object (sequence parallel)
gets one `ops.softmax` call on all heads and the gates mask the result:
correct, no saving, because the ops contract has no per-head query subsets.

Statistics of the last forward (detached): `last_head_usage` [n_heads] is the
fraction of tokens with a non-zero gate per head (shared heads read 1.0),
`last_router_prob` [E] the mean router probability (learned only);
`moh_stats(model)` flattens them into TensorBoard scalars.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.models.config import ModelConfig
from longtrain.models.layers import apply_rope
from longtrain.models.ops import AttentionOps, LocalAttention
from longtrain.models.spans import Span


def _up(t: Tensor) -> Tensor:
    """Router math in fp32 (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


class MoHAttention(nn.Module):
    """Causal GQA attention with shared + routed heads. forward(x [B,S,dim], rope, ops) -> [B,S,dim]."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, span: Span) -> None:
        super().__init__()
        m = cfg.moh
        assert m is not None
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = span.window if span.kind == "window" else None
        self.shared_heads, self.routed_heads = m.shared_heads, m.routed_heads
        self.n_routed = cfg.n_heads - m.shared_heads  # E: the pool the router picks from
        self.router_kind = m.router
        self.aux_loss_coef = m.aux_loss_coef
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if self.router_kind == "learned":
            self.router = nn.Linear(cfg.dim, self.n_routed, bias=False)  # W_r
            if self.shared_heads > 1:
                self.shared_gate = nn.Linear(cfg.dim, self.shared_heads, bias=False)  # W_s
            if self.shared_heads > 0:
                self.stage_gate = nn.Linear(cfg.dim, 2, bias=False)  # W_0
        self.sparse = True  # compute only the used (token, head) pairs when ops allow it
        # below this many tokens per row the gathers/merges of the sparse path cost more than they save
        # (bench moh / bench models, CPU: 3.2x dense at 256 tokens, 1.2x at 2k, 0.85-0.9x at 8k)
        self.sparse_min_seq = 4096
        self.block_size: int | None = None  # query block of the sparse path (None: automatic)
        self.compact = True
        self.last_aux_loss: Tensor | None = None
        self.last_head_usage: Tensor | None = None
        self.last_router_prob: Tensor | None = None
        self.last_gates: Tensor | None = None  # [B,S,H] detached gates of the last forward

    @property
    def head_usage(self) -> Tensor | None:
        """Alias of `last_head_usage` (the name the trainer's logger looks for)."""
        return self.last_head_usage

    # ------------------------------------------------------------------ routing
    def route(self, x: Tensor, q_pre: Tensor) -> tuple[Tensor, Tensor]:
        """Gates [B,S,H] (fp32 or fp64; zero = head off) and routed selection [B,S,E] bool.

        Sets `last_aux_loss` (training, learned router) and the usage statistics.
        """
        B, S, _ = x.shape
        hs, k, E = self.shared_heads, self.routed_heads, self.n_routed
        if self.router_kind == "learned":
            probs = torch.softmax(_up(self.router(x)), dim=-1)  # [B,S,E]
            top = probs.topk(k, dim=-1).indices
            sel = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
            masked = probs * sel
            denom = masked.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).eps)
            routed = masked / denom * k
            if hs > 0:
                shared = (torch.softmax(_up(self.shared_gate(x)), dim=-1) * hs if hs > 1
                          else probs.new_ones(B, S, 1))
                a = torch.softmax(_up(self.stage_gate(x)), dim=-1) * 2
                gates = torch.cat([shared * a[..., :1], routed * a[..., 1:]], dim=-1)
            else:
                gates = routed
            if self.training and self.aux_loss_coef:
                f = sel.to(probs.dtype).flatten(0, 1).mean(0)
                p = probs.flatten(0, 1).mean(0)
                self.last_aux_loss = self.aux_loss_coef * E * (f * p).sum()
            else:
                self.last_aux_loss = None
            self.last_router_prob = probs.detach().flatten(0, 1).mean(0)
        else:  # query_norm: parameter-free, binary
            with torch.no_grad():
                norms = _up(q_pre[:, :, hs:]).norm(dim=-1)  # [B,S,E]
                score = norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)
                top = score.topk(k, dim=-1).indices
                sel = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
                gates = torch.cat([score.new_ones(B, S, hs), sel.float()], dim=-1)
            self.last_aux_loss = None
            self.last_router_prob = None
        with torch.no_grad():
            self.last_gates = gates.detach()
            self.last_head_usage = (gates.detach() != 0).float().flatten(0, 1).mean(0)
        return gates, sel

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], ops: AttentionOps) -> Tensor:
        B, S, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, S, H, D)
        k = self.wk(x).view(B, S, Hkv, D)
        v = self.wv(x).view(B, S, Hkv, D)
        gates, sel = self.route(x, q)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # the sparse path is built on torch's CPU flash op (it returns the log-sum-exp); elsewhere
        # its parts would fall back to materialised scores, slower than masked flash-attn
        if (self.sparse and q.shape[1] >= self.sparse_min_seq and isinstance(ops, LocalAttention)
                and _has_cpu_flash(q)):
            o = self._sparse_attention(q, k, v, gates, sel, ops)
        else:
            o = ops.softmax(q, k, v, window=self.window) * gates.unsqueeze(-1).to(q.dtype)
        return self.wo(o.reshape(B, S, H * D))

    def _sparse_attention(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, sel: Tensor,
                          ops: LocalAttention) -> Tensor:
        B, S, H, D = q.shape
        Hkv, hs, E = self.n_kv_heads, self.shared_heads, self.n_routed
        G = H // Hkv
        parts = []
        q_shared, q_routed = torch.split(q, [hs, E], dim=2)  # split, not slices: one cheap backward
        if hs > 0:
            if hs % G == 0:
                ks, vs = k[:, :, : hs // G], v[:, :, : hs // G]
            else:  # shared heads split a kv group: give each its own copy of its kv head
                idx = torch.arange(hs, device=q.device) // G
                ks, vs = k.index_select(2, idx), v.index_select(2, idx)
            os_ = ops.softmax(q_shared, ks, vs, window=self.window)
            parts.append(os_ * gates[:, :, :hs].unsqueeze(-1).to(q.dtype))
        # routed heads in [B, E, S, D]; kv heads copied per routed head (GQA)
        kv_idx = (hs + torch.arange(E, device=q.device)) // G
        qr = q_routed.transpose(1, 2).contiguous()
        kr = k.transpose(1, 2).index_select(1, kv_idx)
        vr = v.transpose(1, 2).index_select(1, kv_idx)
        selT = sel.permute(0, 2, 1)
        flat = selT.reshape(-1).nonzero().squeeze(1)  # over [B, E, S], sorted
        if self.window is None and ops.cu_seqlens is None and self.compact:
            C = self.block_size or min(512, _auto_block(S))
            out = _CompactCausalAttention.apply(qr, kr, vr, selT, C, 1.0 / math.sqrt(D))
            return self._place(out, flat, gates, parts, B, E, S, D)
        pos = flat % S
        doc_start = _doc_starts(ops.cu_seqlens, S, q.device)
        ds = doc_start.index_select(0, pos) if doc_start is not None else torch.zeros_like(pos)
        lb = ds if self.window is None else torch.maximum(ds, pos - self.window + 1)
        P = self.block_size or _auto_block(S)
        segs = _segments(flat // S, pos, ds, P, S, self.window)
        mask = _diag_mask(P, S, B, self.window, ops.cu_seqlens, q.dtype, q.device)
        out = _SparseQueryAttention.apply(qr, kr, vr, flat, pos, lb, segs, mask, P, 1.0 / math.sqrt(D))
        return self._place(out, flat, gates, parts, B, E, S, D)

    def _place(self, out: Tensor, flat: Tensor, gates: Tensor, parts: list[Tensor], B: int, E: int, S: int,
               D: int) -> Tensor:
        """Gate the chosen rows, scatter them into [B,S,E,D] and append to the shared heads' output."""
        g = gates[:, :, self.shared_heads:].permute(0, 2, 1).reshape(-1).index_select(0, flat)
        out = out * g.unsqueeze(-1).to(out.dtype)
        orr = out.new_zeros(B * E * S, D).index_put((flat,), out)
        parts.append(orr.view(B, E, S, D).transpose(1, 2))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------- sparse path helpers
# The chosen queries of one routed head, split by query blocks of P positions:
#   diagonal block   keys of the query's own block: one batched flash-attention call over all
#                    blocks of all routed heads (every token, causal; rows not chosen are dropped)
#   prefix           keys before the block visible to every chosen query of the run: one
#                    unmasked flash call per (row, head, block, document) run
#   band             (windows only) keys before the block visible to some queries: explicit, masked
# merged exactly by log-sum-exp; the backward hands each part the merged out/lse (as ring attention does).

def _auto_block(S: int) -> int:
    # the diagonal call costs ~P keys per token (all rows, whole tiles); each prefix run costs
    # kernel calls and a [prefix, D] gradient pass, ~S^2/P per head: S/8 measured best at 2k-8k
    target = min(1024, max(128, S // 8))
    return 1 << (target.bit_length() - 1)  # a power of two: divides typical lengths, no padding


def _doc_starts(cu_seqlens: Tensor | None, S: int, device: torch.device) -> Tensor | None:
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


def _diag_mask(P: int, S: int, B: int, window: int | None, cu_seqlens: Tensor | None,
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
        d = _doc_starts(cu_seqlens, nblk * P, device).view(nblk, P)
        keep = keep & (d[:, :, None] == d[:, None, :])
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf")).unsqueeze(0)


def _segments(br: Tensor, pos: Tensor, ds: Tensor, P: int, S: int,
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


def _has_cpu_flash(t: Tensor) -> bool:
    return t.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _kernel(t: Tensor) -> bool:
    return _has_cpu_flash(t) and not _FORCE_MATH


def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Tensor | None,
               scale: float) -> tuple[Tensor, Tensor]:
    """q/k/v [B,H,L,D] -> out [B,H,L,D] (q dtype), lse [B,H,L] fp32 (top-left causal if causal)."""
    if _kernel(q):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return o, l.float()
    s = _math_scores(q, k, causal, mask, scale)
    lse = s.logsumexp(-1)
    return (torch.exp(s - lse[..., None]) @ _up(v)).to(q.dtype), lse


def _flash_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
               mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one part given the MERGED out/lse of its rows. All [B,H,L,D]; fp32 out."""
    if _kernel(q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.to(q.dtype), q, k, v, o.to(q.dtype), lse.float().contiguous(), 0.0, causal,
            attn_mask=mask, scale=scale)
        return _up(dq), _up(dk), _up(dv)
    qf, kf, vf, dof = _up(q), _up(k), _up(v), _up(do)
    p = torch.exp(_math_scores(q, k, causal, mask, scale) - lse[..., None])
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * _up(o)).sum(-1, keepdim=True))
    return (ds @ kf) * scale, (ds.transpose(-1, -2) @ qf) * scale, p.transpose(-1, -2) @ dof


def _math_scores(q: Tensor, k: Tensor, causal: bool, mask: Tensor | None, scale: float) -> Tensor:
    s = (_up(q) @ _up(k).transpose(-1, -2)) * scale
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


class _SparseQueryAttention(torch.autograd.Function):
    """Causal attention of the chosen queries (flat indices over [B,E,S]) of routed heads over
    all keys of their head; q/k/v [B,E,S,D]. Returns out [N,D] in the order of `flat`."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, flat: Tensor, pos: Tensor, lb: Tensor,
                segs: list[tuple[int, ...]], mask: Tensor | None, P: int, scale: float) -> Tensor:
        B, E, S, D = q.shape
        nblk = (S + P - 1) // P
        od, ld = _flash_fwd(_to_blocks(q, P), _to_blocks(k, P), _to_blocks(v, P), mask is None, mask, scale)
        drow = (flat // S) * (nblk * P) + pos  # row of each chosen query in od
        out = _up(od.reshape(-1, D).index_select(0, drow))
        lse = ld.reshape(-1).index_select(0, drow)
        qs = q.reshape(-1, D).index_select(0, flat)
        kf, vf = k.view(B * E, S, D), v.view(B * E, S, D)
        for q0, q1, brr, pre_lo, pre_hi, band_lo, band_hi in segs:
            qq = qs[q0:q1][None, None]
            if pre_hi > pre_lo:
                o1, l1 = _flash_fwd(qq, kf[brr, pre_lo:pre_hi][None, None], vf[brr, pre_lo:pre_hi][None, None],
                                    False, None, scale)
                _merge(out, lse, q0, q1, _up(o1[0, 0]), l1[0, 0])
            if band_hi > band_lo:
                bm = _band_mask(pos[q0:q1], lb[q0:q1], band_lo, band_hi, q.dtype)
                o2, l2 = _flash_fwd(qq, kf[brr, band_lo:band_hi][None, None], vf[brr, band_lo:band_hi][None, None],
                                    False, bm, scale)
                dead = torch.isinf(bm).all(-1)  # no visible band key: the op reports lse 0 there
                _merge(out, lse, q0, q1, _up(o2[0, 0]).masked_fill(dead[:, None], 0.0),
                       l2[0, 0].masked_fill(dead, float("-inf")))
        ctx.save_for_backward(q, k, v, flat, drow, pos, lb, out, lse, ld, mask)
        ctx.segs, ctx.P, ctx.scale = segs, P, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, flat, drow, pos, lb, out, lse, ld, mask = ctx.saved_tensors
        P, scale = ctx.P, ctx.scale
        B, E, S, D = q.shape
        dout = _up(dout)
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


class _CompactCausalAttention(torch.autograd.Function):
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
            o, l_ = _up(o[0, 0]).clone(), l_[0, 0].clone()
            for i0, i1, lo, hi, bm, dead in runs:
                qq = qs[i0:i1][None, None]
                if lo > 0:  # keys [0, lo) of the staircase: visible to every query of the run
                    o1, l1 = _flash_fwd(qq, ku[:lo][None, None], vu[:lo][None, None], False, None, scale)
                    _merge(o, l_, i0, i1, _up(o1[0, 0]), l1[0, 0])
                if hi > lo:
                    o2, l2 = _flash_fwd(qq, ku[lo:hi][None, None], vu[lo:hi][None, None], False, bm, scale)
                    _merge(o, l_, i0, i1, _up(o2[0, 0]).masked_fill(dead[:, None], 0.0),
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
        dout = _up(dout)
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


# ---------------------------------------------------------------------- stats for the trainer
def moh_stats(model: nn.Module) -> dict[str, float]:
    """TensorBoard scalars from the last forward of every MoH layer.

    `moh/L{i}/usage/h{h}`: fraction of tokens using head h (shared heads 1.0; with balanced
    routing every routed head reads k/E). `moh/L{i}/usage_max_over_mean`: the most used routed
    head's usage over the mean (1.0 = balanced). `moh/aux_loss`: summed load-balance loss
    (already times the coefficient).
    """
    out: dict[str, float] = {}
    aux = []
    for m in model.modules():
        if not isinstance(m, MoHAttention) or m.last_head_usage is None:
            continue
        u = m.last_head_usage.float().cpu()
        for h, val in enumerate(u.tolist()):
            out[f"moh/L{m.layer_idx}/usage/h{h}"] = val
        r = u[m.shared_heads:]
        out[f"moh/L{m.layer_idx}/usage_max_over_mean"] = float(r.max() / r.mean().clamp_min(1e-12))
        if m.last_aux_loss is not None:
            aux.append(float(m.last_aux_loss.detach()))
    if aux:
        out["moh/aux_loss"] = sum(aux)
    return out


__all__ = ["MoHAttention", "moh_stats"]
