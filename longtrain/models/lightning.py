"""TransNormerLLM-style token mixer built on lightning attention.

    q = SiLU(x Wq), k = SiLU(x Wk), v = x Wv          [B, S, H, D], no RoPE: decay orders tokens
    o = attn_fn(q, k, v, decay)                         decay = tnl_decay(H, layer, n_layers)
    o = RMSNorm_per_head(o) * weight                    weight [H * D]
    out = (o * sigmoid(x Wg)) Wo
Choices and reasons are in docs/lightning.md. The model never knows whether the
sequence is split over processes: a sequence-parallel caller passes attn_fn.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.kernels.lightning.decay import tnl_decay

AttnFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _default_attn(q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> Tensor:
    from longtrain.kernels import lightning_attention

    return lightning_attention(q, k, v, decay)


class LightningAttention(nn.Module):
    """Linear-attention token mixer: x [B, S, dim] -> [B, S, dim].

    Parameters: wq, wk, wv, wg (dim -> H*D), wo (H*D -> dim), all without bias, and
    norm_weight [H*D]. Buffer `decay` [H] (fp32, not persistent: derived from
    n_heads, layer_idx, n_layers, and rebuilt after every .to()/to_empty()).
    """

    def __init__(self, dim: int, n_heads: int, head_dim: int, layer_idx: int, n_layers: int,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.layer_idx, self.n_layers, self.norm_eps = layer_idx, n_layers, norm_eps
        inner = n_heads * head_dim
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wk = nn.Linear(dim, inner, bias=False)
        self.wv = nn.Linear(dim, inner, bias=False)
        self.wg = nn.Linear(dim, inner, bias=False)
        self.wo = nn.Linear(inner, dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.register_buffer("decay", tnl_decay(n_heads, layer_idx, n_layers), persistent=False)

    def _fresh_decay(self, device: torch.device) -> Tensor:
        return tnl_decay(self.n_heads, self.layer_idx, self.n_layers).to(device)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the rates and to_empty() would leave garbage: the
        # decay is a pure function of the config, so rebuild it exactly in fp32.
        super()._apply(fn, recurse)
        self.decay = self._fresh_decay(self.decay.device)
        return self

    def reset_buffers(self) -> None:
        """Recompute the non-persistent decay (after `to_empty`)."""
        self.decay = self._fresh_decay(self.decay.device)

    def init_extra_parameters(self, write) -> None:
        """Called by Transformer.init_weights: norm weight to 1 (through `write`), decay rebuilt."""
        write(self.norm_weight, torch.ones(self.norm_weight.shape))
        self.decay = self._fresh_decay(self.decay.device)

    def reset_extra_parameters(self) -> None:
        """Norm weight to 1, decay rebuilt."""
        with torch.no_grad():
            self.init_extra_parameters(lambda p, v: p.copy_(v))

    def forward(self, x: Tensor, attn_fn: AttnFn | None = None) -> Tensor:
        B, S, _ = x.shape
        H, D = self.n_heads, self.head_dim
        q = F.silu(self.wq(x)).view(B, S, H, D)
        k = F.silu(self.wk(x)).view(B, S, H, D)
        v = self.wv(x).view(B, S, H, D)
        o = (attn_fn or _default_attn)(q, k, v, self.decay)
        dt = torch.promote_types(o.dtype, torch.float32)     # fp32 norm for half inputs
        of = o.to(dt)
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        o = (of.reshape(B, S, H * D) * self.norm_weight.to(dt)).to(x.dtype)
        return self.wo(o * torch.sigmoid(self.wg(x)))
