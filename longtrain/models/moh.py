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

import torch
from torch import Tensor, nn

from longtrain.models.config import ModelConfig
from longtrain.models.layers import apply_rope
from longtrain.models.moh_sparse import (CompactCausalAttention, SparseQueryAttention, auto_block_size, diagonal_mask,
                                         doc_starts, has_cpu_flash, prefix_runs, upcast)
from longtrain.models.ops import AttentionOps, LocalAttention
from longtrain.models.spans import Span


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
            probs = torch.softmax(upcast(self.router(x)), dim=-1)  # [B,S,E]
            top = probs.topk(k, dim=-1).indices
            sel = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top, True)
            masked = probs * sel
            denom = masked.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).eps)
            routed = masked / denom * k
            if hs > 0:
                shared = (torch.softmax(upcast(self.shared_gate(x)), dim=-1) * hs if hs > 1
                          else probs.new_ones(B, S, 1))
                a = torch.softmax(upcast(self.stage_gate(x)), dim=-1) * 2
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
                norms = upcast(q_pre[:, :, hs:]).norm(dim=-1)  # [B,S,E]
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
                and has_cpu_flash(q)):
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
            C = self.block_size or min(512, auto_block_size(S))
            out = CompactCausalAttention.apply(qr, kr, vr, selT, C, 1.0 / math.sqrt(D))
            return self._place(out, flat, gates, parts, B, E, S, D)
        pos = flat % S
        doc_start = doc_starts(ops.cu_seqlens, S, q.device)
        ds = doc_start.index_select(0, pos) if doc_start is not None else torch.zeros_like(pos)
        lb = ds if self.window is None else torch.maximum(ds, pos - self.window + 1)
        P = self.block_size or auto_block_size(S)
        segs = prefix_runs(flat // S, pos, ds, P, S, self.window)
        mask = diagonal_mask(P, S, B, self.window, ops.cu_seqlens, q.dtype, q.device)
        out = SparseQueryAttention.apply(qr, kr, vr, flat, pos, lb, segs, mask, P, 1.0 / math.sqrt(D))
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
