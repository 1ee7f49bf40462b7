"""The plain-torch twins: `naive_attention` (independent O(S^2) reference over a whole sequence)
and the `math` backend (fp32 einsum with an explicit Sq x Sk mask for one block: the reference the
fused backends are checked against, and the CUDA path for blocks of at most MATH_MAX_PAIRS).

The math backend takes grouped K/V heads as they are (queries viewed as [.., Hkv, G, ..]);
`naive_attention` repeats K/V on purpose, to stay independent of it.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .masks import NEG_INF
from .spec import BlockSpec


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:  # [B,S,Hq,D] -> [B,S,Hkv,G,D] (a view)
    b, s, h, d = x.shape
    return x.view(b, s, hkv, h // hkv, d)


def _math_scores(q, k, spec: BlockSpec):
    """fp32 scores [B, Hkv, G, Sq, Sk] (query head h = kv head * G + g), -inf where masked."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", _grouped(q, k.shape[2]).float(), k.float()) * spec.scale
    if spec.kind != "full":
        s = s.masked_fill(~spec.mask(q.device), NEG_INF)
    return s


def math_forward(q, k, v, spec: BlockSpec):
    b, sq, hq, d = q.shape
    s = _math_scores(q, k, spec)
    lse = torch.logsumexp(s, dim=-1)  # [B,Hkv,G,Sq], -inf on dead rows
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.float()).reshape(b, sq, hq, d)
    return out.to(q.dtype), lse.reshape(b, hq, sq)


def math_backward(dout, q, k, v, out, lse, spec: BlockSpec):
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    s = _math_scores(q, k, spec)
    p = torch.exp(s - lse.view(b, hkv, hq // hkv, sq)[..., None])  # lse = +inf on dead rows -> p = 0
    do = _grouped(dout, hkv).float()
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)
    dp = torch.einsum("bqhgd,bkhd->bhgqk", do, v.float())
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).reshape(b, hkv, hq // hkv, sq)
    ds = p * (dp - delta[..., None]) * spec.scale
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.float()).reshape(b, sq, hq, d)
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, _grouped(q, hkv).float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: float | None = None, window: int | None = None,
                    cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """O(S^2) reference in plain torch (fp32 math, explicit masks, autograd backward).

    q [B,S,Hq,D], k/v [B,S,Hkv,D]; positions are 0..S-1. Returns out in q.dtype.
    Written independently of attention_block's mask code on purpose.
    """
    b, s, hq, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    rep = hq // k.shape[2]
    kf = k.float().repeat_interleave(rep, dim=2)
    vf = v.float().repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), kf) * scale
    qi = torch.arange(s).view(-1, 1)
    kj = torch.arange(sk).view(1, -1)
    allowed = torch.ones(s, sk, dtype=torch.bool)
    if causal:
        allowed = allowed & (kj <= qi)
    if window is not None:
        dist_ = qi - kj
        allowed = allowed & (dist_ < window) & ((dist_ > -window) if not causal else True)
    if cu_seqlens is not None:
        cu = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
        n = max(s, sk)
        lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)] + [max(0, n - cu[-1])]
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        allowed = allowed & (doc[:s].view(-1, 1) == doc[:sk].view(1, -1))
    allowed = allowed.to(q.device)
    alive = allowed.any(dim=1)  # rows that see at least one key
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores.masked_fill(~alive.view(-1, 1), 0.0)  # keep softmax finite on dead rows
    probs = torch.softmax(scores, dim=-1) * alive.view(-1, 1)
    out = torch.einsum("bhij,bjhd->bihd", probs, vf)
    return out.to(q.dtype)
