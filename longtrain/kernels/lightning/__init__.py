"""Lightning (linear) attention with per-head exponential decay.

    o_p = sum_{j<=p} lambda_h^(p-j) (q_p . k_j) v_j  +  q_p^T lambda_h^(p+1) S_0,
    lambda_h = exp(-decay[h]), no 1/sqrt(D) scaling, positions p = 0..S-1.
The state after the sequence is S = lambda^S S_0 + sum_j lambda^(S-1-j) k_j v_j^T (fp32),
so running two halves with the first half's state as the second's initial_state
equals one run. Interior cu_seqlens values start new documents: the state is
zeroed there (initial_state only reaches the first document; the returned state
is the last document's).
"""

from __future__ import annotations

import importlib.util

import torch

from .chunk import chunk_lightning_attention
from .decay import tnl_decay
from .naive import naive_lightning_attention

BACKENDS = ("auto", "torch", "triton", "naive")
# The Triton kernels work on head-dimension tiles (16 or 32 wide), so their registers and shared
# memory do not grow with the head dim; `longtrain bench kernels` checks 64 and 128 ahead of time
# for sm_80 and sm_90 (docs/lightning.md). Above this, "auto" keeps the torch path: not
# checked, and the per-block fp32 states (S/64 x Dk x Dv x 4 bytes per head) grow as D^2.
TRITON_MAX_HEAD_DIM = 128


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device, dk: int, dv: int) -> str:
    """The backend `lightning_attention` runs: "auto" is "triton" on CUDA when triton is
    importable and Dk, Dv <= TRITON_MAX_HEAD_DIM, else "torch"; others are returned as given."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    fits = max(dk, dv) <= TRITON_MAX_HEAD_DIM
    return "triton" if device.type == "cuda" and fits and _triton_available() else "torch"


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor,
                        *, initial_state: torch.Tensor | None = None, return_state: bool = False,
                        cu_seqlens: torch.Tensor | None = None, backend: str = "auto",
                        block_size: int | None = None):
    """Causal linear attention with per-head decay.

    q, k: [B, S, H, Dk]; v: [B, S, H, Dv]; decay: [H] rates s >= 0 (not trained).
    initial_state: [B, H, Dk, Dv] (any float dtype; used in fp32).
    cu_seqlens: int [n_docs + 1] from 0 to S, shared by all batch rows.
    backend: "auto" (triton on CUDA when importable and Dk, Dv <= 128, else "torch"), "torch"
    (blocked, any device), "triton", "naive" (token recurrence, reference only).
    block_size: tokens per block (default 64; triton needs a power of two >= 16).
    Returns out [B, S, H, Dv] in q's dtype, and with return_state the final state
    fp32 [B, H, Dk, Dv]. Differentiable w.r.t. q, k, v and initial_state.
    """
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k [B, S, H, Dk] and v [B, S, H, Dv], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, S, H, Dk = q.shape
    if decay.shape != (H,):
        raise ValueError(f"decay must have shape [{H}] (one rate per head), got "
                         f"{tuple(decay.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    backend = resolve_backend(backend, q.device, Dk, v.shape[-1])
    kwargs = dict(initial_state=initial_state, return_state=return_state, cu_seqlens=cu_seqlens)
    if backend == "naive":
        out = naive_lightning_attention(q, k, v, decay, **kwargs)
        if return_state:
            return out[0], out[1].float()
        return out
    if backend == "triton":
        from .triton import triton_lightning_attention
        return triton_lightning_attention(q, k, v, decay, block_size=block_size, **kwargs)
    return chunk_lightning_attention(q, k, v, decay, block_size=block_size, **kwargs)


__all__ = ["lightning_attention", "tnl_decay", "naive_lightning_attention",
           "chunk_lightning_attention", "resolve_backend", "BACKENDS", "TRITON_MAX_HEAD_DIM"]
