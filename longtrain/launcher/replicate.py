"""Hybrid sharding (parallel.dp_replicate) in a training process: the rule (parallel/rules.py:
check_dp_replicate, choose_dp_replicate, shared with validation and the planner) answered for "auto"
with the planner's memory model (launcher/sizing.py) against this device."""

from __future__ import annotations

from typing import Any

from longtrain.launcher.sizing import recipe_memory
from longtrain.parallel.rules import choose_dp_replicate


def resolve_dp_replicate(recipe: Any, cfg: Any, device: Any, *, quiet: bool = False) -> int:
    """In a training process: parallel.dp_replicate as a number of replica groups ("auto" resolved with
    choose_dp_replicate against 90% of the device's memory: a GPU's, or on CPU the host's share per
    local rank), logged once on rank 0 (never with `quiet`). torch is imported here only."""
    import logging
    import os

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    value = recipe.parallel.dp_replicate

    def fits(r: int) -> bool:  # only asked for "auto" on several nodes
        if device.type == "cuda":
            import torch

            budget = 0.9 * torch.cuda.get_device_properties(device).total_memory
        else:
            budget = 0.9 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, local)
        return recipe_memory(recipe, cfg, world=world, replicate=r).total <= budget

    replicate, why = choose_dp_replicate(value, world=world, local_world=local, fits=fits)
    from longtrain.parallel.engines import check_replicate

    check_replicate(world, replicate)  # one line naming both numbers, before anything is built
    if value != 1 and not quiet and (not dist.is_initialized() or dist.get_rank() == 0):
        logging.getLogger("longtrain").info("FSDP2 sharding: %s (%s)", f"hybrid, {replicate} replicas x "
                                            f"{world // replicate} ranks" if replicate > 1 else
                                            f"plain over all {world} ranks", why)
    return replicate
