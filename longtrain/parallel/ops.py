"""Sequence-parallel implementation of the model's AttentionOps hook."""

from __future__ import annotations

from typing import Sequence

import torch.distributed as dist
from torch import Tensor

from longtrain import ranges
from longtrain.kernels.documents import DocBounds, as_doc_bounds
from longtrain.models.ops import outside_compile
from longtrain.parallel.rules import resolve_sp_impl


class SequenceParallelOps:
    """Attention over a sequence split across `group`; q/k/v are this rank's shards in `layout`.

    `cu_seqlens` [n_docs+1] marks document boundaries over the FULL sequence (no attention across);
    kept on the host as a DocBounds (read once here if a tensor is given), so no layer syncs.
    """

    def __init__(self, group: dist.ProcessGroup | None, *, impl: str = "tokenring", layout: str = "zigzag",
                 cu_seqlens: Tensor | Sequence[int] | None = None, ulysses_degree: int | None = None,
                 one_communicator: bool = False) -> None:
        self.group, self.impl, self.layout = group, impl, layout
        self.cu_seqlens: DocBounds | None = as_doc_bounds(cu_seqlens)
        self.ulysses_degree = ulysses_degree or None
        self.one_communicator = one_communicator

    @outside_compile  # fused kernels / communication: outside compiled graphs (training.compile)
    def softmax(self, q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                softmax_scale: float | None = None) -> Tensor:
        from longtrain.parallel.sp_attention import sequence_parallel_attention

        impl = resolve_sp_impl(self.impl, q.shape[2], k.shape[2])
        with ranges.scope(f"sp_attention/{impl}"):
            return sequence_parallel_attention(q, k, v, self.group, impl=impl, causal=True, layout=self.layout,
                                               softmax_scale=softmax_scale, window=window,
                                               cu_seqlens=self.cu_seqlens, ulysses_degree=self.ulysses_degree,
                                               one_communicator=self.one_communicator)

    @outside_compile
    def linear(self, q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> Tensor:
        from longtrain.parallel.linear_sp import linear_sp_attention

        with ranges.scope("sp_attention/lightning"):
            return linear_sp_attention(q, k, v, decay, self.group, layout=self.layout, cu_seqlens=self.cu_seqlens)
