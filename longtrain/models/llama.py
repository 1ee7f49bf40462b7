"""LLaMA decoder: RMSNorm, RoPE with explicit positions, SwiGLU, GQA.

The model knows nothing about processes: attention goes through an
`AttentionOps` hook (models/ops.py) and positions are given explicitly, so a
sequence-parallel caller hands in its local tokens, their global positions and
a distributed ops object.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longtrain.models.config import ModelConfig
from longtrain.models.ops import AttentionOps, LocalAttention
from longtrain.models.spans import Span, layer_plan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """Inverse frequencies [head_dim/2] (fp32), with HF-style 'linear' or 'llama3' scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
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


class Attention(nn.Module):
    """Causal GQA softmax attention over a full or windowed span."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, span: Span) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = span.window if span.kind == "window" else None
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], ops: AttentionOps) -> Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = ops.softmax(q, k, v, window=self.window)
        return self.wo(o.reshape(B, S, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _make_mixer(cfg: ModelConfig, layer_idx: int, span: Span) -> nn.Module:
    if span.kind == "lightning":
        from longtrain.models.lightning import LightningAttention

        return LightningAttention(cfg.dim, cfg.n_heads, cfg.head_dim, layer_idx, cfg.n_layers, cfg.norm_eps)
    if cfg.moh is not None:
        from longtrain.models.moh import MoHAttention

        return MoHAttention(cfg, layer_idx, span)
    return Attention(cfg, layer_idx, span)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, span: Span) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.span = span
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = _make_mixer(cfg, layer_idx, span)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)
        self.mesa_scope: Any = None  # set by enable_mesa(): a callable returning a context manager

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], ops: AttentionOps) -> Tensor:
        ctx = self.mesa_scope() if self.mesa_scope is not None else nullcontext()
        with ctx:
            h = self.attn_norm(x)
            if self.span.kind == "lightning":
                h = self.attn(h, attn_fn=ops.linear)
            else:
                h = self.attn(h, rope, ops)
            x = x + h
            return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. forward(tokens [B,S], positions [S] or [B,S], ops) -> logits [B,S,V] (fp32)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.spans = layer_plan(cfg.attention, cfg.n_layers)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, s) for i, s in enumerate(self.spans))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.activation_checkpointing = False
        self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for matrices, output projections scaled by 1/sqrt(2 L); norms at 1."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, RMSNorm):
                    m.weight.fill_(1.0)
                elif isinstance(m, (nn.Linear, nn.Embedding)):
                    s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo", "w2", "out_proj")) else std
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * s)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
                elif hasattr(m, "reset_extra_parameters"):
                    m.reset_extra_parameters()

    def set_rope(self, theta: float | None = None, scaling: dict[str, Any] | None = None) -> None:
        """Change RoPE base/scaling (staged long-context continue-tuning)."""
        if theta is not None:
            self.cfg.rope_theta = theta
        if scaling is not None:
            self.cfg.rope_scaling = scaling
        self.inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling).to(
            self.inv_freq.device)

    def forward(self, tokens: Tensor, positions: Tensor | None = None,
                ops: AttentionOps | None = None) -> Tensor:
        B, S = tokens.shape
        if positions is None:
            positions = torch.arange(S, device=tokens.device)
        ops = ops if ops is not None else LocalAttention()
        rope = rope_cos_sin(positions, self.inv_freq)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = checkpoint(layer, h, rope, ops, use_reentrant=False)
            else:
                h = layer(h, rope, ops)
        return self.output(self.norm(h)).float()

    def aux_loss(self) -> Tensor | None:
        """Sum of auxiliary losses (MoH load balance) from the last forward, or None."""
        losses = [m.last_aux_loss for m in self.modules()
                  if getattr(m, "last_aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None


def lm_loss_sum(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed token cross-entropy and the number of counted targets (divide by the GLOBAL count)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()
