"""One block call without its tensors (`BlockSpec`), argument checks, and layout/GQA helpers."""

from __future__ import annotations

import math

import torch

from .masks import Bounds, block_mask, classify_block


class BlockSpec:
    """Everything about one block call except the tensors."""

    __slots__ = ("causal", "scale", "window", "q_offset", "k_offset", "bounds", "kind", "sq", "sk")

    def __init__(self, sq: int, sk: int, causal: bool, scale: float, window: int | None,
                 q_offset: int, k_offset: int, bounds: Bounds | None):
        self.sq, self.sk = sq, sk
        self.causal, self.scale, self.window = causal, scale, window
        self.q_offset, self.k_offset, self.bounds = q_offset, k_offset, bounds
        kind = classify_block(q_offset, sq, k_offset, sk, causal=causal, window=window, bounds=bounds)
        if kind == "partial" and causal and window is None and q_offset == k_offset and sq <= sk \
                and classify_block(q_offset, sq, k_offset, sk, causal=False, bounds=bounds) == "full":
            kind = "causal"  # plain causal aligned at the top-left corner: no explicit mask
        self.kind = kind  # 'empty' | 'full' | 'causal' | 'partial'

    def mask(self, device: torch.device) -> torch.Tensor:
        return block_mask(self.sq, self.sk, q_offset=self.q_offset, k_offset=self.k_offset,
                          causal=self.causal, window=self.window, bounds=self.bounds, device=device)


def default_scale(d: int, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,Sq,Hq,D], k/v [B,Sk,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} "
                         "(batch/head_dim must match, Hq a multiple of Hkv)")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 (keys including self), got {window}")


def make_spec(q: torch.Tensor, k: torch.Tensor, *, causal: bool, softmax_scale: float | None,
              window: int | None, q_offset: int, k_offset: int, bounds: Bounds | None) -> BlockSpec:
    return BlockSpec(q.shape[1], k.shape[1], causal, default_scale(q.shape[-1], softmax_scale),
                 None if window is None else int(window), int(q_offset), int(k_offset), bounds)


def swap_seq_heads(x: torch.Tensor) -> torch.Tensor:  # [B,S,H,D] <-> [B,H,S,D] as a view
    return x.transpose(1, 2)


def expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """K or V [B,S,Hkv,D] copied to Hq heads (query head h uses kv head h // (Hq/Hkv)); only for a
    kernel that cannot take grouped heads (see `native_gqa` in the dispatch table)."""
    g = hq // x.shape[2]
    return x if g == 1 else x.repeat_interleave(g, dim=2)


def reduce_kv_grad(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """dK or dV [B,S,Hq,D] of expanded heads summed back to the Hkv shared heads."""
    b, sk, hq, d = g.shape
    return g if hq == hkv else g.view(b, sk, hkv, hq // hkv, d).sum(3)
