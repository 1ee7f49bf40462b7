"""Data-parallel engines behind one interface: FSDP2 (fully_shard; plain or hybrid), DDP, DeepSpeed ZeRO (deepspeed_engine.py).

Gradients are averaged over ALL ranks (dp x sp): sequence-parallel ranks hold different tokens of
the same samples, so their parameter gradients must be summed too. The trainer scales each rank's
loss so that this average equals the gradient of (global loss sum / global target count).

The training loop sees only `Engine`:
  engine(tokens, positions, ops, labels, loss_chunk=...)   forward (summed loss)
  with engine.micro_batch(last): ...       gradient sync only on the last micro-batch (+ autocast)
  engine.backward(loss)
  engine.step(clip, accept) -> (grad norm, stepped)   clip, update when accept(grad norm), schedule
  engine.save(...) / engine.load(path)     checkpoints (DCP; DeepSpeed adds its own files)
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from longtrain.errors import LaunchError


def adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, *,
          foreach: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D weights only (norm gains are not decayed)."""
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=1e-8, foreach=foreach)


def shard_fsdp2(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                replicate: int = 1, offload: bool = False) -> nn.Module:
    """fully_shard every block, then the root (in place; the model may be on the meta device: then
    `to_empty` and fill each rank's shards, see place_local).

    replicate = 1: plain FSDP2, every parameter sharded over all `world` ranks.
    replicate = R > 1: hybrid sharding (HSDP) over the 2-D mesh (replicate R, shard world/R): each
    parameter is sharded over a group of world/R consecutive ranks (one node when R = number of
    nodes) and replicated over the R groups; replica i = ranks [i*world/R, (i+1)*world/R).
    Gradients are reduce-scattered inside a group and all-reduced across replicas: either way the
    average over all world ranks, as the trainer's loss scaling expects.
    offload (training.optimizer_offload): FSDP2's CPUOffloadPolicy, the sharded parameters, their
    gradients and so the optimizer state and step in host memory (pinned on CUDA); the model's
    shards are then materialised on the CPU (`to_empty(device="cpu")`), its buffers on `device`.
    Raises LaunchError when `replicate` does not divide the world size."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    world = dist.get_world_size() if dist.is_initialized() else 1
    check_replicate(world, replicate)
    if replicate > 1:
        mesh = init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    off = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=off)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=off)
    return model


def check_replicate(world: int, replicate: int) -> None:
    """parallel.dp_replicate must divide the world size (LaunchError naming both numbers)."""
    if replicate < 1 or world % replicate:
        raise LaunchError(f"world size {world} is not divisible by parallel.dp_replicate = {replicate} "
                          f"(hybrid sharding needs {replicate} equal replica groups)")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the default group (the model itself in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


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


class Engine:
    """FSDP2 or DDP with a torch optimizer and LambdaLR schedule (DeepSpeed: deepspeed_engine.py).

    `model` is the bare Transformer (sharded in place for FSDP2), `wrapped` what the forward calls."""

    def __init__(self, name: str, model: nn.Module, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_lambda: Callable[[int], float], autocast: torch.dtype | None = None) -> None:
        self.name, self.model, self.wrapped, self.optimizer = name, model, wrapped, optimizer
        self.lr_lambda = lr_lambda
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.autocast = autocast

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **kwargs)

    @contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Gradients reduce only on the last micro-batch of a step; bf16 autocast for DDP."""
        with ExitStack() as stack:
            if self.name == "ddp" and not last and hasattr(self.wrapped, "no_sync"):
                stack.enter_context(self.wrapped.no_sync())
            if self.name == "fsdp2" and hasattr(self.wrapped, "set_requires_gradient_sync"):
                self.wrapped.set_requires_gradient_sync(last)
            if self.autocast is not None:
                dev = next(self.model.parameters()).device.type
                stack.enter_context(torch.autocast(dev, dtype=self.autocast))
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, grad_clip: float, accept: Callable[[float], bool]) -> tuple[float, bool]:
        """Clip (grad_clip <= 0: measure only), update if accept(global grad norm), advance the
        schedule either way. Returns (grad norm, whether the weights were updated)."""
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        gnorm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        stepped = accept(gnorm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return gnorm, stepped

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Model and optimizer state as DCP state dicts (sharded for FSDP2)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.wrapped, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, checkpointer: Any, step: int, meta: dict[str, Any], *, background: bool = False,
             group: Any = None) -> None:
        checkpointer.save(step, self.state(), meta, background=background, group=group)

    def load(self, path: Any, step: int, read: Callable[[Any, dict[str, Any]], None]) -> None:
        """Weights and optimizer from a checkpoint folder, `read(path, state)` filling the DCP state
        dicts in place (any world size); the schedule put at `step`."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.state()
        read(path, state)
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.last_epoch = step
        for g, lr0 in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = lr0 * self.lr_lambda(step)

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint's meta.json records about the engine."""
        return {"engine": self.name}
