"""Hybrid sharding (parallel.dp_replicate): one rule for the recipe's validation, the planner and
the training process. "auto" asks the planner's memory model (launcher/sizing.py) whether the step
fits with the state sharded over one node."""

from __future__ import annotations

from typing import Any, Callable

from longtrain.errors import ConfigError
from longtrain.launcher.sizing import recipe_memory


def check_dp_replicate(value: int | str, engine: str) -> None:
    """What the recipe alone can check: an integer >= 1 or "auto", and hybrid only with FSDP2
    (divisibility of the world is checked at launch, parallel/engines.py: check_replicate)."""
    if value != "auto" and (isinstance(value, str) or value < 1):
        raise ConfigError(f"'parallel.dp_replicate' must be an integer >= 1 or \"auto\", got {value!r}")
    if value != 1 and engine != "fsdp2":
        raise ConfigError(f"'parallel.dp_replicate' = {value!r} (hybrid sharding) needs parallel.dp_engine = "
                          f"\"fsdp2\", got {engine!r}")


def choose_dp_replicate(value: int | str, *, world: int, local_world: int,
                        fits: Callable[[int], bool]) -> tuple[int, str]:
    """Replica groups for FSDP2 and why. An integer is taken as is. "auto": the number of nodes
    (world // local_world) when the run spans nodes and `fits(nodes)` (the step's memory per GPU with
    the state sharded over one node's ranks fits the device), else 1 (plain FSDP2 over all ranks)."""
    if value != "auto":
        return int(value), "set in the recipe"
    nodes = world // local_world if 0 < local_world < world and world % local_world == 0 else 1
    if nodes == 1:
        return 1, "auto: one node"
    if not fits(nodes):
        return 1, f"auto: sharded over one node ({local_world} ranks) it would not fit; sharding over all {world}"
    return nodes, f"auto: {nodes} nodes, sharded within each node of {local_world} ranks"


def resolve_dp_replicate(recipe: Any, cfg: Any, device: Any) -> int:
    """In a training process: parallel.dp_replicate as a number of replica groups ("auto" resolved with
    choose_dp_replicate against 90% of the device's memory: a GPU's, or on CPU the host's share per
    local rank), logged once on rank 0. torch is imported here only."""
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
    if value != 1 and (not dist.is_initialized() or dist.get_rank() == 0):
        logging.getLogger("longtrain").info("FSDP2 sharding: %s (%s)", f"hybrid, {replicate} replicas x "
                                            f"{world // replicate} ranks" if replicate > 1 else
                                            f"plain over all {world} ranks", why)
    return replicate
