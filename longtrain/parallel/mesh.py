"""The process mesh (dp x sp) and how a batch is dealt out over it, for training and evaluation alike.

Ranks form dp groups of sp consecutive ranks; the sp ranks of a group hold different tokens of
the same sequences (parallel/sharding.py layouts) and compute attention together the way an
`SPAttention` says. Training (launcher/trainer.py) and evaluation (launcher/eval/score.py) both
build their attention and shard their batches through `SPAttention` and `shard_batch`, so the
two cannot compute attention differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.errors import LaunchError
from longtrain.parallel.rules import resolve_sp_impl


@dataclass
class Layout:
    world: int
    rank: int
    dp: int
    sp: int
    dp_rank: int
    sp_rank: int
    sp_group: Any


def make_layout(sp: int) -> Layout:
    """dp x sp mesh over the default process group: consecutive ranks form one sp group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp:
        raise LaunchError(f"world size {world} is not divisible by parallel.sp = {sp}")
    dp = world // sp
    sp_group = None
    for d in range(dp):  # every rank must create every group, in the same order
        ranks = list(range(d * sp, (d + 1) * sp))
        g = dist.new_group(ranks) if sp > 1 else None
        if rank in ranks:
            sp_group = g
    return Layout(world, rank, dp, sp, rank // sp, rank % sp, sp_group)


@dataclass(frozen=True)
class SPAttention:
    """How the ranks of an sp group compute attention: implementation (already resolved, never
    'auto'), token layout, Ulysses degree for hybrids (None = the rule's default), and whether the
    two ring streams share one communicator."""

    impl: str = "tokenring"
    layout: str = "zigzag"
    ulysses_degree: int | None = None
    one_communicator: bool = False

    @classmethod
    def from_parallel(cls, parallel: Any, n_heads: int, n_kv_heads: int) -> "SPAttention":
        """From a recipe's [parallel] section and the model's head counts."""
        return cls(resolve_sp_impl(parallel.sp_impl, n_heads, n_kv_heads), parallel.sp_layout,
                   parallel.ulysses_degree or None, bool(parallel.sp_one_communicator))

    def ops(self, group: Any, sp: int, cu_seqlens: Any = None) -> Any:
        """The model's AttentionOps for one batch: local attention when sp == 1."""
        if sp == 1:
            from longtrain.models.ops import LocalAttention

            return LocalAttention(cu_seqlens)
        from longtrain.parallel.ops import SequenceParallelOps

        return SequenceParallelOps(group, impl=self.impl, layout=self.layout, cu_seqlens=cu_seqlens,
                                   ulysses_degree=self.ulysses_degree, one_communicator=self.one_communicator)


def shard_batch(tensors: dict[str, Tensor], group: Any, sp: int, attention: SPAttention,
                device: torch.device, *, cu_seqlens: Sequence[int] | Any = None) -> dict[str, Any]:
    """Move a batch to `device` and keep this rank's tokens: every [B, S] tensor (tokens, labels, ...)
    along dim 1, `positions` [S] along dim 0; adds the batch's AttentionOps as "ops"."""
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        t = t.to(device)
        if sp > 1:
            from longtrain.parallel.sharding import shard_sequence

            t = shard_sequence(t, group, dim=0 if name == "positions" else 1, layout=attention.layout)
        out[name] = t
    out["ops"] = attention.ops(group, sp, cu_seqlens)
    return out


def unshard_tokens(x: Tensor, group: Any, sp: int, attention: SPAttention) -> Tensor:
    """The inverse of shard_batch for a [B, S/sp, ...] result: the whole sequence on every rank."""
    if sp == 1:
        return x
    from longtrain.parallel.sharding import unshard_sequence

    return unshard_sequence(x, group, dim=1, layout=attention.layout)
