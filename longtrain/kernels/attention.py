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

Backends (a detail, same math): on CPU the torch flash-attention CPU op and its
backward; on CUDA flash-attn when importable and the mask is expressible, else a
plain fp32 math path. `LONGTRAIN_ATTENTION_BACKEND=math` forces the math path.
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
            _log.info("attention_block: flash-attn not importable; CUDA uses the torch math path")
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


def _backend(q: torch.Tensor, spec: _Spec) -> str:
    forced = os.environ.get("LONGTRAIN_ATTENTION_BACKEND")
    if forced:
        return forced
    if q.device.type == "cpu":
        return "cpu"
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_window(spec) is not None \
            and _flash_attn() is not None:
        return "flash"
    return "math"


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
    backend = _backend(q, spec)
    fwd = {"cpu": _cpu_forward, "flash": _flash_forward, "math": _math_forward}[backend]
    out, lse = fwd(q, k, v, spec)
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
    backend = _backend(q, spec)
    bwd = {"cpu": _cpu_backward, "flash": _flash_backward, "math": _math_backward}[backend]
    return bwd(dout, q, k, v, out, lse, spec)


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
