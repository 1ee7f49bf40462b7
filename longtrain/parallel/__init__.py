"""How work is split over processes. Depends on kernels/, never on launcher/."""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "shard_sequence": "longtrain.parallel.sharding",
    "unshard_sequence": "longtrain.parallel.sharding",
    "shard_positions": "longtrain.parallel.sharding",
    "sequence_parallel_attention": "longtrain.parallel.sp_attention",
    "linear_sp_attention": "longtrain.parallel.linear_sp",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longtrain.parallel' has no attribute {name!r}")
