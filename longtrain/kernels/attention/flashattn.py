"""`flash`: flash-attn's private forward/backward, called by each release's real signature.

flash-attn (Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py) changed its private API:

  2.6.x   plain functions
          _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, return_softmax)
              -> (out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)
          _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                               causal, window_size, softcap, alibi_slopes, deterministic, rng_state=None)
              -> (dq, dk, dv, softmax_d), dq/dk/dv written in place
  2.7.0+  torch.library custom ops (inspect.signature shows only (*args, **kwargs)); window_size
  (2.8.x) split in two:
          _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left,
                              window_size_right, softcap, alibi_slopes, return_softmax)
              -> (out, softmax_lse, S_dmask, rng_state)
          _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                               causal, window_size_left, window_size_right, softcap, alibi_slopes,
                               deterministic, rng_state=None)
              -> softmax_d, dq/dk/dv written in place (mutates_args)
  < 2.6   no softcap argument: not supported (flash-attn is then not used).

Both are called positionally in that order. Masks are aligned bottom-right (see `flash_window`);
K/V with fewer heads go in as they are (flash-attn takes grouped heads; dk/dv come back summed).
"""

from __future__ import annotations

import inspect
import logging
import re

import torch

from .spec import BlockSpec

_log = logging.getLogger("longtrain.kernels.attention")

_FLASH = None  # None = not probed yet, False = unavailable, else (interface module, api)


def _version(text: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text or ""))
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def _is_custom_op(fn) -> bool:
    return type(fn).__name__ == "CustomOpDef" or hasattr(fn, "_opoverload")


def flash_api_of(iface, version: str) -> str | None:
    """'2.6' | '2.7' (2.7 and later) | None (unsupported) for a flash_attn_interface module."""
    v = _version(version)
    if v:
        if v >= (2, 7):
            return "2.7"
        return "2.6" if v >= (2, 6) else None
    fn = getattr(iface, "_flash_attn_forward", None)  # no usable version string: read the API itself
    if fn is None:
        return None
    if _is_custom_op(fn):
        return "2.7"
    params = inspect.signature(fn).parameters
    if "window_size_left" in params:
        return "2.7"
    return "2.6" if "softcap" in params and "window_size" in params else None


def _probe():
    global _FLASH
    if _FLASH is None:
        try:
            import flash_attn
            from flash_attn import flash_attn_interface
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _FLASH = False
            _log.info("attention_block: flash-attn not importable; CUDA uses torch's fused kernels and FlexAttention")
            return None
        version = getattr(flash_attn, "__version__", "")
        api = flash_api_of(flash_attn_interface, version)
        if api is None:
            _FLASH = False
            _log.warning("attention_block: flash-attn %s has an unsupported private API (need >= 2.6); not used",
                         version or "?")
        else:
            _FLASH = (flash_attn_interface, api)
            _log.info("attention_block: using flash-attn %s (%s API) on CUDA", version or "?", api)
    return _FLASH or None


def flash_interface():
    """flash-attn's interface module when it is importable and supported, else None."""
    probed = _probe()
    return probed[0] if probed else None


def flash_window(spec: BlockSpec):
    """(causal, (left, right)) for flash-attn (bottom-right aligned), or None if not expressible."""
    if spec.kind == "full":
        return False, (-1, -1)
    if spec.kind == "causal" and spec.sq == spec.sk:
        return True, (-1, -1)
    delta = spec.q_offset - spec.k_offset
    if spec.bounds is None and spec.causal and spec.window is not None and delta == spec.sk - spec.sq \
            and spec.sq <= spec.sk:
        return True, (spec.window - 1, 0)
    return None


def flash_forward(q, k, v, spec: BlockSpec):
    iface, api = _probe()
    causal, (left, right) = flash_window(spec)
    if api == "2.6":
        res = iface._flash_attn_forward(q, k, v, 0.0, spec.scale, causal, (left, right), 0.0, None, False)
        out, lse = res[0], res[5]
    else:
        res = iface._flash_attn_forward(q, k, v, 0.0, spec.scale, causal, left, right, 0.0, None, False)
        out, lse = res[0], res[1]
    return out, lse


def flash_backward(dout, q, k, v, out, lse, spec: BlockSpec):
    iface, api = _probe()
    causal, (left, right) = flash_window(spec)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if api == "2.6":
        iface._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, spec.scale, causal, (left, right),
                                   0.0, None, False, None)
    else:
        iface._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, spec.scale, causal, left, right,
                                   0.0, None, False, None)
    return dq, dk, dv
