"""The optimizer, the learning-rate schedule and the data-parallel engine a recipe asks for."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from longtrain.launcher.config import Recipe


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """Multiplier of training.lr after `step` optimizer steps: linear warmup, then constant, cosine
    or linear decay to training.min_lr_ratio at training.steps."""
    t = recipe.training

    def f(step: int) -> float:
        if t.warmup and step < t.warmup:
            return (step + 1) / t.warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


def deepspeed_settings(recipe: Recipe, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The DeepSpeed config for a recipe (parallel.deepspeed_config merged over the generated one)."""
    from longtrain.parallel.deepspeed_engine import deepspeed_config

    t, p = recipe.training, recipe.parallel
    return deepspeed_config(micro_batch=t.micro_batch, grad_accum=t.grad_accum, grad_clip=t.grad_clip,
                            zero_stage=p.zero_stage, dtype=dtype, overrides=p.deepspeed_config,
                            optimizer_offload=t.optimizer_offload)


def make_engine(model: nn.Module, recipe: Recipe, device: torch.device, dtype: torch.dtype) -> Any:
    """The recipe's dp engine around `model` (FSDP2: already sharded in place), with AdamW and the
    schedule: an object with the parallel/engines.py Engine interface."""
    t, name = recipe.training, recipe.parallel.dp_engine
    betas = (t.beta1, t.beta2)
    if name == "deepspeed":
        from longtrain.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, deepspeed_settings(recipe, dtype), lr=t.lr, betas=betas,
                               weight_decay=t.weight_decay, lr_lambda=lr_lambda(recipe))
    from longtrain.parallel.engines import Engine, adamw, wrap_ddp

    wrapped = model if name == "fsdp2" else wrap_ddp(model, device)
    autocast = torch.bfloat16 if (dtype == torch.bfloat16 and name == "ddp") else None
    return Engine(name, model, wrapped, adamw(model, t.lr, betas, t.weight_decay), lr_lambda(recipe),
                  autocast=autocast)
