"""`cpu` backend: torch's flash-attention CPU op and its backward (grouped K/V heads taken as they
are; an explicit additive mask for partial blocks)."""

from __future__ import annotations

import torch

from .masks import NEG_INF
from .spec import _Spec, _t


def _additive_mask(q, spec: _Spec):
    keep = spec.mask(q.device)
    return keep, torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, NEG_INF)


def _cpu_forward(q, k, v, spec: _Spec):
    keep = mask = None
    if spec.kind == "partial":
        keep, mask = _additive_mask(q, spec)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _t(q), _t(k), _t(v), 0.0, spec.kind == "causal", attn_mask=mask, scale=spec.scale)
    out = _t(out)
    if keep is not None:
        dead = ~keep.any(dim=1)  # rows with no visible key: the op reports lse = 0 there
        # unconditional: `if bool(dead.any())` would be a host sync per masked block (issue 23 item 2)
        lse = lse.masked_fill(dead, NEG_INF)
        out = out.masked_fill(dead[None, :, None, None], 0.0)
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, spec: _Spec):
    mask = None
    if spec.kind == "partial":
        _, mask = _additive_mask(q, spec)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _t(dout), _t(q), _t(k), _t(v), _t(out), lse, 0.0, spec.kind == "causal",
        attn_mask=mask, scale=spec.scale)
    return _t(dq), _t(dk), _t(dv)
