"""Mesa: train with 8-bit activations saved for backward (forward stays exact).

config.py  MesaConfig (no torch: the recipe builds and validates it)
quant.py   quantize / dequantize (torch), running range estimates
triton.py  the same two kernels in Triton (imported lazily)
layers.py  MesaState, mesa_scope, enable_mesa, saved_bytes_counter

Names resolve lazily, so reading a recipe (MesaConfig) does not import torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    **{n: "longtrain.kernels.mesa.config" for n in ("MesaConfig", "SUPPORTED_BITS", "RANGE_MODES")},
    **{n: "longtrain.kernels.mesa.layers" for n in ("MesaState", "SavedBytes", "attach_mesa", "enable_mesa",
                                                     "mesa_scope", "saved_bytes_counter")},
    **{n: "longtrain.kernels.mesa.quant" for n in ("QTensor", "RunningRange", "dequantize", "group_minmax",
                                                    "quantize")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'longtrain.kernels.mesa' has no attribute {name!r}")
