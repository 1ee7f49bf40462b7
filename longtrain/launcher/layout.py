"""Process layout shared by training and evaluation: the dp x sp split, the sequence-parallel
attention choice and console logging. Kept apart from trainer.py so evaluation does not import
the trainer."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from longtrain.errors import LaunchError


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)


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
    """dp x sp mesh: consecutive ranks form one sequence-parallel group."""
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


def resolve_sp_impl(impl: str, cfg) -> str:
    """'auto': TokenRing for multi-head attention (Q and K,V weigh the same on the wire, and TokenRing
    uses both link directions), ring for GQA/MQA (K,V are smaller than Q, so moving K,V is cheaper).
    Measured: docs/sequence-parallel.md (TokenRing 0.41x ring for MHA, 1.6x for GQA 8/2 on a
    rate-limited mesh)."""
    if impl != "auto":
        return impl
    return "tokenring" if cfg.n_kv_heads == cfg.n_heads else "ring"
