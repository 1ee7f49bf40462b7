"""The attention hook: how a layer's attention is computed for one batch.

Model layers call `ops.softmax(...)` or `ops.linear(...)` on their local q, k, v;
they never know whether the sequence is split over processes. `LocalAttention`
is the single-process default; parallel/ supplies a sequence-parallel one with
the same two methods.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from longtrain.kernels.documents import DocBounds, as_doc_bounds


_UNMARKED: list[tuple[type, str]] = []  # @outside_compile methods not yet wrapped in torch.compiler.disable
_MARKING = {"on": False}


class outside_compile:  # noqa: N801 - used as a decorator
    """Method decorator: the method runs outside torch.compile graphs (fused kernels, communication),
    so a compiled block breaks its graph around it.

    torch.compiler.disable imports torch._dynamo, 1.3 s in every process: the mark is applied by
    mark_compile_boundaries(), which compile paths call first, so a run that compiles nothing never
    imports it. The class attribute stays the plain function until then.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __set_name__(self, owner: type, name: str) -> None:
        setattr(owner, name, torch.compiler.disable(self.fn) if _MARKING["on"] else self.fn)
        if not _MARKING["on"]:
            _UNMARKED.append((owner, name))


def mark_compile_boundaries() -> None:
    """Wrap every @outside_compile method (also of classes defined later) in torch.compiler.disable."""
    _MARKING["on"] = True
    while _UNMARKED:
        owner, name = _UNMARKED.pop()
        setattr(owner, name, torch.compiler.disable(getattr(owner, name)))


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

    @outside_compile  # fused kernels: outside compiled graphs (training.compile)
    def softmax(self, q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                softmax_scale: float | None = None) -> Tensor:
        from longtrain.kernels import attention_block

        out, _ = attention_block(q, k, v, causal=True, softmax_scale=softmax_scale, window=window,
                                 cu_seqlens=self.cu_seqlens)
        return out

    @outside_compile
    def linear(self, q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> Tensor:
        from longtrain.kernels import lightning_attention

        return lightning_attention(q, k, v, decay, cu_seqlens=self.cu_seqlens)


__all__ = ["AttentionOps", "LocalAttention", "mark_compile_boundaries", "outside_compile"]
