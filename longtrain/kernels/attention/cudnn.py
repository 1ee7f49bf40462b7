"""`cudnn`: torch's cuDNN attention (`aten._scaled_dot_product_cudnn_attention`, what the public
F.scaled_dot_product_attention picks on Hopper and Blackwell) for full and square causal blocks.

Schema (torch 2.13):
  _scaled_dot_product_cudnn_attention(q, k, v, attn_bias?, compute_log_sumexp, dropout_p=0,
      is_causal=False, return_debug_mask=False, *, scale=None)
      -> (out, logsumexp [B,H,Sq,1] fp32, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed,
          philox_offset, debug_attn_mask)
  _scaled_dot_product_cudnn_attention_backward(grad_out, q, k, v, out, logsumexp, philox_seed,
      philox_offset, attn_bias, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, *, scale)
      -> (dq, dk, dv)
Tensors are [B,H,S,D] views of contiguous [B,S,H,D] ("BSHD", the layout cuDNN wants); the lse is
the natural log, like the flash kernels' (torch's own context-parallel ring merges it the same
way), and the backward takes the final (merged) out and lse. K/V with fewer heads go in as they are.
"""

from __future__ import annotations

import torch

from .spec import BlockSpec, swap_seq_heads

_CUDNN_AUX: dict = {}  # device -> (philox_seed, philox_offset, cum_seq_q, cum_seq_k) of a dense forward


def _bshd(x: torch.Tensor) -> torch.Tensor:
    return swap_seq_heads(x.contiguous())


def cudnn_forward(q, k, v, spec: BlockSpec):
    b, sq, h, _ = q.shape
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bshd(q), _bshd(k), _bshd(v), None, True, 0.0, spec.kind == "causal", False, scale=spec.scale)
    out, lse = res[0], res[1]
    _CUDNN_AUX[q.device] = (res[6], res[7], res[2], res[3])  # dropout 0: never read, but passed back
    return swap_seq_heads(out), lse.reshape(b, h, sq)


def cudnn_backward(dout, q, k, v, out, lse, spec: BlockSpec):
    sq, sk = q.shape[1], k.shape[1]
    if q.device not in _CUDNN_AUX:  # backward before any forward in this process
        cudnn_forward(q[:, :2], k[:, :2], v[:, :2], BlockSpec(2, 2, False, spec.scale, None, 0, 0, None))
    seed, offset, cq, ck = _CUDNN_AUX[q.device]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bshd(dout), _bshd(q), _bshd(k), _bshd(v), _bshd(out), lse.unsqueeze(-1).contiguous(), seed, offset,
        None, cq, ck, sq, sk, 0.0, spec.kind == "causal", scale=spec.scale)
    return swap_seq_heads(dq), swap_seq_heads(dk), swap_seq_heads(dv)
