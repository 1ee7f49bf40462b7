"""The block API: `attention_block` (autograd) and the no-autograd `block_forward` / `block_backward`
that the rings call, dispatching every block to the kernel `dispatch.backend_for` picks."""

from __future__ import annotations

from typing import Sequence

import torch

from .dispatch import REGISTRY, backend_for
from .masks import NEG_INF, as_bounds
from .spec import BlockSpec, check_qkv, expand_kv, make_spec, reduce_kv_grad


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: BlockSpec):
    """No-autograd forward: (out [B,Sq,Hq,D] in q.dtype, lse fp32 [B,Hq,Sq])."""
    b, sq, hq, d = q.shape
    if spec.kind == "empty":
        return (q.new_zeros(b, sq, hq, d),
                torch.full((b, hq, sq), NEG_INF, dtype=torch.float32, device=q.device))
    be = REGISTRY[backend_for(q, spec)]
    if not be.native_gqa:
        k, v = expand_kv(k, hq), expand_kv(v, hq)
    out, lse = be.forward(q, k, v, spec)
    return out, lse.float()


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor | None, lse: torch.Tensor, spec: BlockSpec,
                   delta: torch.Tensor | None = None):
    """Gradients of one block given the FINAL out/lse of the rows (which may merge many blocks).

    `lse` fp32 [B,Hq,Sq] (-inf allowed on rows that see nothing at all). Instead of
    `out`, `delta` = rowsum(dout * out) fp32 [B,Hq,Sq] may be given (what TokenRing ships).
    Returns (dq, dk, dv) in the input dtypes; dk/dv have K's (possibly fewer, grouped) heads.
    """
    if spec.kind == "empty":
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # exp(s - (+inf)) = 0: rows that see nothing get zero gradients instead of NaN
    lse = lse.float().masked_fill(lse == NEG_INF, float("inf")).contiguous()
    if out is None:
        # Only rowsum(dout*out) enters the backward: build any `out` with that rowsum.
        do = dout.float()
        nrm = (do * do).sum(-1)  # [B,S,H]
        coef = torch.where(nrm > 0, delta.transpose(1, 2) / nrm.clamp_min(1e-30), torch.zeros_like(nrm))
        out = (do * coef[..., None]).to(dout.dtype)
    be = REGISTRY[backend_for(q, spec)]
    hq, hkv = q.shape[2], k.shape[2]
    if be.native_gqa or hq == hkv:
        return be.backward(dout, q, k, v, out, lse, spec)
    dq, dk, dv = be.backward(dout, q, expand_kv(k, hq), expand_kv(v, hq), out, lse, spec)
    return dq, reduce_kv_grad(dk, hkv), reduce_kv_grad(dv, hkv)


class _AttentionBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec):  # noqa: D401
        out, lse = block_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(dout.contiguous(), q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: float | None = None, window: int | None = None,
                    q_offset: int = 0, k_offset: int = 0,
                    cu_seqlens: torch.Tensor | Sequence[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query block to a key block, returning (out, lse).

    q [B,Sq,Hq,D], k/v [B,Sk,Hkv,D] with Hq a multiple of Hkv (GQA: query head h uses
    kv head h // (Hq/Hkv)). q_offset/k_offset are the global positions of the first
    query/key; masks (module docstring) use global positions. Returns out [B,Sq,Hq,D]
    in q.dtype and lse fp32 [B,Hq,Sq] (natural log; -inf on rows that see no key,
    whose out is 0). Differentiable w.r.t. q, k, v (lse is not differentiable).
    """
    check_qkv(q, k, v, window)
    spec = make_spec(q, k, causal=causal, softmax_scale=softmax_scale, window=window,
                     q_offset=q_offset, k_offset=k_offset, bounds=as_bounds(cu_seqlens))
    return _AttentionBlockFn.apply(q, k, v, spec)
