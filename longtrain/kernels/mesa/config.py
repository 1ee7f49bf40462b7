"""Mesa's settings, without torch: the recipe's [mesa] section builds and validates one MesaConfig
(launcher/config.py), and the kernels (layers.py) run with that same object."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS = (1, 2, 4, 8)
RANGE_MODES = ("cover", "ema", "current")


@dataclass
class MesaConfig:
    """Mesa settings (the recipe's [mesa] section).

    bits: 8, or 4/2/1 (codes packed into bytes). group: "head" quantizes 4-D
    attention tensors per head and everything else per chunk of `group_size`
    channels; "channel" uses channel chunks for 4-D tensors too.
    skip_layers: layer ids kept exact (negative ints count from the end, e.g. (0, -1)).
    row_scale: 4-D (attention) tensors are first divided per (token, head) row by their
    absmax, kept in bf16 (2 bytes per row of head_dim values), so rows of very different
    size all keep 8 bits of resolution.
    min_numel: tensors smaller than this stay exact. slots: capacity of running
    estimates per layer (saved tensors per block). backend: "auto" (Triton on CUDA,
    torch otherwise), "torch" or "triton". seed: seeds the stochastic-rounding generator
    (offset by the process rank, so data-parallel ranks draw independent noise).
    range_mode: the range each tensor is quantized with. "cover" (default): the running
    estimate (EMA, updated from this tensor first) widened to this tensor's own min/max,
    so no value saturates; "ema": the running estimate alone, values outside it
    saturate (upstream Mesa, which wraps them instead); "current": this tensor's own
    min/max. The running estimates are updated (and checkpointed) in every mode.
    """

    enabled: bool = True
    bits: int = 8
    group: str = "head"
    ema_decay: float = 0.9
    stochastic: bool = True
    skip_layers: tuple[int | str, ...] = ()
    group_size: int = 64
    max_groups: int = 128
    min_numel: int = 1024
    slots: int = 32
    row_scale: bool = True
    backend: str = "auto"
    seed: int = 0
    range_mode: str = "cover"

    def __post_init__(self) -> None:
        self.skip_layers = tuple(self.skip_layers)

    def validate(self) -> "MesaConfig":
        """Raise ValueError naming the first bad field; returns self."""
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"mesa.bits must be one of {SUPPORTED_BITS} (codes are packed into bytes), "
                             f"got {self.bits!r}")
        if self.group not in ("head", "channel"):
            raise ValueError(f"mesa.group must be 'head' or 'channel', got {self.group!r}")
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise ValueError(f"mesa.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        for name in ("group_size", "max_groups", "min_numel", "slots"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"mesa.{name} must be a positive integer, got {v!r}")
        if self.range_mode not in RANGE_MODES:
            raise ValueError(f"mesa.range_mode must be one of {RANGE_MODES}, got {self.range_mode!r}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"mesa.backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        return self
