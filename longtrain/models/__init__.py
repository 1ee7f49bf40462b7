"""Model definitions. No imports of parallel/ or launcher/ here.

The configuration (`longtrain.models.config`) imports without torch; the modules are loaded on
first use, so reading and validating a recipe (the `longtrain train` launcher, `longtrain plan`)
does not pay for importing torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from longtrain.models.config import PRESETS, ModelConfig, MoHConfig, model_config

_LAZY = {"Transformer": "longtrain.models.llama", "lm_loss_sum": "longtrain.models.llama",
         "AttentionOps": "longtrain.models.ops", "LocalAttention": "longtrain.models.ops"}

if TYPE_CHECKING:
    from longtrain.models.llama import Transformer, lm_loss_sum
    from longtrain.models.ops import AttentionOps, LocalAttention


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'longtrain.models' has no attribute {name!r}")


__all__ = ["PRESETS", "ModelConfig", "MoHConfig", "model_config", "Transformer", "lm_loss_sum",
           "AttentionOps", "LocalAttention"]
