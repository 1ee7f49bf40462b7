"""Which kernel computes a block: the backend table and `choose_backend`, a pure function of the
device (type, compute capability, cuDNN version), dtype, head_dim, block kind and shape.

Each row of BACKEND_TABLE says what a backend can compute at all (`computes`: block kinds and
shapes, independent of the device) and where it is the fast choice (`suits`: device and dtype
facts); on CUDA the first row, in table order, that does both is chosen. `native_gqa`: the
kernel takes K/V with fewer heads as they are (else block_forward repeats them per query head and
block_backward sums dK/dV back over each group). A new backend is one more row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .cpu import cpu_backward, cpu_forward
from .cudnn import cudnn_backward, cudnn_forward
from .flashattn import flash_backward, flash_forward, flash_interface, flash_window
from .flex import flex_backward, flex_forward
from .naive import math_backward, math_forward
from .sdpa import sdpa_efficient_backward, sdpa_efficient_forward, sdpa_flash_backward, sdpa_flash_forward
from .spec import BlockSpec

_log = logging.getLogger("longtrain.kernels.attention")

MATH_MAX_PAIRS = 128 * 128  # on CUDA, blocks with Sq*Sk at most this use math (<= 64 KiB of scores a head)
CUDNN_MIN_VERSION = 91500   # torch itself prefers cuDNN attention on sm90/sm100 only from cuDNN > 9.15
_HALF = (torch.float16, torch.bfloat16)


class Case(NamedTuple):
    """The facts `choose_backend` decides on (all plain values)."""

    device_type: str
    dtype: torch.dtype
    kind: str                 # 'full' | 'causal' (top-left, Sq <= Sk) | 'partial'
    head_dim: int
    sq: int
    sk: int
    flash_installed: bool     # flash-attn importable with a supported API
    flash_expressible: bool   # flash-attn's bottom-right masks express the block
    capability: tuple | None  # CUDA compute capability (major, minor)
    cudnn_version: int        # 0 = no cuDNN attention (not built, or disabled in torch.backends.cuda)


def _dense(c: Case) -> bool:  # no mask, or causal from the top-left corner of a square block
    return c.kind == "full" or (c.kind == "causal" and c.sq == c.sk)


def _head_dim_ok(c: Case, limit: int) -> bool:
    return c.head_dim % 8 == 0 and c.head_dim <= limit


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable
    backward: Callable
    native_gqa: bool
    computes: Callable[[Case], bool]
    suits: Callable[[Case], bool]
    note: str


BACKEND_TABLE: tuple[Backend, ...] = (
    Backend("cudnn", cudnn_forward, cudnn_backward, True,
            computes=_dense,
            suits=lambda c: (c.dtype in _HALF and c.capability is not None and c.capability[0] in (9, 10)
                             and c.cudnn_version > CUDNN_MIN_VERSION and _head_dim_ok(c, 128) and c.sk > 1),
            note="torch's cuDNN attention op; Hopper/Blackwell, fp16/bf16, head_dim % 8 = 0, <= 128"),
    Backend("flash", flash_forward, flash_backward, True,
            computes=lambda c: c.flash_expressible,
            suits=lambda c: c.dtype in _HALF and c.flash_installed and _head_dim_ok(c, 256),
            note="flash-attn 2.6-2.8 (bottom-right masks: full, square causal, causal window at the diagonal)"),
    Backend("sdpa_flash", sdpa_flash_forward, sdpa_flash_backward, True,
            computes=_dense,
            suits=lambda c: c.dtype in _HALF and _head_dim_ok(c, 256),
            note="torch's fused flash kernel (causal only when Sq = Sk: it aligns bottom-right)"),
    # native_gqa False: its backward op's shape contract (torch's meta function) gives dK/dV one
    # head per QUERY head, so it gets K/V repeated (only fp32, odd head_dim or wide causal blocks)
    Backend("sdpa_efficient", sdpa_efficient_forward, sdpa_efficient_backward, False,
            computes=lambda c: c.kind in ("full", "causal"),
            suits=lambda c: True,
            note="torch's memory-efficient kernel, any float dtype, top-left causal"),
    Backend("flex", flex_forward, flex_backward, True,
            computes=lambda c: True, suits=lambda c: True,
            note="FlexAttention with a block mask (documents, windows, causal at offsets)"),
    Backend("math", math_forward, math_backward, True,
            computes=lambda c: True, suits=lambda c: False,
            note="fp32 einsum with an explicit mask: the reference; tiny blocks and non-CUDA devices"),
    Backend("cpu", cpu_forward, cpu_backward, True,
            computes=lambda c: True, suits=lambda c: False,
            note="torch's flash-attention CPU op (explicit mask for partial blocks)"),
)
REGISTRY: dict[str, Backend] = {b.name: b for b in BACKEND_TABLE}
BACKENDS = tuple(REGISTRY)
_LOGGED: set = set()


def choose_backend(device_type: str, dtype: torch.dtype, kind: str, *, flash_installed: bool,
                   flash_expressible: bool, head_dim: int, sq: int, sk: int, forced: str | None = None,
                   capability: tuple | None = None, cudnn_version: int = 0) -> str:
    """Which kernel computes a block: a pure function of device, dtype, block kind and packages.

    kind: 'full' | 'causal' (top-left aligned, no other mask) | 'partial' (anything else:
    documents, windows, causal at offsets). flash_expressible: flash-attn's (bottom-right)
    masks can express the block. capability / cudnn_version: of the CUDA device. `forced`
    (LONGTRAIN_ATTENTION_BACKEND) wins for every block that backend can compute; the others get
    the automatic choice. Returns one of BACKENDS.
    """
    c = Case(device_type, dtype, kind, head_dim, sq, sk, flash_installed, flash_expressible,
             None if capability is None else tuple(capability), cudnn_version)
    if forced:
        if forced not in REGISTRY:
            raise ValueError(f"LONGTRAIN_ATTENTION_BACKEND={forced!r}: use one of {', '.join(BACKENDS)}")
        if REGISTRY[forced].computes(c):
            return forced
    if device_type == "cpu":
        return "cpu"
    if device_type != "cuda" or sq * sk <= MATH_MAX_PAIRS:
        return "math"
    for b in BACKEND_TABLE:
        if b.computes(c) and b.suits(c):
            return b.name
    return "math"  # not reached: flex computes and suits everything


_DEVICE_FACTS: dict = {}


def _device_facts(device: torch.device) -> tuple[tuple | None, int]:
    """(compute capability, usable cuDNN attention version) of a CUDA device, else (None, 0)."""
    if device.type != "cuda":
        return None, 0
    facts = _DEVICE_FACTS.get(device)
    if facts is None:
        cap = tuple(torch.cuda.get_device_capability(device))
        ver = 0
        if torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled():
            ver = int(torch.backends.cudnn.version() or 0)
        facts = _DEVICE_FACTS[device] = (cap, ver)
    return facts


def backend_for(q: torch.Tensor, spec: BlockSpec) -> str:
    forced = os.environ.get("LONGTRAIN_ATTENTION_BACKEND") or None
    half = q.dtype in _HALF
    cap, cudnn_version = _device_facts(q.device)
    name = choose_backend(q.device.type, q.dtype, spec.kind,
                          flash_installed=q.is_cuda and half and flash_interface() is not None,
                          flash_expressible=flash_window(spec) is not None,
                          head_dim=q.shape[-1], sq=spec.sq, sk=spec.sk, forced=forced,
                          capability=cap, cudnn_version=cudnn_version)
    key = (q.device.type, q.dtype, spec.kind, name)
    if key not in _LOGGED:
        _LOGGED.add(key)
        _log.info("attention_block: %s %s %s blocks -> %s", q.device.type, str(q.dtype).replace("torch.", ""),
                  spec.kind, name)
    return name
