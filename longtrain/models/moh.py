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
tokens that chose it (all keys of that head are still visible to them), so
routed attention work scales with k/E. Any other ops object (sequence
parallel) gets one `ops.softmax` call on all heads and the gates mask the
result: correct but no saving, because the ops contract has no per-head query
subsets.

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
from longtrain.models.ops import AttentionOps, LocalAttention
from longtrain.models.spans import Span


def _up(t: Tensor) -> Tensor:
    """Router math in fp32 (fp64 stays fp64)."""
    return t if t.dtype == torch.float64 else t.float()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    from longtrain.models.llama import apply_rope

    return apply_rope(x, cos, sin)


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
        self.block_size: int | None = None  # query block of the sparse path (None: automatic)
        self.last_aux_loss: Tensor | None = None
        self.last_head_usage: Tensor | None = None
        self.last_router_prob: Tensor | None = None
        self.last_gates: Tensor | None = None  # [B,S,H] detached gates of the last forward

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
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if self.sparse and isinstance(ops, LocalAttention):
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
        if hs > 0:
            if hs % G == 0:
                ks, vs = k[:, :, : hs // G], v[:, :, : hs // G]
            else:  # shared heads split a kv group: give each its own copy of its kv head
                idx = torch.arange(hs, device=q.device) // G
                ks, vs = k.index_select(2, idx), v.index_select(2, idx)
            os_ = ops.softmax(q[:, :, :hs], ks, vs, window=self.window)
            parts.append(os_ * gates[:, :, :hs].unsqueeze(-1).to(q.dtype))
        # routed heads: flat index over [B, E, S] so each head's chosen queries are contiguous and sorted
        flat = sel.permute(0, 2, 1).reshape(-1).nonzero().squeeze(1)
        qr = q[:, :, hs:].permute(0, 2, 1, 3).reshape(B * E * S, D)
        qs = qr.index_select(0, flat)
        kt = k.transpose(1, 2).contiguous()  # [B, Hkv, S, D]
        vt = v.transpose(1, 2).contiguous()
        pos = flat % S
        br = flat // S  # b * E + r
        doc_start = _doc_starts(ops.cu_seqlens, B, S, q.device)
        ds = doc_start.reshape(-1).index_select(0, (br // E) * S + pos) if doc_start is not None \
            else torch.zeros_like(pos)
        lb = ds if self.window is None else torch.maximum(ds, pos - self.window + 1)
        P = self.block_size or _auto_block(S)
        segs = _segments(br, pos, ds, P, S, E, hs, G, self.window)
        scale = 1.0 / math.sqrt(D)
        out = _SparseQueryAttention.apply(qs, kt, vt, pos, lb, segs, scale)
        g = gates[:, :, hs:].permute(0, 2, 1).reshape(-1).index_select(0, flat)
        out = out * g.unsqueeze(-1).to(out.dtype)
        orr = out.new_zeros(B * E * S, D).index_put((flat,), out)
        parts.append(orr.view(B, E, S, D).permute(0, 2, 1, 3))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------- sparse path helpers
def _auto_block(S: int) -> int:
    # query block of the sparse path: the masked (explicit) part costs ~P keys per query,
    # each block costs a few kernel launches; S/16 clamped balances the two at 2k-32k
    return int(min(512, max(64, S // 16)))


def _doc_starts(cu_seqlens: Tensor | None, B: int, S: int, device: torch.device) -> Tensor | None:
    """First position of each token's document, [B,S] long (None without packing)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    total = int(cu[-1])
    if total == S:  # boundaries shared by every row
        idx = torch.arange(S, device=device)
        doc = torch.searchsorted(cu, idx, right=True) - 1
        return cu[doc].unsqueeze(0).expand(B, S).contiguous()
    if total == B * S:  # boundaries over the flattened batch
        idx = torch.arange(B * S, device=device)
        doc = torch.searchsorted(cu, idx, right=True) - 1
        return (cu[doc] - (idx // S) * S).clamp_min(0).view(B, S)
    raise ValueError(f"cu_seqlens ends at {total}, expected the sequence length {S} or batch*seq {B * S}")


def _segments(br: Tensor, pos: Tensor, ds: Tensor, P: int, S: int, E: int, hs: int, G: int,
              window: int | None) -> list[tuple[int, ...]]:
    """Split the chosen queries into runs sharing (batch, head, query block, document).

    Each run: (q0, q1, b, kv_head, pre_lo, pre_hi, ex_lo, ex_mid_lo, ex_hi) where keys
    [pre_lo, pre_hi) are visible to every query of the run (no mask) and keys
    [ex_lo, pre_lo) + [ex_mid_lo, ex_hi) are the masked rest (diagonal block, window band).
    """
    n = pos.numel()
    if n == 0:
        return []
    nblk = (S + P - 1) // P
    key = (br * nblk + pos // P) * S + ds
    _, counts = torch.unique_consecutive(key, return_counts=True)
    ends = counts.cumsum(0)
    starts = ends - counts
    meta = torch.stack([starts, ends, br[starts], pos[starts], pos[ends - 1], ds[starts]], 1).tolist()
    segs = []
    for q0, q1, brr, p0, p1, d in meta:
        b, r = divmod(brr, E)
        kvh = (hs + r) // G
        s0 = (p0 // P) * P
        lo_all = max(d, p0 - window + 1) if window is not None else d
        pre_hi = s0
        pre_lo = max(d, p1 - window + 1) if window is not None else d
        if pre_lo < pre_hi:
            lo = lo_all if lo_all < pre_lo else pre_hi  # no window band: the masked part is contiguous
            segs.append((q0, q1, b, kvh, pre_lo, pre_hi, lo, pre_hi, p1 + 1))
        else:
            segs.append((q0, q1, b, kvh, 0, 0, lo_all, lo_all, p1 + 1))
    return segs


def _prefix_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Unmasked attention q [c,D] over k/v [L,D] -> out [c,D] (fp32), lse [c] (fp32)."""
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None, None], k[None, None], v[None, None], 0.0, False, scale=scale)
        return o[0, 0].float(), l[0, 0].float()
    s = (q.float() @ k.float().T) * scale
    lse = s.logsumexp(-1)
    return torch.exp(s - lse[:, None]) @ v.float(), lse


def _prefix_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the unmasked part given the MERGED out/lse of the row (ring-style)."""
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        dt = q.dtype
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do.to(dt)[None, None], q[None, None], k[None, None], v[None, None], o.to(dt)[None, None],
            lse[None, None].contiguous(), 0.0, False, scale=scale)
        return dq[0, 0].float(), dk[0, 0].float(), dv[0, 0].float()
    qf, kf, vf = q.float(), k.float(), v.float()
    p = torch.exp((qf @ kf.T) * scale - lse[:, None])
    dv = p.T @ do
    dp = do @ vf.T
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    return (ds @ kf) * scale, (ds.T @ qf) * scale, dv


def _ex_keys(t: Tensor, lo: int, mid: int, hi: int, pre_lo: int) -> Tensor:
    return t[lo:hi] if mid == lo else torch.cat([t[lo:pre_lo], t[mid:hi]])


def _ex_pos(lo: int, mid: int, hi: int, pre_lo: int, device: torch.device) -> Tensor:
    if mid == lo:
        return torch.arange(lo, hi, device=device)
    return torch.cat([torch.arange(lo, pre_lo, device=device), torch.arange(mid, hi, device=device)])


class _SparseQueryAttention(torch.autograd.Function):
    """Causal attention of chosen queries qs [N,D] (sorted by batch, head, position) over all keys
    of their kv head k/v [B,Hkv,S,D]. Per run: unmasked prefix through the flash kernel, the
    masked rest explicitly, merged by log-sum-exp; gradients accumulate into dk/dv in place."""

    @staticmethod
    def forward(ctx: Any, qs: Tensor, k: Tensor, v: Tensor, pos: Tensor, lb: Tensor,
                segs: list[tuple[int, ...]], scale: float) -> Tensor:
        N, D = qs.shape
        out = torch.empty(N, D, dtype=torch.float32, device=qs.device)
        lse = torch.empty(N, dtype=torch.float32, device=qs.device)
        for q0, q1, b, h, pre_lo, pre_hi, lo, mid, hi in segs:
            q = qs[q0:q1]
            kb, vb = k[b, h], v[b, h]
            kx, vx = _ex_keys(kb, lo, mid, hi, pre_lo).float(), _ex_keys(vb, lo, mid, hi, pre_lo).float()
            jp = _ex_pos(lo, mid, hi, pre_lo, qs.device)
            p, l_ = pos[q0:q1, None], lb[q0:q1, None]
            s = (q.float() @ kx.T) * scale
            s = s.masked_fill((jp[None, :] > p) | (jp[None, :] < l_), float("-inf"))
            l2 = s.logsumexp(-1)
            o2 = torch.exp(s - l2[:, None]) @ vx
            if pre_hi > pre_lo:
                o1, l1 = _prefix_fwd(q, kb[pre_lo:pre_hi], vb[pre_lo:pre_hi], scale)
                lt = torch.logaddexp(l1, l2)
                o2 = torch.exp(l1 - lt)[:, None] * o1 + torch.exp(l2 - lt)[:, None] * o2
                l2 = lt
            out[q0:q1] = o2
            lse[q0:q1] = l2
        ctx.save_for_backward(qs, k, v, pos, lb, out, lse)
        ctx.segs, ctx.scale = segs, scale
        return out.to(qs.dtype)

    @staticmethod
    def backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        qs, k, v, pos, lb, out, lse = ctx.saved_tensors
        scale = ctx.scale
        dout = dout.float()
        dq = torch.zeros(qs.shape, dtype=torch.float32, device=qs.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for q0, q1, b, h, pre_lo, pre_hi, lo, mid, hi in ctx.segs:
            q, do, o, l_ = qs[q0:q1], dout[q0:q1], out[q0:q1], lse[q0:q1]
            kb, vb = k[b, h], v[b, h]
            if pre_hi > pre_lo:
                dq1, dk1, dv1 = _prefix_bwd(do, q, kb[pre_lo:pre_hi], vb[pre_lo:pre_hi], o, l_, scale)
                dq[q0:q1] += dq1
                dk[b, h, pre_lo:pre_hi] += dk1
                dv[b, h, pre_lo:pre_hi] += dv1
            kx, vx = _ex_keys(kb, lo, mid, hi, pre_lo).float(), _ex_keys(vb, lo, mid, hi, pre_lo).float()
            jp = _ex_pos(lo, mid, hi, pre_lo, qs.device)
            qf = q.float()
            s = (qf @ kx.T) * scale
            s = s.masked_fill((jp[None, :] > pos[q0:q1, None]) | (jp[None, :] < lb[q0:q1, None]), float("-inf"))
            p = torch.exp(s - l_[:, None])
            dvx = p.T @ do
            ds = p * (do @ vx.T - (do * o).sum(-1, keepdim=True))
            dq[q0:q1] += (ds @ kx) * scale
            dkx = (ds.T @ qf) * scale
            if mid == lo:
                dk[b, h, lo:hi] += dkx
                dv[b, h, lo:hi] += dvx
            else:
                n1 = pre_lo - lo
                dk[b, h, lo:pre_lo] += dkx[:n1]
                dv[b, h, lo:pre_lo] += dvx[:n1]
                dk[b, h, mid:hi] += dkx[n1:]
                dv[b, h, mid:hi] += dvx[n1:]
        return dq.to(qs.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


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
