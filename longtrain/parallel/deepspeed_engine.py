"""DeepSpeed ZeRO (stage 0-3) as a data-parallel engine, with torch optimizers (no DeepSpeed op compiled).

How it fits the trainer:
- Gradients: the trainer scales each rank's loss by world / global_token_count and calls
  `engine.backward` once per micro-batch and `engine.step` once per optimizer step. We run
  DeepSpeed with `managed_gradient_accumulation = false` (backward only accumulates, step is the
  boundary: reduce, clip, update, schedule) and the trainer passes `scale_wrt_gas=False`, so
  DeepSpeed averages gradients over ALL ranks (dp x sp; no mpu is given) exactly like FSDP2/DDP.
- Sequence parallelism lives in the model's attention ops; DeepSpeed sees plain data parallelism
  over the whole world, which is the right reduction for sp ranks too (they hold different tokens
  of the same samples).
- Process group: we reuse the torch process group the launcher already started
  (`dist_init_required=False`) and skip DeepSpeed's CPU shared-memory all-reduce op, whose first
  use compiles a C++ extension (~60 s on 2 cores); gloo does that job here.
- Checkpoints follow the same atomic protocol as the DCP ones (write `<name>.tmp/`, meta.json,
  rename, `latest` pointer): the folder holds the model weights as a DCP checkpoint (so eval,
  convert and `.metadata`-based completeness checks work unchanged) plus DeepSpeed's own files
  (partitioned optimizer state) under `deepspeed/` for exact resume.

This module imports nothing from launcher/: it takes plain arguments; `checkpointer` is duck-typed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("longtrain")

DS_SUBDIR = "deepspeed"  # DeepSpeed's own files inside a published checkpoint folder
_TAG_SAFE = "state"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(*, micro_batch: int, grad_accum: int, grad_clip: float, zero_stage: int,
                     dtype: torch.dtype = torch.float32, overrides: dict[str, Any] | None = None,
                     optimizer_offload: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for these settings, with `overrides` (parallel.deepspeed_config) merged over it.

    `optimizer_offload` (training.optimizer_offload, ZeRO >= 1): ZeRO's offload_optimizer to the CPU
    (pinned), the fp32 master, gradients and AdamW state in host memory and the step run there by
    our torch AdamW (zero_force_ds_cpu_optimizer off: DeepSpeedCPUAdam is a compiled op we do not build).

    Batch sizes are in samples per rank; `train_batch_size` is left to DeepSpeed
    (micro_batch * grad_accum * world size, since every rank counts as data parallel for it).
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "managed_gradient_accumulation": False,  # the trainer owns the boundary: step() once per update
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if optimizer_offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if zero_stage == 3:
        # gather everything at once for small models; big ones keep DeepSpeed's defaults
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    return _deep_merge(cfg, overrides or {})


def _skip_shm_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op on first init (~60 s).
    gloo does the same job for us; returning None makes DeepSpeed fall back to torch.distributed."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` attribute is torch itself

    if getattr(ds_torch.build_shm_op, "_longtrain_skip", False):
        return

    def _none() -> None:
        return None

    _none._longtrain_skip = True  # type: ignore[attr-defined]
    ds_torch.build_shm_op = _none


class DeepSpeedEngine:
    """DeepSpeed ZeRO behind the trainer's Engine interface (parallel/engines.py).

    `model` is already on its device; the optimizer is a torch AdamW (decay on >= 2-D weights only)
    driven by DeepSpeed, the schedule a LambdaLR stepped by DeepSpeed at each update; `config` is
    deepspeed_config(...)."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, config: dict[str, Any], *, lr: float, betas: tuple[float, float],
                 weight_decay: float, lr_lambda: Callable[[int], float]) -> None:
        os.environ.setdefault("DS_BUILD_OPS", "0")
        if not dist.is_initialized():
            raise RuntimeError("DeepSpeedEngine needs an initialised torch.distributed process group")
        try:
            import deepspeed
        except ImportError as e:
            from longtrain.errors import ConfigError

            raise ConfigError(f"parallel.dp_engine = 'deepspeed' needs DeepSpeed: pip install 'longtrain[deepspeed]' "
                              f"({e})") from None
        if not torch.cuda.is_available():
            _skip_shm_op()
        from longtrain.parallel.engines import adamw

        optimizer = adamw(model, lr, betas, weight_decay, foreach=False)
        # DeepSpeed logs every config value at INFO; keep the run's console readable (and its ZeRO-Offload
        # path calls the deprecated all_gather_into_tensor: torch's FutureWarning names nothing a user can change)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        # DeepSpeed selects cuda:LOCAL_RANK unless told the device: under per-task GPU binding (srun
        # --gpus-per-task=1) that index does not exist, so hand it the device the model already lives on
        dev = next(model.parameters()).device
        args = types.SimpleNamespace(device_rank=dev.index) if dev.type == "cuda" else None
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, config=config, dist_init_required=False,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda))
        self.model, self.wrapped, self.autocast, self.lr_lambda = model, self.ds, None, lr_lambda
        if self.ds.zero_cpu_offload() and dist.get_rank() == 0:  # as DeepSpeed parsed the config
            logging.getLogger("longtrain").info(
                "optimizer offload: DeepSpeed ZeRO-%d offload_optimizer, fp32 master, gradients and AdamW state in "
                "host memory, the step run there by torch AdamW", self.ds.zero_optimization_stage())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        yield  # DeepSpeed accumulates in backward and reduces in step()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer's loss scale already averages

    def step(self, grad_clip: float, accept: Callable[[float], bool]) -> tuple[float, bool]:
        """The accumulation boundary: reduce, clip (config), update, schedule. DeepSpeed skips
        non-finite updates itself, so `accept` is not consulted."""
        self.ds.step()
        return float(self.ds.get_global_grad_norm() or 0.0), True

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, checkpointer: Any, step: int, meta: dict[str, Any], *, background: bool = False,
             group: Any = None) -> None:
        checkpointer.save(step, None, {**meta, **self.checkpoint_meta()},
                          write=lambda tmp: write_deepspeed(self.ds, tmp))

    def load(self, path: str | os.PathLike, step: int, read: Any = None) -> None:
        """Engine, optimizer and schedule from a checkpoint this engine wrote (same world size)."""
        load_deepspeed(self.ds, path)
        self.scheduler.last_epoch = step
        for g, lr0 in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = lr0 * self.lr_lambda(step)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"engine": self.name,
                "deepspeed": {"zero_stage": self.ds.zero_optimization_stage(), "dir": DS_SUBDIR}}


# ---- checkpoints -----------------------------------------------------------------------------

def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Unsharded module weights (CPU copies). ZeRO-3 gathers one parameter at a time; every rank
    returns the same tensors (collective: call on all ranks)."""
    module = engine.module
    if engine.zero_optimization_stage() < 3:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            out[name] = param.detach().cpu().clone()
    for name, buf in module.named_buffers():
        if name in module.state_dict():
            out[name] = buf.detach().cpu().clone()
    return out


def write_deepspeed(engine: Any, folder: Path) -> None:
    """Write a DeepSpeed run's state into `folder` (collective): the full weights as DCP (so
    `longtrain convert` and evaluation read it like any checkpoint) and DeepSpeed's own files under
    `deepspeed/`. The caller (Checkpointer.save) publishes the folder atomically."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": full_state_dict(engine)}, checkpoint_id=str(folder))
    engine.save_checkpoint(str(folder), tag=DS_SUBDIR, save_latest=False)


def load_deepspeed(engine: Any, path: str | os.PathLike) -> None:
    """Restore engine, optimizer and scheduler state from a checkpoint written by save_deepspeed.

    DeepSpeed's partitioned optimizer state only loads into the same world size; a different
    world size (or a DCP checkpoint from FSDP2/DDP) is a CheckpointError naming the way out.
    """
    from longtrain.errors import CheckpointError

    p = Path(path)
    meta = json.loads((p / "meta.json").read_text())
    if not (p / DS_SUBDIR).is_dir():
        raise CheckpointError(f"checkpoint {p} was written by dp_engine={meta.get('engine', '?')!r}, not DeepSpeed: "
                              "resume it with the same engine, or start fresh (checkpoint.resume=none)")
    world = dist.get_world_size()
    if meta.get("world_size") not in (None, world):
        raise CheckpointError(f"DeepSpeed checkpoint {p} was written by {meta['world_size']} ranks; this run has "
                              f"{world} (ZeRO optimizer state is partitioned per rank): resume with "
                              f"{meta['world_size']} ranks, or use dp_engine=fsdp2 for resharding")
    load_path, _ = engine.load_checkpoint(str(p), tag=DS_SUBDIR, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {p / DS_SUBDIR}")
