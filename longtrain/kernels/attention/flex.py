"""`flex`: FlexAttention for every block a fixed-function kernel cannot mask (documents, windows,
causal at offsets). One forward per block, one compiled kernel per step for every block geometry.

- Geometry as data: the mask_mod reads the block's global offsets, causal flag, window and the
  document ids of its rows/columns from tensors captured in a closure of ONE function, so dynamo
  lifts them as graph inputs instead of baking Python ints into the graph: every block of a ring
  (any offset, window, document layout) runs the same compiled kernel. Shapes are compiled
  dynamic, so the few block sizes of a ring share it too.
- BlockMask from tiles: which 128 x 128 tiles are empty, full or partial is computed from the
  intervals directly (masks.tile_kinds, vectorised, never the Sq x Sk mask, no compilation, no
  host sync); the exact mask_mod runs only inside partial tiles.
- Backward without a second forward: FlexAttention's own backward kernel (the
  `flex_attention_backward` higher-order op, compiled the same way) is handed the FINAL merged
  out and lse of the rows, exactly like the flash kernels: with P = exp(S - lse_final) and
  delta = rowsum(dout * out_final) it is the block's gradient for the merged result. (Its lse is
  log2-based; the public forward returns the natural log, hence the factor 1/ln 2.)
  If that op cannot be called (another torch), `backward_through_lse` (autograd through a
  recomputed forward of the block, the previous method) is used, with a warning.
- Grouped K/V heads go in as they are (enable_gqa; the backward op takes them too).
"""

from __future__ import annotations

import logging
import math

import torch

from .masks import doc_index, tile_kinds
from .spec import BlockSpec, swap_seq_heads

_log = logging.getLogger("longtrain.kernels.attention")

TILE = 128
NO_WINDOW = 1 << 40  # "no window" as a window longer than any sequence (positions are int64)
LN2 = math.log(2.0)

# torch.compile backend for FlexAttention: None = inductor on CUDA and dynamo's "eager" elsewhere
# (CPU tests: eager flex materialises the scores, fine for small blocks). Tests set a counting one.
COMPILE_BACKEND = None
_COMPILED: dict = {}
_MASKS: dict = {}
_DIRECT_BACKWARD = {"ok": None}  # None = untried, True = the flex backward op works, False = fall back


def _raise_recompile_limit() -> None:
    # a run compiles a handful of variants (dtypes, the few shape specialisations dynamic shapes
    # still make); past the limit dynamo would silently run eager flex, which materialises scores
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))


def _compiled(which: str, device_type: str):
    backend = COMPILE_BACKEND or ("inductor" if device_type == "cuda" else "eager")
    key = (which, backend if isinstance(backend, str) else id(backend))
    fn = _COMPILED.get(key)
    if fn is None:
        _raise_recompile_limit()
        fn = torch.compile(_forward_impl if which == "fwd" else _backward_impl, backend=backend, dynamic=True)
        _COMPILED[key] = fn
    return fn


def _forward_impl(q, k, v, block_mask, scale: float, enable_gqa: bool):
    from torch.nn.attention.flex_attention import flex_attention
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9: the older spelling
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True)
    out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                              return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def _backward_impl(q, k, v, out, lse2, dout, block_mask_tuple, scale: float, kernel_options: dict):
    from torch._higher_order_ops.flex_attention import flex_attention_backward
    if torch.compiler.is_compiling():  # as flex_attention does: heads and head_dim are static
        for x in (q, k, v, out, dout):
            torch._dynamo.mark_static(x, -3)
            torch._dynamo.mark_static(x, -1)
    dq, dk, dv, _ = flex_attention_backward(q, k, v, out, lse2, dout, None, _identity_score, None,
                                            block_mask_tuple, scale, kernel_options, (), ())
    return dq, dk, dv


def _make_mask_mod(geo: torch.Tensor, qdoc: torch.Tensor, kdoc: torch.Tensor):
    """The one mask_mod of every block: geo = [q_offset, k_offset, causal (0/1), window]."""

    def mask_mod(b, h, q_idx, kv_idx):
        i, j, w = q_idx + geo[0], kv_idx + geo[1], geo[3]
        causal = geo[2] != 0
        keep = (j > i - w) & ((j <= i) | ~causal) & ((j < i + w) | causal)
        return keep & (qdoc[q_idx] == kdoc[kv_idx])

    return mask_mod


def _ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile selection [nq, nk] -> (counts [1,1,nq], indices [1,1,nq,nk]) with the selected first."""
    idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return sel.sum(-1, dtype=torch.int32)[None, None], idx[None, None].contiguous()


def _flex_block_mask(spec: BlockSpec, device: torch.device):
    """BlockMask of the block (cached by the block's geometry; its mask_mod reads tensors only)."""
    key = (spec.sq, spec.sk, spec.q_offset, spec.k_offset, spec.causal, spec.window, spec.bounds, str(device))
    bm = _MASKS.get(key)
    if bm is not None:
        return bm
    from torch.nn.attention.flex_attention import BlockMask

    sq, sk = spec.sq, spec.sk
    window = NO_WINDOW if spec.window is None else spec.window
    geo = torch.empty(4, dtype=torch.int64, device=device)
    for i, val in enumerate((spec.q_offset, spec.k_offset, int(spec.causal), window)):
        geo[i] = val  # a fill from a host scalar: no host-to-device copy that could wait for the stream
    if spec.bounds is not None:
        qdoc = doc_index(torch.arange(spec.q_offset, spec.q_offset + sq, device=device), spec.bounds)
        kdoc = doc_index(torch.arange(spec.k_offset, spec.k_offset + sk, device=device), spec.bounds)
    else:
        qdoc = torch.zeros(sq, dtype=torch.int64, device=device)
        kdoc = torch.zeros(sk, dtype=torch.int64, device=device)
    full, partial = tile_kinds(sq, sk, q_offset=spec.q_offset, k_offset=spec.k_offset, causal=spec.causal,
                               window=spec.window, bounds=spec.bounds, tile=TILE, device=device)
    n_part, i_part = _ordered(partial)
    n_full, i_full = _ordered(full)
    bm = BlockMask.from_kv_blocks(n_part, i_part, n_full, i_full, BLOCK_SIZE=TILE,
                                  mask_mod=_make_mask_mod(geo, qdoc, kdoc), seq_lengths=(sq, sk))
    if len(_MASKS) > 256:
        _MASKS.clear()
    _MASKS[key] = bm
    return bm


def _no_duck_shapes():
    # dynamic shapes without "duck sizing": sizes, strides and storage offsets of the block views
    # that happen to be equal at the first compile would otherwise be guarded equal (Sq == Sk, an
    # offset == a stride, ...), and every block breaking such a coincidence would recompile
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(use_duck_shape=False)


def _flex_kernel_forward(qt, kt, vt, block_mask, scale: float):
    """The FlexAttention forward on [B,H,S,D] views -> (out [B,Hq,Sq,D], natural lse [B,Hq,Sq])."""
    with _no_duck_shapes():
        return _compiled("fwd", qt.device.type)(qt, kt, vt, block_mask, scale, qt.shape[1] != kt.shape[1])


def _flex_kernel_backward(qt, kt, vt, ot, dot, lse, block_mask, scale: float):
    """FlexAttention's backward op for a FINAL (out, natural lse) -> (dq, dk, dv) as [B,H,S,D]."""
    from torch.nn.attention.flex_attention import _apply_kernel_options

    opts = _apply_kernel_options(qt, kt, vt, True, None)
    lse2 = (lse * (1.0 / LN2)).contiguous()  # the op's lse is base 2; +inf (dead rows) stays +inf
    with _no_duck_shapes():
        return _compiled("bwd", qt.device.type)(qt, kt, vt, ot, lse2, dot, block_mask.as_tuple(), scale, opts)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """x [B,S,H,D] as a [B,H,S,D] tensor on the same memory that is not a view (no `_base`), with
    canonical strides on size-1 dims: the compiled kernel's guards then see a block's own sizes,
    not the larger tensor it was sliced from (which would make some blocks recompile). No copy."""
    x = swap_seq_heads(x)
    stride = list(x.stride())
    for i in range(x.dim() - 1, -1, -1):
        if x.shape[i] == 1:
            stride[i] = stride[i + 1] * x.shape[i + 1] if i + 1 < x.dim() else 1
    return torch.empty(0, dtype=x.dtype, device=x.device).set_(x.untyped_storage(), x.storage_offset(),
                                                                x.shape, stride)


def _flex_call(q, k, v, spec: BlockSpec, plain: bool = True):
    qt, kt, vt = (_plain(x) if plain else swap_seq_heads(x) for x in (q, k, v))  # views keep autograd (fallback)
    out, lse = _flex_kernel_forward(qt, kt, vt, _flex_block_mask(spec, q.device), spec.scale)
    return swap_seq_heads(out), lse


def flex_forward(q, k, v, spec: BlockSpec):
    with torch.no_grad():
        return _flex_call(q, k, v, spec)


def backward_through_lse(fwd, dout, q, k, v, out, lse, spec: BlockSpec):
    """Block gradients for the FINAL (merged) out/lse, by autograd through a differentiable
    forward `fwd(q, k, v, spec) -> (out_b, lse_b)` of the block alone (a second forward).

    With c = exp(lse_b - lse) per row, the block's true gradient equals autograd through
    (out_b, lse_b) with grad_out = c*dout and grad_lse = c*(rowsum(dout*out_b) - rowsum(dout*out)).
    Only a fallback for the flex backend now (and a check of the identity in the tests).
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


def flex_backward(dout, q, k, v, out, lse, spec: BlockSpec):
    if _DIRECT_BACKWARD["ok"] is not False:
        try:
            dq, dk, dv = _flex_kernel_backward(*(_plain(x) for x in (q, k, v, out, dout)), lse,
                                               _flex_block_mask(spec, q.device), spec.scale)
            _DIRECT_BACKWARD["ok"] = True
            return swap_seq_heads(dq), swap_seq_heads(dk), swap_seq_heads(dv)
        except Exception as e:  # noqa: BLE001 - only before it has ever worked: fall back for good
            if _DIRECT_BACKWARD["ok"]:
                raise
            _DIRECT_BACKWARD["ok"] = False
            _log.warning("attention_block: FlexAttention's backward op failed (%s: %s); using autograd "
                         "through a second forward per block instead", type(e).__name__, str(e)[:200])
    return backward_through_lse(lambda *a: _flex_call(*a, plain=False), dout, q, k, v, out, lse, spec)
