"""Layers the attention kinds share: RMSNorm and rotary position embeddings (RoPE) with explicit
global positions (HF LLaMA conventions)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm that saves only its input (in the input's dtype) and the fp32 rstd [..., 1] for
    backward, instead of autograd's fp32 copy of the input and the fp32 normalised tensor: per
    token 2 d + 4 bytes in bf16 instead of 8 d (the recomputed layer of LLaMA-3-8B: 108 -> 60 KiB
    per token). The forward is the same operations in the same order (bitwise equal)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return (xf * rstd * weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, rstd, weight = ctx.saved_tensors
        xf, g = x.float(), grad.float()
        y = xf * rstd
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * y).reshape(-1, y.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            gy = g * weight.float()
            # y = x r with r = (mean(x^2) + eps)^-1/2: dx = r gy - x r^3 mean(gy x)
            dx = (rstd * gy - xf * rstd.pow(3) * (gy * xf).mean(-1, keepdim=True)).to(x.dtype)
        return dx, dw, None


class RMSNorm(nn.Module):
    """x [..., dim] -> x / rms(x) * weight, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """Inverse frequencies [head_dim/2] (fp32, on the CPU), with HF-style 'linear' or 'llama3' scaling."""
    # on the CPU even while a model is built on the meta device (its buffers are recomputed after
    # to_empty): meta arithmetic runs through torch._refs, which imports torch._dynamo (~1 s)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        factor = float(scaling.get("factor", 1.0))
        if kind == "linear":
            inv = inv / factor
        elif kind == "llama3":
            low = float(scaling.get("low_freq_factor", 1.0))
            high = float(scaling.get("high_freq_factor", 4.0))
            old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
            low_wl, high_wl = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv
            smooth = (old_ctx / wavelen - low) / (high - low)
            scaled = torch.where(wavelen > low_wl, inv / factor, inv)
            mid = (1 - smooth) * inv / factor + smooth * inv
            is_mid = (wavelen <= low_wl) & (wavelen >= high_wl)
            inv = torch.where(is_mid, mid, scaled)
        elif kind not in ("default", None):
            raise ValueError(f"unsupported rope_scaling type {kind!r} (use 'linear' or 'llama3')")
    return inv.float()


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """positions [S] or [B,S] (global token positions) -> cos, sin [B|1, S, 1, head_dim] fp32."""
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the HF LLaMA convention) on x [B,S,H,D]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
