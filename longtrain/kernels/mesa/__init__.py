"""Mesa: train with 8-bit activations saved for backward (forward stays exact).

quant.py   quantize / dequantize (torch), running range estimates
triton.py  the same two kernels in Triton (imported lazily)
layers.py  MesaConfig, MesaState, mesa_scope, enable_mesa, saved_bytes_counter
"""

from longtrain.kernels.mesa.layers import (MesaConfig, MesaState, SavedBytes, attach_mesa, enable_mesa, mesa_scope,
                                           saved_bytes_counter)
from longtrain.kernels.mesa.quant import (SUPPORTED_BITS, QTensor, RunningRange, dequantize, group_minmax,
                                          quantize)

__all__ = ["MesaConfig", "MesaState", "SavedBytes", "attach_mesa", "enable_mesa", "mesa_scope", "saved_bytes_counter",
           "SUPPORTED_BITS", "QTensor", "RunningRange", "dequantize", "group_minmax", "quantize"]
