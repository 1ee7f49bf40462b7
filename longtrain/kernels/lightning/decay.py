"""TransNormerLLM decay rates: one rate s_h >= 0 per head, lambda_h = exp(-s_h)."""

from __future__ import annotations

import torch


def _slopes(n: int) -> list[float]:
    # ALiBi/TNL rule: for n a power of two s_i = 2^(-8 (i+1) / n); otherwise the
    # slopes of the largest power of two below n, completed with every other
    # slope of the doubled set.
    if n & (n - 1) == 0:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    p = 1 << (n.bit_length() - 1)
    return _slopes(p) + _slopes(2 * p)[0::2][: n - p]


def tnl_decay(n_heads: int, layer: int, n_layers: int) -> torch.Tensor:
    """Per-head decay rates [n_heads] (fp32, CPU) of layer `layer` (0-based) of `n_layers`.

    s_h = slope_h * (1 - layer / (n_layers - 1) + 1e-5): the first layer decays
    fastest, the last one almost not at all. With one layer the factor is 1 + 1e-5
    (TNL divides by n_layers - 1; we read l / (L - 1) as 0 when L = 1).
    """
    if n_heads < 1 or n_layers < 1 or not 0 <= layer < n_layers:
        raise ValueError(f"bad tnl_decay arguments: n_heads={n_heads}, layer={layer}, "
                         f"n_layers={n_layers}")
    frac = layer / (n_layers - 1) if n_layers > 1 else 0.0
    factor = 1.0 - frac + 1e-5
    return torch.tensor([s * factor for s in _slopes(n_heads)], dtype=torch.float32)
