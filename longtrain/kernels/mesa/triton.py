"""Triton kernels for Mesa quantize / dequantize (twins of quant.py's torch functions).

Each program handles BLOCK consecutive elements of the flat (contiguous) tensor;
the group of element i is ``(i // inner) % G``. The arithmetic is the fp32
sequence of quant.py (``(x - shift) * inv + u``, floor, clamp), so the interpreter
(TRITON_INTERPRET=1, numpy) reproduces the torch codes bit for bit. A compiled
GPU kernel may contract the multiply-add into an FMA, which can move a value
sitting exactly on a rounding boundary by one code.

triton is imported lazily: importing this module costs nothing until a kernel runs.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

LAUNCH_BLOCK = 4096
# 8 warps (16 elements per thread): with 4 warps the fp32 quantize with given noise needed 255
# registers and spilled on sm_80 (`longtrain bench kernels --target cuda:80`); 8 warps: <= 158
LAUNCH_NUM_WARPS = 8


@lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def quant_kernel(x_ptr, out_ptr, shift_ptr, inv_ptr, noise_ptr, n, inner, G, seed, levels,
                     STOCHASTIC: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = (offs // inner) % G
        sh = tl.load(shift_ptr + g, mask=mask, other=0.0).to(tl.float32)
        iv = tl.load(inv_ptr + g, mask=mask, other=0.0).to(tl.float32)
        v = (x - sh) * iv
        if STOCHASTIC:
            if HAS_NOISE:
                u = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                u = tl.rand(seed, offs)
            v = v + u
        else:
            v = v + 0.5
        q = tl.floor(v)
        q = tl.minimum(tl.maximum(q, 0.0), levels)
        tl.store(out_ptr + offs, q.to(tl.uint8), mask=mask)

    @triton.jit
    def dequant_kernel(q_ptr, out_ptr, shift_ptr, step_ptr, n, inner, G, OUT_BF16: tl.constexpr,
                       BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
        g = (offs // inner) % G
        sh = tl.load(shift_ptr + g, mask=mask, other=0.0).to(tl.float32)
        st = tl.load(step_ptr + g, mask=mask, other=0.0).to(tl.float32)
        y = q * st + sh
        if OUT_BF16:
            # round to nearest even by hand (out_ptr is the bf16 buffer viewed as uint16): the
            # interpreter's fp32->bf16 cast truncates, torch's rounds
            b = y.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            tl.store(out_ptr + offs, b.to(tl.uint16), mask=mask)
        else:
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    return triton, quant_kernel, dequant_kernel


def _check_device(t: Tensor) -> None:
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton Mesa kernels need a GPU tensor, or TRITON_INTERPRET=1 "
                           "set before triton is imported")


def quantize_codes_triton(x: Tensor, shift: Tensor, inv: Tensor, groups: int, inner: int, bits: int,
                          stochastic: bool, noise: Tensor | None = None,
                          seed: int | None = None) -> Tensor:
    """Contiguous x -> flat uint8 codes; same contract as quant.quantize_codes_torch.

    With stochastic rounding and no `noise`, U[0,1) comes from tl.rand(seed, index).
    """
    _check_device(x)
    triton, quant_kernel, _ = _kernels()
    x = x.contiguous().view(-1)
    n = x.numel()
    out = torch.empty(n, dtype=torch.uint8, device=x.device)
    if n == 0:
        return out
    has_noise = stochastic and noise is not None
    noise_arg = noise.contiguous().view(-1).float() if has_noise else x
    grid = (triton.cdiv(n, LAUNCH_BLOCK),)
    quant_kernel[grid](x, out, shift, inv, noise_arg, n, inner, groups, int(seed or 0),
                       float(2 ** bits - 1), STOCHASTIC=bool(stochastic), HAS_NOISE=has_noise,
                       BLOCK=LAUNCH_BLOCK, num_warps=LAUNCH_NUM_WARPS)
    return out


def dequantize_codes_triton(codes: Tensor, shift: Tensor, step: Tensor, groups: int, inner: int,
                            dtype: torch.dtype) -> Tensor:
    """Flat uint8 codes -> flat tensor of `dtype`; same contract as quant.dequantize_codes_torch."""
    _check_device(codes)
    triton, _, dequant_kernel = _kernels()
    n = codes.numel()
    out = torch.empty(n, dtype=dtype, device=codes.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, LAUNCH_BLOCK),)
    bf16 = dtype == torch.bfloat16
    dequant_kernel[grid](codes.contiguous(), out.view(torch.uint16) if bf16 else out, shift, step, n, inner,
                         groups, OUT_BF16=bf16, BLOCK=LAUNCH_BLOCK, num_warps=LAUNCH_NUM_WARPS)
    return out
