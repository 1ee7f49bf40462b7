"""Data-parallel wrapping: FSDP2 (fully_shard), DDP, or DeepSpeed ZeRO.

Gradients are averaged over ALL ranks (dp x sp): sequence-parallel ranks hold
different tokens of the same samples, so their parameter gradients must be
summed too. The trainer scales each rank's loss so that this average equals
the gradient of (global loss sum / global target count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def wrap_model(model: nn.Module, engine: str, device: torch.device, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap `model` for data parallelism over the default group. DDP needs it on `device`; FSDP2
    also takes a model on the meta device (then `to_empty` + fill each rank's shards)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    if engine == "ddp":
        if world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   broadcast_buffers=False)
    raise ValueError(f"unknown dp engine {engine!r}")


def place_local(p: torch.Tensor, read) -> None:
    """Store into parameter `p` the part of a value this process owns: for an FSDP2 (DTensor)
    parameter only its local rows, read as `read(index)`; a plain tensor takes `read(None)`."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        p.copy_(read(None))
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = p.to_local()
    if local.numel() == 0:
        return
    local.copy_(read(tuple(slice(o, o + n) for o, n in zip(offset, shape))))


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)
