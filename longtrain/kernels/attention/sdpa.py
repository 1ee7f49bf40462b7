"""`sdpa_flash` and `sdpa_efficient`: torch's fused CUDA kernels behind F.scaled_dot_product_attention,
called through their aten ops because those return the log-sum-exp, and their backward ops take
the final (merged) out and lse, exactly what a ring needs. Full and top-left causal blocks only
(the flash op aligns a causal mask bottom-right when Sq != Sk, so dispatch sends it square causal
blocks only). The flash op takes K/V with fewer heads as they are (as the public API's enable_gqa
does; its backward returns dK/dV already summed over each group); the efficient op's backward
returns dK/dV per query head, so it is given repeated K/V (`native_gqa` in dispatch.py).
"""

from __future__ import annotations

import torch

from .spec import BlockSpec, swap_seq_heads

_FLASH_AUX: dict = {}  # device -> (cum_seq_q, cum_seq_k, rng_state, unused) of a dense forward
_EFF_LSE_WIDTH: dict = {}  # Sq -> width of the efficient kernel's lse (it pads rows on some versions)


def _sdpa_forward(q, k, v, spec: BlockSpec, efficient: bool):
    sq = q.shape[1]
    causal = spec.kind == "causal"
    if not efficient:
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            swap_seq_heads(q), swap_seq_heads(k), swap_seq_heads(v), 0.0, causal, False, scale=spec.scale)
        out, lse = res[0], res[1]
        # the dense (not varlen) markers and rng state of a no-dropout call: the backward needs
        # these exact objects (an empty int64 tensor would send it down the varlen path)
        _FLASH_AUX[q.device] = (res[2], res[3], res[6], res[7])
    else:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            swap_seq_heads(q), swap_seq_heads(k), swap_seq_heads(v), None, True, 0.0, causal, scale=spec.scale)
        _EFF_LSE_WIDTH[sq] = lse.shape[-1]
        lse = lse[..., :sq]
    return swap_seq_heads(out), lse


def _philox(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros((), dtype=torch.int64, device=device)  # dropout 0: never read
    return z, z


def _sdpa_backward(dout, q, k, v, out, lse, spec: BlockSpec, efficient: bool):
    sq, sk = q.shape[1], k.shape[1]
    causal = spec.kind == "causal"
    if not efficient:
        if q.device not in _FLASH_AUX:  # backward before any forward in this process: make the markers
            _sdpa_forward(q[:, :1], k[:, :1], v[:, :1], BlockSpec(1, 1, False, spec.scale, None, 0, 0, None), False)
        cq, ck, seed, offset = _FLASH_AUX[q.device]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            swap_seq_heads(dout), swap_seq_heads(q), swap_seq_heads(k), swap_seq_heads(v), swap_seq_heads(out), lse,
            cq, ck, sq, sk, 0.0, causal, seed, offset, scale=spec.scale)
    else:
        width = _EFF_LSE_WIDTH.get(sq, sq)
        if width != sq:
            lse = torch.nn.functional.pad(lse, (0, width - sq))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            swap_seq_heads(dout), swap_seq_heads(q), swap_seq_heads(k), swap_seq_heads(v), None, swap_seq_heads(out),
            lse, *_philox(q.device), 0.0, [True, True, True, False], causal, scale=spec.scale)
    return swap_seq_heads(dq), swap_seq_heads(dk), swap_seq_heads(dv)


def sdpa_flash_forward(q, k, v, spec: BlockSpec):
    return _sdpa_forward(q, k, v, spec, efficient=False)


def sdpa_flash_backward(dout, q, k, v, out, lse, spec: BlockSpec):
    return _sdpa_backward(dout, q, k, v, out, lse, spec, efficient=False)


def sdpa_efficient_forward(q, k, v, spec: BlockSpec):
    return _sdpa_forward(q, k, v, spec, efficient=True)


def sdpa_efficient_backward(dout, q, k, v, out, lse, spec: BlockSpec):
    return _sdpa_backward(dout, q, k, v, out, lse, spec, efficient=True)
