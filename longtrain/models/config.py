"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MoHConfig:
    """Mixture-of-Head attention: `shared_heads` always on, `routed_heads` of the rest per token."""

    shared_heads: int = 0
    routed_heads: int = 0  # k: routed heads active per token
    router: str = "learned"  # "learned" | "query_norm"
    aux_loss_coef: float = 0.01


@dataclass
class ModelConfig:
    """LLaMA-family decoder. Sizes in elements; head_dim defaults to dim // n_heads."""

    vocab_size: int = 320
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention: list[str] = field(default_factory=lambda: ["full"])
    moh: MoHConfig | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads if self.n_heads else 0
        if self.ffn_dim is None:
            # LLaMA: 2/3 * 4 * dim rounded up to a multiple of 64
            self.ffn_dim = 64 * ((int(8 * self.dim / 3) + 63) // 64)
        if isinstance(self.moh, dict):
            self.moh = MoHConfig(**self.moh)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim ({self.head_dim}) must be even for RoPE")
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        from longtrain.models.spans import layer_plan

        layer_plan(self.attention, self.n_layers)
        if self.moh is not None:
            m = self.moh
            if m.router not in ("learned", "query_norm"):
                raise ValueError(f"model.moh.router must be 'learned' or 'query_norm', got {m.router!r}")
            if m.shared_heads < 0 or m.routed_heads <= 0 or m.shared_heads + m.routed_heads > self.n_heads:
                raise ValueError(f"model.moh: need 0 <= shared_heads and 0 < routed_heads with shared+routed <= n_heads "
                                 f"({m.shared_heads}+{m.routed_heads} vs {self.n_heads})")

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings included)."""
        d, f, L = self.dim, self.ffn_dim, self.n_layers
        hq, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * hd * (hq + 2 * hkv) + hq * hd * d
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * per_layer + emb + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=320, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                 max_seq_len=4096),
    "small": dict(vocab_size=320, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536,
                  max_seq_len=16384),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5),
    "llama3-70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       ffn_dim=28672, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5),
    "moh-llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192, norm_eps=1e-5,
                          moh=dict(shared_heads=16, routed_heads=8, router="query_norm")),
    "masformer-1.3b": dict(vocab_size=32000, dim=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                           ffn_dim=5632, max_seq_len=8192,
                           attention=["full", "window:1024", "window:1024", "window:1024"]),
    "tnl-1b": dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16,
                   ffn_dim=5632, max_seq_len=8192, attention=["lightning"]),
}


def model_config(preset: str | None = None, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a preset name plus field overrides."""
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(preset, PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown model preset {preset!r}{hint}; known: {', '.join(PRESETS)}")
        base = dict(PRESETS[preset])
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**base)
