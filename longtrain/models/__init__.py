"""Model definitions. No imports of parallel/ or launcher/ here."""

from longtrain.models.config import PRESETS, ModelConfig, MoHConfig, model_config
from longtrain.models.llama import Transformer, lm_loss_sum
from longtrain.models.ops import AttentionOps, LocalAttention

__all__ = ["PRESETS", "ModelConfig", "MoHConfig", "model_config", "Transformer", "lm_loss_sum",
           "AttentionOps", "LocalAttention"]
