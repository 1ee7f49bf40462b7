"""Math on one device. Every kernel has a plain-torch twin that runs on CPU.

Public names are resolved lazily so that importing one kernel never pulls in
triton or flash-attn.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "attention_block": "longtrain.kernels.attention",
    "naive_attention": "longtrain.kernels.attention",
    "lightning_attention": "longtrain.kernels.lightning",
    "tnl_decay": "longtrain.kernels.lightning",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longtrain.kernels' has no attribute {name!r}")
