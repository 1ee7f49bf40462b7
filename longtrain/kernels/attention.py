"""Block attention that returns (out, lse), with masks between arbitrary blocks.

`attention_block` is the unit every sequence-parallel scheme is built from: it
attends a block of queries to a block of keys whose global positions start at
`q_offset` / `k_offset`, so causal, sliding-window and document masks between
any two blocks of a long sequence are right. It returns the log-sum-exp of the
scores so that partial results over different key blocks merge exactly.

Mask semantics (positions are global; i = query, j = key):
  causal          j <= i
  window=N        causal: i - N < j <= i (N keys including itself);
                  non-causal: |i - j| < N (symmetric, flash-attn window_size=(N-1, N-1))
  cu_seqlens      int tensor/list [n_docs + 1] of document starts over the global
                  sequence; i and j must lie in the same document (positions at or
                  past cu_seqlens[-1] form one trailing document).
Rows with no visible key give out = 0 and lse = -inf (no NaN in forward or backward).

Backends (a detail, same math; `choose_backend` picks one, a pure function):
  cpu           torch's flash-attention CPU op and its backward (explicit mask for partial blocks)
  flash         flash-attn (CUDA, fp16/bf16) when importable and the mask is expressible
                (full, top-left causal with Sq == Sk, bottom-right causal window)
  sdpa_flash    torch's fused CUDA flash kernel (fp16/bf16, head_dim % 8 == 0, <= 256) for full
                and top-left causal blocks; it returns the log-sum-exp, and its backward takes
                the final (merged) out and lse, exactly what a ring needs
  sdpa_efficient torch's memory-efficient CUDA kernel, same role, any float dtype
  flex          FlexAttention (compiled) with a block mask for every other block (documents,
                windows, causal at offsets); backward through its differentiable lse
  math          fp32 einsum with an explicit S x S mask: the reference, and for blocks with
                Sq*Sk <= MATH_MAX_PAIRS on CUDA, where launching a fused kernel costs more
`LONGTRAIN_ATTENTION_BACKEND=<name>` forces one (e.g. math, as the reference).
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from typing import Sequence

import torch

_log = logging.getLogger(__name__)

Bounds = tuple[int, ...]
NEG_INF = float("-inf")

# ----------------------------------------------------------------------------- masks


def as_bounds(cu_seqlens: torch.Tensor | Sequence[int] | None) -> Bounds | None:
    """Document boundaries as a tuple of python ints (validated), or None."""
    if cu_seqlens is None:
        return None
    vals = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    vals = [int(x) for x in vals]
    if len(vals) < 2 or vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {vals}")
    return tuple(vals)


def _doc_of(pos: int, bounds: Bounds) -> int:
    return bisect.bisect_right(bounds, pos, 1) - 1


def _interval_kind(a: int, m: int, b: int, n: int, causal: bool, window: int | None) -> str:
    """Queries [a, a+m) vs keys [b, b+n), ignoring documents: 'empty' | 'full' | 'partial'."""
    qlo, qhi, klo, khi = a, a + m - 1, b, b + n - 1
    if causal:
        if klo > qhi:
            return "empty"
        if window is not None and khi <= qlo - window:
            return "empty"
        full = khi <= qlo and (window is None or klo > qhi - window)
        return "full" if full else "partial"
    if window is None:
        return "full"
    if klo > qhi + window - 1 or khi < qlo - window + 1:
        return "empty"
    full = qhi - klo < window and khi - qlo < window
    return "full" if full else "partial"


def classify_block(q_start: int, q_len: int, k_start: int, k_len: int, *, causal: bool,
                   window: int | None = None, bounds: Bounds | None = None) -> str:
    """Exact kind of the mask between global query and key ranges.

    Returns 'empty' (no visible pair: skip), 'full' (no mask needed) or 'partial'.
    """
    if q_len <= 0 or k_len <= 0:
        return "empty"
    if bounds is None:
        return _interval_kind(q_start, q_len, k_start, k_len, causal, window)
    q_end, k_end = q_start + q_len, k_start + k_len
    dq0, dq1 = _doc_of(q_start, bounds), _doc_of(q_end - 1, bounds)
    dk0, dk1 = _doc_of(k_start, bounds), _doc_of(k_end - 1, bounds)
    lo, hi = max(dq0, dk0), min(dq1, dk1)
    kinds = []
    for d in range(lo, hi + 1):
        d_start = bounds[d]
        d_end = bounds[d + 1] if d + 1 < len(bounds) else max(q_end, k_end)
        a, a2 = max(q_start, d_start), min(q_end, d_end)
        b, b2 = max(k_start, d_start), min(k_end, d_end)
        if a2 <= a or b2 <= b:
            continue
        kinds.append(_interval_kind(a, a2 - a, b, b2 - b, causal, window))
    if not kinds or all(k == "empty" for k in kinds):
        return "empty"
    single_doc = dq0 == dq1 == dk0 == dk1
    if single_doc and kinds == ["full"]:
        return "full"
    return "partial"


def _doc_ids(pos: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    b = torch.tensor(bounds[1:], dtype=pos.dtype, device=pos.device)
    return torch.searchsorted(b, pos, right=True)


def block_mask(sq: int, sk: int, *, q_offset: int, k_offset: int, causal: bool,
               window: int | None, bounds: Bounds | None, device: torch.device) -> torch.Tensor:
    """Boolean [sq, sk] mask (True = visible) for a block at the given global offsets."""
    i = torch.arange(q_offset, q_offset + sq, device=device)[:, None]
    j = torch.arange(k_offset, k_offset + sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
        if not causal:
            keep &= j < i + window
    if bounds is not None:
        keep &= _doc_ids(i, bounds) == _doc_ids(j, bounds)
    return keep


# ----------------------------------------------------------------------------- backends

_FLASH = None  # None = not probed yet, False = unavailable, else the module


def _flash_attn():
    global _FLASH
    if _FLASH is None:
        try:
            import flash_attn  # noqa: F401
            from flash_attn import flash_attn_interface
            _FLASH = flash_attn_interface
            _log.info("attention_block: using flash-attn %s on CUDA",
                      getattr(flash_attn, "__version__", "?"))
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _FLASH = False
            _log.info("attention_block: flash-attn not importable; CUDA uses torch's fused SDPA kernels and FlexAttention")
    return _FLASH or None


class _Spec:
    """Everything about one block call except the tensors."""

    __slots__ = ("causal", "scale", "window", "q_offset", "k_offset", "bounds", "kind", "sq", "sk")

    def __init__(self, sq: int, sk: int, causal: bool, scale: float, window: int | None,
                 q_offset: int, k_offset: int, bounds: Bounds | None):
        self.sq, self.sk = sq, sk
        self.causal, self.scale, self.window = causal, scale, window
        self.q_offset, self.k_offset, self.bounds = q_offset, k_offset, bounds
        kind = classify_block(q_offset, sq, k_offset, sk, causal=causal, window=window, bounds=bounds)
        if kind == "partial" and causal and window is None and q_offset == k_offset and sq <= sk \
                and classify_block(q_offset, sq, k_offset, sk, causal=False, bounds=bounds) == "full":
            kind = "causal"  # plain causal aligned at the top-left corner: no explicit mask
        self.kind = kind  # 'empty' | 'full' | 'causal' | 'partial'

    def mask(self, device: torch.device) -> torch.Tensor:
        return block_mask(self.sq, self.sk, q_offset=self.q_offset, k_offset=self.k_offset,
                          causal=self.causal, window=self.window, bounds=self.bounds, device=device)


BACKENDS = ("cpu", "flash", "sdpa_flash", "sdpa_efficient", "flex", "math")
MATH_MAX_PAIRS = 128 * 128  # on CUDA, blocks with Sq*Sk at most this use math (<= 64 KiB of scores a head)
_LOGGED: set = set()


def choose_backend(device_type: str, dtype: torch.dtype, kind: str, *, flash_installed: bool,
                   flash_expressible: bool, head_dim: int, sq: int, sk: int,
                   forced: str | None = None) -> str:
    """Which kernel computes a block: a pure function of device, dtype, block kind and packages.

    kind: 'full' | 'causal' (top-left aligned, no other mask) | 'partial' (anything else:
    documents, windows, causal at offsets). flash_expressible: flash-attn's (bottom-right)
    masks can express the block. Returns one of BACKENDS (see the module docstring).
    """
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LONGTRAIN_ATTENTION_BACKEND={forced!r}: use one of {', '.join(BACKENDS)}")
        return forced
    if device_type == "cpu":
        return "cpu"
    if device_type != "cuda" or sq * sk <= MATH_MAX_PAIRS:
        return "math"
    half = dtype in (torch.float16, torch.bfloat16)
    if half and flash_installed and flash_expressible and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    if kind in ("full", "causal"):
        return "sdpa_flash" if half and head_dim % 8 == 0 and head_dim <= 256 else "sdpa_efficient"
    return "flex"


def _backend(q: torch.Tensor, spec: _Spec) -> str:
    forced = os.environ.get("LONGTRAIN_ATTENTION_BACKEND") or None
    half = q.dtype in (torch.float16, torch.bfloat16)
    name = choose_backend(q.device.type, q.dtype, spec.kind,
                          flash_installed=q.is_cuda and half and _flash_attn() is not None,
                          flash_expressible=_flash_window(spec) is not None,
                          head_dim=q.shape[-1], sq=spec.sq, sk=spec.sk, forced=forced)
    key = (q.device.type, q.dtype, spec.kind, name)
    if key not in _LOGGED:
        _LOGGED.add(key)
        _log.info("attention_block: %s %s %s blocks -> %s", q.device.type, str(q.dtype).replace("torch.", ""),
                  spec.kind, name)
    return name


def _flash_window(spec: _Spec):
    """(causal, window_size) for flash-attn (bottom-right aligned), or None if not expressible."""
    if spec.kind == "full":
        return False, (-1, -1)
    if spec.kind == "causal" and spec.sq == spec.sk:
        return True, (-1, -1)
    delta = spec.q_offset - spec.k_offset
    if spec.bounds is None and spec.causal and spec.window is not None and delta == spec.sk - spec.sq \
            and spec.sq <= spec.sk:
        return True, (spec.window - 1, 0)
    return None


def _t(x: torch.Tensor) -> torch.Tensor:  # [B,S,H,D] <-> [B,H,S,D] as a view
    return x.transpose(1, 2)


def _cpu_forward(q, k, v, spec: _Spec):
    mask = None
    if spec.kind == "partial":
        keep = spec.mask(q.device)
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, NEG_INF)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _t(q), _t(k), _t(v), 0.0, spec.kind == "causal", attn_mask=mask, scale=spec.scale)
    out = _t(out)
    if mask is not None:
        dead = ~keep.any(dim=1)  # rows with no visible key: the op reports lse = 0 there
        if bool(dead.any()):
            lse = lse.masked_fill(dead, NEG_INF)
            out = out.masked_fill(dead[None, :, None, None], 0.0)
    return out, lse


def _cpu_backward(dout, q, k, v, out, lse, spec: _Spec):
    mask = None
    if spec.kind == "partial":
        keep = spec.mask(q.device)
        mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, NEG_INF)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _t(dout), _t(q), _t(k), _t(v), _t(out), lse, 0.0, spec.kind == "causal",
        attn_mask=mask, scale=spec.scale)
    return _t(dq), _t(dk), _t(dv)


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    g = hq // x.shape[2]
    return x if g == 1 else x.repeat_interleave(g, dim=2)


def _math_scores(q, k, spec: _Spec):
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), _expand_kv(k, q.shape[2]).float()) * spec.scale
    if spec.kind != "full":
        keep = spec.mask(q.device)
        s = s.masked_fill(~keep, NEG_INF)
    return s


def _math_forward(q, k, v, spec: _Spec):
    s = _math_scores(q, k, spec)
    lse = torch.logsumexp(s, dim=-1)  # [B,H,Sq], -inf on dead rows
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, _expand_kv(v, q.shape[2]).float())
    return out.to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, spec: _Spec):
    hq, hkv = q.shape[2], k.shape[2]
    s = _math_scores(q, k, spec)
    p = torch.exp(s - lse[..., None])  # lse = +inf on dead rows -> p = 0
    do = dout.float()
    ve, ke = _expand_kv(v, hq).float(), _expand_kv(k, hq).float()
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, ve)
    delta = (do * out.float()).sum(-1).transpose(1, 2)  # [B,H,Sq]
    ds = p * (dp - delta[..., None]) * spec.scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float())
    if hq != hkv:
        b, sk, _, d = dk.shape
        dk = dk.view(b, sk, hkv, hq // hkv, d).sum(3)
        dv = dv.view(b, sk, hkv, hq // hkv, d).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _flash_forward(q, k, v, spec: _Spec):
    fa = _flash_attn()
    causal, ws = _flash_window(spec)
    out, lse, _ = fa.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=spec.scale,
                                     causal=causal, window_size=ws, return_attn_probs=True)
    return out, lse.float()


def _flash_backward(dout, q, k, v, out, lse, spec: _Spec):
    # flash-attn's private backward has changed signature between releases; fill by name.
    import inspect
    fa = _flash_attn()
    causal, ws = _flash_window(spec)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fn = fa._flash_attn_backward
    params = inspect.signature(fn).parameters
    given = dict(dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(), softmax_lse=lse,
                 dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=spec.scale, causal=causal,
                 window_size=ws, window_size_left=ws[0], window_size_right=ws[1], softcap=0.0,
                 alibi_slopes=None, deterministic=False, rng_state=None)
    fn(**{name: given[name] for name in params if name in given})
    return dq, dk, dv


def _sdpa_flash_ok(q: torch.Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


_FLASH_AUX: dict = {}  # device -> (cum_seq_q, cum_seq_k, rng_state, unused) of a dense forward
_EFF_LSE_WIDTH: dict = {}  # Sq -> width of the efficient kernel's lse (it pads rows on some versions)


def _sdpa_forward(q, k, v, spec: _Spec, efficient: bool):
    """torch's fused CUDA kernels (flash / memory-efficient) for full and top-left causal blocks."""
    hq, sq = q.shape[2], q.shape[1]
    qt, kt, vt = _t(q), _t(_expand_kv(k, hq)), _t(_expand_kv(v, hq))
    causal = spec.kind == "causal"
    if not efficient:
        res = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False,
                                                                 scale=spec.scale)
        out, lse = res[0], res[1]
        # the dense (not varlen) markers and rng state of a no-dropout call: the backward needs
        # these exact objects (an empty int64 tensor would send it down the varlen path)
        _FLASH_AUX[q.device] = (res[2], res[3], res[6], res[7])
    else:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, None, True, 0.0, causal, scale=spec.scale)
        _EFF_LSE_WIDTH[sq] = lse.shape[-1]
        lse = lse[..., :sq]
    return _t(out), lse


def _philox(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros((), dtype=torch.int64, device=device)  # dropout 0: never read
    return z, z


def _reduce_kv_grad(g: torch.Tensor, hkv: int) -> torch.Tensor:
    b, sk, hq, d = g.shape
    return g if hq == hkv else g.view(b, sk, hkv, hq // hkv, d).sum(3)


def _sdpa_backward(dout, q, k, v, out, lse, spec: _Spec, efficient: bool):
    hq, hkv, sq, sk = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    qt, kt, vt = _t(q), _t(_expand_kv(k, hq)), _t(_expand_kv(v, hq))
    causal = spec.kind == "causal"
    if not efficient:
        if q.device not in _FLASH_AUX:  # backward before any forward in this process: make the markers
            _sdpa_forward(q[:, :1], k[:, :1], v[:, :1], _Spec(1, 1, False, spec.scale, None, 0, 0, None), False)
        cq, ck, seed, offset = _FLASH_AUX[q.device]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            _t(dout), qt, kt, vt, _t(out), lse, cq, ck, sq, sk, 0.0, causal, seed, offset,
            scale=spec.scale)
    else:
        width = _EFF_LSE_WIDTH.get(sq, sq)
        if width != sq:
            lse = torch.nn.functional.pad(lse, (0, width - sq))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            _t(dout), qt, kt, vt, None, _t(out), lse, *_philox(q.device), 0.0, [True, True, True, False], causal,
            scale=spec.scale)
    return _t(dq), _reduce_kv_grad(_t(dk), hkv), _reduce_kv_grad(_t(dv), hkv)


_FLEX: dict = {}


def _flex_fn(compiled: bool = True):
    """FlexAttention: compiled (CUDA; eager flex materialises the scores) or eager (CPU tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "fn" not in _FLEX:
        # automatic dynamic shapes: ring blocks come in a few sizes; after the first recompile one
        # dynamic kernel serves them all instead of one compile per size (and the recompile limit)
        _FLEX["fn"] = torch.compile(flex_attention)
        # shapes x dtypes x grad mode (forward under no_grad, recompute under grad) exceed the
        # default limit of 8 compiled variants, after which dynamo would silently run eager flex
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
    return _FLEX["fn"]


_MASKS: dict = {}


def _flex_block_mask(spec: _Spec, device: torch.device):
    """BlockMask of the block's mask (cached by the block's geometry)."""
    key = (spec.sq, spec.sk, spec.q_offset, spec.k_offset, spec.causal, spec.window, spec.bounds, str(device))
    bm = _MASKS.get(key)
    if bm is not None:
        return bm
    from torch.nn.attention.flex_attention import create_block_mask

    q_off, k_off, causal, window = spec.q_offset, spec.k_offset, spec.causal, spec.window
    if spec.bounds is not None:
        qd = _doc_ids(torch.arange(q_off, q_off + spec.sq, device=device), spec.bounds)
        kd = _doc_ids(torch.arange(k_off, k_off + spec.sk, device=device), spec.bounds)
    else:
        qd = kd = None

    def mask_mod(b, h, qi, kj):
        i, j = qi + q_off, kj + k_off
        keep = i >= 0  # all-true of the right shape
        if causal:
            keep = keep & (j <= i)
        if window is not None:
            keep = keep & (j > i - window)
            if not causal:
                keep = keep & (j < i + window)
        if qd is not None:
            keep = keep & (qd[qi] == kd[kj])
        return keep

    try:  # compiled mask construction never holds the Sq x Sk boolean mask
        bm = create_block_mask(mask_mod, None, None, spec.sq, spec.sk, device=device,
                               _compile=device.type == "cuda" and spec.sq * spec.sk > 1 << 24)
    except TypeError:
        bm = create_block_mask(mask_mod, None, None, spec.sq, spec.sk, device=device)
    if len(_MASKS) > 256:
        _MASKS.clear()
    _MASKS[key] = bm
    return bm


def _flex_call(q, k, v, spec: _Spec):
    fn = _flex_fn(compiled=q.is_cuda)
    out, lse = fn(_t(q), _t(k), _t(v), block_mask=_flex_block_mask(spec, q.device), scale=spec.scale,
                  enable_gqa=q.shape[2] != k.shape[2], return_lse=True)
    return _t(out), lse


def _flex_forward(q, k, v, spec: _Spec):
    with torch.no_grad():
        return _flex_call(q, k, v, spec)


def backward_through_lse(fwd, dout, q, k, v, out, lse, spec: _Spec):
    """Block gradients for the FINAL (merged) out/lse, by autograd through a differentiable
    forward `fwd(q, k, v, spec) -> (out_b, lse_b)` of the block alone (FlexAttention's).

    With c = exp(lse_b - lse) per row, the block's true gradient equals autograd through
    (out_b, lse_b) with grad_out = c*dout and grad_lse = c*(rowsum(dout*out_b) - rowsum(dout*out)).
    """
    with torch.enable_grad():
        qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
        ob, lb = fwd(qd, kd, vd, spec)
        do = dout.float()
        c = torch.exp(lb.detach().float() - lse)  # [B,H,Sq]; 0 where either side is dead
        delta = (do * out.float()).sum(-1).transpose(1, 2)
        delta_b = (do * ob.detach().float()).sum(-1).transpose(1, 2)
        g_out = (do * c.transpose(1, 2)[..., None]).to(ob.dtype)
        g_lse = (c * (delta_b - delta)).to(lb.dtype)
        dq, dk, dv = torch.autograd.grad((ob, lb), (qd, kd, vd), (g_out, g_lse))
    return dq, dk, dv


def _flex_backward(dout, q, k, v, out, lse, spec: _Spec):
    return backward_through_lse(_flex_call, dout, q, k, v, out, lse, spec)


_FORWARDS = {
    "cpu": _cpu_forward, "math": _math_forward, "flash": _flash_forward, "flex": _flex_forward,
    "sdpa_flash": lambda q, k, v, s: _sdpa_forward(q, k, v, s, efficient=False),
    "sdpa_efficient": lambda q, k, v, s: _sdpa_forward(q, k, v, s, efficient=True),
}
_BACKWARDS = {
    "cpu": _cpu_backward, "math": _math_backward, "flash": _flash_backward, "flex": _flex_backward,
    "sdpa_flash": lambda *a: _sdpa_backward(*a, efficient=False),
    "sdpa_efficient": lambda *a: _sdpa_backward(*a, efficient=True),
}


# ----------------------------------------------------------------------------- block API


def _default_scale(d: int, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,Sq,Hq,D], k/v [B,Sk,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)} "
                         "(batch/head_dim must match, Hq a multiple of Hkv)")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1 (keys including self), got {window}")


def make_spec(q: torch.Tensor, k: torch.Tensor, *, causal: bool, softmax_scale: float | None,
              window: int | None, q_offset: int, k_offset: int, bounds: Bounds | None) -> _Spec:
    return _Spec(q.shape[1], k.shape[1], causal, _default_scale(q.shape[-1], softmax_scale),
                 None if window is None else int(window), int(q_offset), int(k_offset), bounds)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec):
    """No-autograd forward: (out [B,Sq,Hq,D] in q.dtype, lse fp32 [B,Hq,Sq])."""
    b, sq, hq, d = q.shape
    if spec.kind == "empty":
        return (q.new_zeros(b, sq, hq, d),
                torch.full((b, hq, sq), NEG_INF, dtype=torch.float32, device=q.device))
    out, lse = _FORWARDS[_backend(q, spec)](q, k, v, spec)
    return out, lse.float()


def block_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor | None, lse: torch.Tensor, spec: _Spec,
                   delta: torch.Tensor | None = None):
    """Gradients of one block given the FINAL out/lse of the rows (which may merge many blocks).

    `lse` fp32 [B,Hq,Sq] (-inf allowed on rows that see nothing at all). Instead of
    `out`, `delta` = rowsum(dout * out) fp32 [B,Hq,Sq] may be given (what TokenRing ships).
    Returns (dq, dk, dv) in the input dtypes.
    """
    if spec.kind == "empty":
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # exp(s - (+inf)) = 0: rows that see nothing get zero gradients instead of NaN
    lse = lse.float().masked_fill(lse == NEG_INF, float("inf")).contiguous()
    if out is None:
        # Only rowsum(dout*out) enters the backward: build any `out` with that rowsum.
        do = dout.float()
        nrm = (do * do).sum(-1)  # [B,S,H]
        coef = torch.where(nrm > 0, delta.transpose(1, 2) / nrm.clamp_min(1e-30), torch.zeros_like(nrm))
        out = (do * coef[..., None]).to(dout.dtype)
    return _BACKWARDS[_backend(q, spec)](dout, q, k, v, out, lse, spec)


class _AttentionBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec):  # noqa: D401
        out, lse = block_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(dout.contiguous(), q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None


def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: float | None = None, window: int | None = None,
                    q_offset: int = 0, k_offset: int = 0,
                    cu_seqlens: torch.Tensor | Sequence[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a query block to a key block, returning (out, lse).

    q [B,Sq,Hq,D], k/v [B,Sk,Hkv,D] with Hq a multiple of Hkv (GQA: query head h uses
    kv head h // (Hq/Hkv)). q_offset/k_offset are the global positions of the first
    query/key; masks (module docstring) use global positions. Returns out [B,Sq,Hq,D]
    in q.dtype and lse fp32 [B,Hq,Sq] (natural log; -inf on rows that see no key,
    whose out is 0). Differentiable w.r.t. q, k, v (lse is not differentiable).
    """
    _check(q, k, v, window)
    spec = make_spec(q, k, causal=causal, softmax_scale=softmax_scale, window=window,
                     q_offset=q_offset, k_offset=k_offset, bounds=as_bounds(cu_seqlens))
    return _AttentionBlockFn.apply(q, k, v, spec)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    softmax_scale: float | None = None, window: int | None = None,
                    cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """O(S^2) reference in plain torch (fp32 math, explicit masks, autograd backward).

    q [B,S,Hq,D], k/v [B,S,Hkv,D]; positions are 0..S-1. Returns out in q.dtype.
    Written independently of attention_block's mask code on purpose.
    """
    b, s, hq, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    rep = hq // k.shape[2]
    kf = k.float().repeat_interleave(rep, dim=2)
    vf = v.float().repeat_interleave(rep, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), kf) * scale
    qi = torch.arange(s).view(-1, 1)
    kj = torch.arange(sk).view(1, -1)
    allowed = torch.ones(s, sk, dtype=torch.bool)
    if causal:
        allowed = allowed & (kj <= qi)
    if window is not None:
        dist_ = qi - kj
        allowed = allowed & (dist_ < window) & ((dist_ > -window) if not causal else True)
    if cu_seqlens is not None:
        cu = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
        n = max(s, sk)
        lengths = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)] + [max(0, n - cu[-1])]
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        allowed = allowed & (doc[:s].view(-1, 1) == doc[:sk].view(1, -1))
    allowed = allowed.to(q.device)
    alive = allowed.any(dim=1)  # rows that see at least one key
    scores = scores.masked_fill(~allowed, float("-inf"))
    scores = scores.masked_fill(~alive.view(-1, 1), 0.0)  # keep softmax finite on dead rows
    probs = torch.softmax(scores, dim=-1) * alive.view(-1, 1)
    out = torch.einsum("bhij,bjhd->bihd", probs, vf)
    return out.to(q.dtype)
