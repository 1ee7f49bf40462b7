"""The attention hook: how a layer's attention is computed for one batch.

Model layers call `ops.softmax(...)` or `ops.linear(...)` on their local q, k, v;
they never know whether the sequence is split over processes. `LocalAttention`
is the single-process default; parallel/ supplies a sequence-parallel one with
the same two methods.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from longtrain.kernels.documents import DocBounds, as_doc_bounds


class AttentionOps(Protocol):
    def softmax(self, q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                softmax_scale: float | None = None) -> Tensor:
        """Causal softmax attention. q [B,S,Hq,D], k/v [B,S,Hkv,D] -> [B,S,Hq,D]."""
        ...

    def linear(self, q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> Tensor:
        """Lightning attention with per-head decay rate `decay` [H] -> [B,S,H,Dv]."""
        ...


class LocalAttention:
    """Single-process attention; `cu_seqlens` [n_docs+1] masks attention across packed documents.

    The bounds are kept on the host (a DocBounds, read once here if a tensor is given): build one
    object per micro-batch, outside the model, and no layer or recompute waits for the device.
    """

    def __init__(self, cu_seqlens: Tensor | Sequence[int] | None = None) -> None:
        self.cu_seqlens: DocBounds | None = as_doc_bounds(cu_seqlens)

    @torch.compiler.disable  # fused kernels / communication: outside compiled graphs (training.compile)
    def softmax(self, q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                softmax_scale: float | None = None) -> Tensor:
        from longtrain.kernels import attention_block

        out, _ = attention_block(q, k, v, causal=True, softmax_scale=softmax_scale, window=window,
                                 cu_seqlens=self.cu_seqlens)
        return out

    @torch.compiler.disable
    def linear(self, q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> Tensor:
        from longtrain.kernels import lightning_attention

        return lightning_attention(q, k, v, decay, cu_seqlens=self.cu_seqlens)


def default_ops() -> AttentionOps:
    return LocalAttention()


__all__ = ["AttentionOps", "LocalAttention", "default_ops"]
