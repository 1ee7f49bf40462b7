"""Reference lightning attention: the token-by-token recurrence (slow, exact).

Per head h with lambda = exp(-decay[h]) and positions p = 0..S-1:
    S_p = lambda * S_{p-1} + k_p v_p^T      (S_{-1} = initial_state or 0)
    o_p = q_p^T S_p
so o_p = sum_{j<=p} lambda^(p-j) (q_p . k_j) v_j + q_p^T lambda^(p+1) S_{-1}.
A document start (an interior value of cu_seqlens) sets the state to zero first.
"""

from __future__ import annotations

from typing import Sequence

import torch


def naive_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              decay: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                              return_state: bool = False,
                              cu_seqlens: torch.Tensor | Sequence[int] | None = None):
    """q, k [B, S, H, Dk], v [B, S, H, Dv], decay [H] -> out [B, S, H, Dv] (, state).

    Computes in fp64 when q is fp64, else fp32; state [B, H, Dk, Dv] in that dtype.
    Differentiable through autograd (memory grows with S: tests only).
    """
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lam = torch.exp(-decay.detach().to(device=q.device, dtype=dt)).view(1, H, 1, 1)
    zero = q.new_zeros(B, H, Dk, Dv, dtype=dt)
    state = zero if initial_state is None else initial_state.to(dt)
    starts = set()
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        starts = {int(x) for x in cu[1:-1]}
    outs = []
    for p, (qp, kp, vp) in enumerate(zip(q.to(dt).unbind(1), k.to(dt).unbind(1),
                                         v.to(dt).unbind(1))):
        if p in starts:
            state = zero
        state = lam * state + kp.unsqueeze(-1) * vp.unsqueeze(-2)
        outs.append(torch.einsum("bhd,bhde->bhe", qp, state))
    out = torch.stack(outs, 1).to(q.dtype)
    return (out, state) if return_state else out
