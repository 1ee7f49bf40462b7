"""`cpu` backend: torch's flash-attention CPU op and its backward (grouped K/V heads taken as they
are; an explicit additive mask for partial blocks)."""

from __future__ import annotations

import torch

from .masks import NEG_INF
from .spec import BlockSpec, swap_seq_heads


def _additive_mask(q, spec: BlockSpec):
    keep = spec.mask(q.device)
    return keep, torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, NEG_INF)


def cpu_forward(q, k, v, spec: BlockSpec):
    keep = mask = None
    if spec.kind == "partial":
        keep, mask = _additive_mask(q, spec)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        swap_seq_heads(q), swap_seq_heads(k), swap_seq_heads(v), 0.0, spec.kind == "causal", attn_mask=mask,
        scale=spec.scale)
    out = swap_seq_heads(out)
    if keep is not None:
        dead = ~keep.any(dim=1)  # rows with no visible key: the op reports lse = 0 there
        # unconditional: `if bool(dead.any())` would be a host sync per masked block (issue 23 item 2)
        lse = lse.masked_fill(dead, NEG_INF)
        out = out.masked_fill(dead[None, :, None, None], 0.0)
    return out, lse


def cpu_backward(dout, q, k, v, out, lse, spec: BlockSpec):
    mask = None
    if spec.kind == "partial":
        _, mask = _additive_mask(q, spec)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        swap_seq_heads(dout), swap_seq_heads(q), swap_seq_heads(k), swap_seq_heads(v), swap_seq_heads(out), lse,
        0.0, spec.kind == "causal", attn_mask=mask, scale=spec.scale)
    return swap_seq_heads(dq), swap_seq_heads(dk), swap_seq_heads(dv)
