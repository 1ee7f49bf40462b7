"""Group quantization with running range estimates (Mesa), plain-torch path.

A tensor is seen as ``[outer, G, inner]`` in memory order: dimension ``dim`` is
split into ``G`` contiguous chunks ("groups"); every element whose index along
``dim`` falls into chunk g belongs to group g. Head-wise grouping of a
``[B, S, H, D]`` tensor is ``groups=H, dim=2``; channel chunks of ``[..., C]``
are ``groups=G, dim=-1``.

Per group the quantizer uses a shift (the minimum) and a span (max - min, the
"range" of the Mesa paper); with ``L = 2**bits - 1`` levels:

    inv  = L / span,  step = span / L          (fp32, per group)
    code = clamp(floor((x - shift) * inv + u), 0, L)
    x'   = code * step + shift

with ``u = 0.5`` (round to nearest) or ``u ~ U[0, 1)`` (stochastic rounding,
unbiased inside the range). Values outside ``[shift, shift + span]`` saturate at
0 or L instead of wrapping around (upstream Mesa wraps). The Triton kernels in
``triton.py`` compute exactly these fp32 operations in the same order.

Codes are uint8; for bits in {1, 2, 4} they are packed 8 // bits to a byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from longtrain.kernels.mesa.config import SUPPORTED_BITS  # noqa: F401 (re-exported)

_TINY_SPAN = 1e-12  # a constant group would divide by zero; any value >0 makes it round-trip exactly


def check_bits(bits: int) -> int:
    """Return `bits` if supported, else raise ValueError naming the allowed values."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"mesa bits must be one of {SUPPORTED_BITS} (codes are packed into bytes), got {bits!r}")
    return bits


def group_layout(shape: tuple[int, ...] | torch.Size, groups: int, dim: int = -1) -> tuple[int, int, int]:
    """(outer, groups, inner) of a contiguous tensor of `shape` grouped along `dim`."""
    nd = len(shape)
    if nd == 0:
        raise ValueError("cannot group a 0-d tensor")
    d = dim % nd
    size = shape[d]
    if groups <= 0 or size % groups:
        raise ValueError(f"groups ({groups}) must divide the size of dim {dim} ({size}) of shape {tuple(shape)}")
    outer = 1
    for s in shape[:d]:
        outer *= s
    inner = size // groups
    for s in shape[d + 1:]:
        inner *= s
    return outer, groups, inner


def group_minmax(x: Tensor, groups: int, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Per-group min and max of x (fp32 [G] each)."""
    outer, g, inner = group_layout(x.shape, groups, dim)
    x3 = x.contiguous().view(outer, g, inner)
    return x3.amin(dim=(0, 2)).float(), x3.amax(dim=(0, 2)).float()


class RunningRange(nn.Module):
    """EMA estimate of per-group min (shift) and max - min (span); buffers, so they checkpoint.

    The first update copies the observed values; later ones do
    ``est = decay * est + (1 - decay) * observed``.
    """

    def __init__(self, groups: int, decay: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("shift", torch.zeros(groups))
        self.register_buffer("span", torch.zeros(groups))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, mn: Tensor, mx: Tensor) -> None:
        ema_update(self.shift, self.span, self.steps, mn, mx, self.decay)


@torch.no_grad()
def ema_update(shift: Tensor, span: Tensor, steps: Tensor, mn: Tensor, mx: Tensor, decay: float) -> None:
    """In-place EMA update of (shift, span) from observed per-group (mn, mx); first step copies."""
    mn = mn.to(shift.dtype)
    width = mx.to(span.dtype) - mn
    if int(steps) == 0:
        shift.copy_(mn)
        span.copy_(width)
    else:
        shift.mul_(decay).add_(mn, alpha=1.0 - decay)
        span.mul_(decay).add_(width, alpha=1.0 - decay)
    steps.add_(1)


@dataclass
class QTensor:
    """A quantized tensor: codes plus what dequantize needs. `shape` is the (contiguous) shape."""

    codes: Tensor  # uint8, flat; packed 8 // bits per byte when bits < 8
    shift: Tensor  # fp32 [G]
    span: Tensor  # fp32 [G] (already floored at a tiny positive value)
    groups: int
    inner: int
    shape: torch.Size
    dtype: torch.dtype
    bits: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return (self.codes.numel() * self.codes.element_size() + self.shift.numel() * 4
                + self.span.numel() * 4)


def quant_params(shift: Tensor, span: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(shift, span, inv, step) as fp32, with the span floored; shared by both backends."""
    levels = float(2 ** bits - 1)
    shift = shift.float().contiguous()
    span = span.float().clamp_min(_TINY_SPAN).contiguous()
    return shift, span, (levels / span).contiguous(), (span / levels).contiguous()


# the torch path works on blocks of this many elements at most: its fp32 temporaries (and the
# noise) are then a constant, not copies of the whole tensor (at 1M tokens x 4096 one fp32 copy is 16 GiB)
CHUNK_ELEMENTS = 1 << 22


def row_blocks(rows: int, width: int) -> list[slice]:
    """Slices of `rows` rows of `width` elements each, of at most CHUNK_ELEMENTS elements (>= 1 row)."""
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def quantize_codes_torch(x: Tensor, shift: Tensor, inv: Tensor, groups: int, inner: int, bits: int,
                         stochastic: bool, noise: Tensor | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
    """Torch twin of the Triton quantize kernel: contiguous x -> uint8 codes (flat, unpacked),
    block by block of `row_blocks` (the same codes; stochastic noise is drawn per block)."""
    x3 = x.reshape(-1, groups, inner)
    blocks = row_blocks(x3.shape[0], groups * inner)
    if len(blocks) == 1:
        return _quantize_block(x3, shift, inv, bits, stochastic, noise, generator).reshape(-1)
    out = torch.empty(x3.shape, dtype=torch.uint8, device=x.device)
    n3 = noise.reshape(x3.shape) if noise is not None else None
    for b in blocks:
        out[b] = _quantize_block(x3[b], shift, inv, bits, stochastic, None if n3 is None else n3[b], generator)
    return out.reshape(-1)


def _quantize_block(x3: Tensor, shift: Tensor, inv: Tensor, bits: int, stochastic: bool, noise: Tensor | None,
                    generator: torch.Generator | None) -> Tensor:
    levels = float(2 ** bits - 1)
    v = torch.sub(x3, shift.view(1, -1, 1))  # a new fp32 tensor (bf16/fp16 x promote exactly)
    v.mul_(inv.view(1, -1, 1))
    if stochastic:
        if noise is None:
            noise = torch.rand(x3.shape, device=x3.device, dtype=torch.float32, generator=generator)
        v.add_(noise.reshape(x3.shape).float())
    else:
        v.add_(0.5)
    return v.floor_().clamp_(0.0, levels).to(torch.uint8)


def dequantize_codes_torch(codes: Tensor, shift: Tensor, step: Tensor, groups: int, inner: int,
                           dtype: torch.dtype) -> Tensor:
    """Torch twin of the Triton dequantize kernel: flat uint8 codes -> flat tensor of `dtype`
    (block by block of `row_blocks`: the fp32 temporaries are a constant)."""
    q3 = codes.reshape(-1, groups, inner)
    blocks = row_blocks(q3.shape[0], groups * inner)
    if len(blocks) == 1:
        return (q3.float() * step.view(1, -1, 1) + shift.view(1, -1, 1)).to(dtype).reshape(-1)
    out = torch.empty(q3.shape, dtype=dtype, device=codes.device)
    for b in blocks:
        out[b] = q3[b].float() * step.view(1, -1, 1) + shift.view(1, -1, 1)
    return out.reshape(-1)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack flat uint8 codes < 2**bits into bytes (8 // bits per byte, low bits first)."""
    if bits == 8:
        return codes
    per = 8 // bits
    n = codes.numel()
    pad = (-n) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    c = codes.view(-1, per).to(torch.int32)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (c << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of pack_bits: the first `numel` codes as flat uint8."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
    c = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2 ** bits - 1)
    return c.reshape(-1)[:numel].to(torch.uint8)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:
                return "torch"
            return "triton"
        return "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"mesa backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend


def quantize(x: Tensor, groups: int, *, dim: int = -1, running: RunningRange | None = None,
             shift: Tensor | None = None, span: Tensor | None = None, bits: int = 8,
             stochastic: bool = False, noise: Tensor | None = None, update: bool = True,
             backend: str = "auto", generator: torch.Generator | None = None) -> QTensor:
    """Quantize x to `bits` per element with per-group shift/span; returns a QTensor.

    x: any shape, floating; grouped as ``[outer, groups, inner]`` along `dim` (see module doc).
    The range comes from, in order: `running` (updated from x first when `update`),
    explicit `shift`/`span` ([groups] each), or x's own per-group min/max.
    noise: optional U[0,1) tensor shaped like x for stochastic rounding (lets the
    Triton and torch paths be compared); drawn from `generator` otherwise.
    """
    check_bits(bits)
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating tensor, got {x.dtype}")
    x = x.contiguous()
    _, g, inner = group_layout(x.shape, groups, dim)
    if running is not None:
        if running.shift.numel() != g:
            raise ValueError(f"running estimate has {running.shift.numel()} groups, tensor has {g}")
        if update:
            running.update(*group_minmax(x, g, dim))
        shift, span = running.shift, running.span
    elif shift is None or span is None:
        mn, mx = group_minmax(x, g, dim)
        shift, span = mn, mx - mn
    shift, span, inv, _ = quant_params(shift.to(x.device), span.to(x.device), bits)
    be = _resolve_backend(backend, x.device)
    if be == "triton":
        from longtrain.kernels.mesa.triton import quantize_codes_triton

        seed = None
        if stochastic and noise is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator if generator is not None
                                     and generator.device.type == "cpu" else None).item())
        codes = quantize_codes_triton(x, shift, inv, g, inner, bits, stochastic, noise, seed)
    else:
        codes = quantize_codes_torch(x, shift, inv, g, inner, bits, stochastic, noise, generator)
    return QTensor(pack_bits(codes, bits), shift, span, g, inner, x.shape, x.dtype, bits)


def dequantize(q: QTensor, *, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """Inverse of quantize: a contiguous tensor of shape `q.shape` and dtype `dtype` (default q.dtype)."""
    codes = unpack_bits(q.codes, q.bits, q.numel)
    _, _, _, step = quant_params(q.shift, q.span, q.bits)
    out_dtype = dtype or q.dtype
    if _resolve_backend(backend, codes.device) == "triton":
        from longtrain.kernels.mesa.triton import dequantize_codes_triton

        y = dequantize_codes_triton(codes, q.shift, step, q.groups, q.inner, out_dtype)
    else:
        y = dequantize_codes_torch(codes, q.shift, step, q.groups, q.inner, out_dtype)
    return y.view(q.shape)
