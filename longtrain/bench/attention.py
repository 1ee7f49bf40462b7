"""`longtrain bench attention`: K/V bytes of one attention block per backend, before and now (GQA).

Before issue 23 the torch-kernel backends (`sdpa_flash`, `sdpa_efficient`, and `math`) repeated K
and V to every query head for each block and ring step (4x for LLaMA-3's 32 query / 8 KV heads),
and their backward summed the repeated dK/dV back; every backend now hands the kernel the grouped
heads as they are (the kernels take them, like F.scaled_dot_product_attention's enable_gqa).

Measured, not computed: one block's `block_forward` + `block_backward` runs for each backend
(forced) on the `meta` device (real shapes, no data, no GPU needed), once with the backend's
`native_gqa` switched off (= the old code) and once as it is now. A TorchDispatchMode records every
aten op: the K and V operands of the attention kernels, the dK/dV they write, and the bytes written
by any other op whose output is K/V-sized at query-head width (the repeat copies and the repeated
gradients' reduction). flash-attn and FlexAttention cannot run on meta: recorders stand in at their
kernel entry points and see exactly what the dispatch code hands them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import types
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from longtrain.bench.common import print_table, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("cudnn", "sdpa_flash", "sdpa_efficient", "flash", "flex")
COPIED_BEFORE = {"sdpa_flash", "sdpa_efficient", "math"}  # what repeated K/V per query head before
_MiB = 2 ** 20


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _Meter(dict):
    def add(self, key: str, n: int) -> None:
        self[key] = self.get(key, 0) + n


def _kernel_ops() -> dict:
    a = torch.ops.aten
    fwd = (a._scaled_dot_product_flash_attention, a._scaled_dot_product_efficient_attention,
           a._scaled_dot_product_cudnn_attention, a._scaled_dot_product_flash_attention_for_cpu)
    bwd = (a._scaled_dot_product_flash_attention_backward, a._scaled_dot_product_efficient_attention_backward,
           a._scaled_dot_product_cudnn_attention_backward, a._scaled_dot_product_flash_attention_for_cpu_backward)
    return {**{op.default: 1 for op in fwd}, **{op.default: 2 for op in bwd}}  # position of K (V follows)


class _Record(TorchDispatchMode):
    """Records K/V operands of the attention kernels, the dK/dV they write, and the bytes written by
    every other op that reads K/V or something computed from them (repeat copies, group sums)."""

    def __init__(self, meter: _Meter, sources: tuple) -> None:
        super().__init__()
        self.meter, self.kernels = meter, _kernel_ops()
        self.derived: dict = {}
        for t in sources:
            self._mark(t)

    def _mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self.derived[id(t)] = weakref.ref(t)

    def _is_derived(self, t) -> bool:
        ref = self.derived.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pos = self.kernels.get(func)
        if pos is not None:
            self.meter.add("kv_read", _nbytes(args[pos]) + _nbytes(args[pos + 1]))
            if pos == 2:  # backward: (dq, dk, dv, ...); dk and dv are K/V-derived
                self.meter.add("dkv_written", _nbytes(outs[1]) + _nbytes(outs[2]))
                self._mark(outs[1])
                self._mark(outs[2])
            return out
        inputs = [*args, *kwargs.values()]
        if any(self._is_derived(t) for t in inputs):
            for t in outs:
                self._mark(t)
            if not func.is_view and not func.name().startswith(("aten::empty", "aten::new_empty")):
                self.meter.add("copies", sum(_nbytes(t) for t in outs))
        return out


@contextlib.contextmanager
def _stand_ins(meter: _Meter):
    """flash-attn (2.7+ API) and FlexAttention kernel entries that record K/V and return meta outputs."""
    from longtrain.kernels.attention import flashattn, flex

    def fa_fwd(q, k, v, *a):
        meter.add("kv_read", _nbytes(k) + _nbytes(v))
        b, s, h, _ = q.shape
        return torch.empty_like(q), q.new_empty(b, h, s, dtype=torch.float32), q.new_empty(0), q.new_empty(2)

    def fa_bwd(dout, q, k, v, out, lse, dq, dk, dv, *a):
        meter.add("kv_read", _nbytes(k) + _nbytes(v))
        meter.add("dkv_written", _nbytes(dk) + _nbytes(dv))
        return lse

    def fx_fwd(qt, kt, vt, *a):
        meter.add("kv_read", _nbytes(kt) + _nbytes(vt))
        return torch.empty_like(qt), qt.new_empty(qt.shape[:3], dtype=torch.float32)

    def fx_bwd(qt, kt, vt, *a):
        meter.add("kv_read", _nbytes(kt) + _nbytes(vt))
        meter.add("dkv_written", 2 * _nbytes(kt))
        return torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)

    iface = types.SimpleNamespace(_flash_attn_forward=fa_fwd, _flash_attn_backward=fa_bwd)
    saved = (flashattn._FLASH, flex._flex_kernel_forward, flex._flex_kernel_backward, flex._flex_block_mask)
    flashattn._FLASH = (iface, "2.7")
    flex._flex_kernel_forward, flex._flex_kernel_backward = fx_fwd, fx_bwd
    flex._flex_block_mask = lambda spec, device: None
    try:
        yield
    finally:
        flashattn._FLASH, flex._flex_kernel_forward, flex._flex_kernel_backward, flex._flex_block_mask = saved


@contextlib.contextmanager
def _gqa_copies(backend: str, on: bool):
    """Switch a backend's native_gqa off (the old behaviour) for the duration."""
    from longtrain.kernels.attention import dispatch

    old = dispatch.REGISTRY[backend]
    if on:
        dispatch.REGISTRY[backend] = dataclasses.replace(old, native_gqa=False)
    try:
        yield
    finally:
        dispatch.REGISTRY[backend] = old


def measure(backend: str, *, before: bool, sq: int, sk: int, heads: int, kv_heads: int, head_dim: int,
            dtype: torch.dtype, causal: bool, batch: int = 1) -> dict[str, int]:
    """Bytes (kv_read, dkv_written, copies) of one block's forward + backward with `backend` forced."""
    from longtrain.kernels.attention import block_backward, block_forward, make_spec

    meta = torch.device("meta")
    q = torch.empty(batch, sq, heads, head_dim, dtype=dtype, device=meta)
    k = torch.empty(batch, sk, kv_heads, head_dim, dtype=dtype, device=meta)
    v = torch.empty_like(k)
    spec = make_spec(q, k, causal=causal, softmax_scale=None, window=None, q_offset=0, k_offset=0, bounds=None)
    meter = _Meter(kv_read=0, dkv_written=0, copies=0)
    old_env = os.environ.get("LONGTRAIN_ATTENTION_BACKEND")
    os.environ["LONGTRAIN_ATTENTION_BACKEND"] = backend
    try:
        with _stand_ins(meter), _gqa_copies(backend, before and backend in COPIED_BEFORE), _Record(meter, (k, v)):
            out, lse = block_forward(q, k, v, spec)
            block_backward(torch.empty_like(out), q, k, v, out, lse, spec)
    finally:
        if old_env is None:
            os.environ.pop("LONGTRAIN_ATTENTION_BACKEND", None)
        else:
            os.environ["LONGTRAIN_ATTENTION_BACKEND"] = old_env
    return dict(meter)


def bench(sq: int, sk: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
          causal: bool) -> list[dict[str, Any]]:
    rows = []
    for be in BACKENDS:
        kw = dict(sq=sq, sk=sk, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, causal=causal)
        b, n = measure(be, before=True, **kw), measure(be, before=False, **kw)
        tb, tn = sum(b.values()), sum(n.values())
        rows.append({"backend": be,
                     "K/V read by kernel MiB": f"{b['kv_read'] / _MiB:.0f} -> {n['kv_read'] / _MiB:.0f}",
                     "dK/dV written MiB": f"{b['dkv_written'] / _MiB:.0f} -> {n['dkv_written'] / _MiB:.0f}",
                     "repeat/reduce copies MiB": f"{b['copies'] / _MiB:.0f} -> {n['copies'] / _MiB:.0f}",
                     "total K/V traffic MiB": f"{tb / _MiB:.0f} -> {tn / _MiB:.0f}",
                     "ratio": round(tb / max(tn, 1), 2), "note": NOTES.get(be, ""), "before": b, "now": n})
    return rows


SHOW = ["backend", "K/V read by kernel MiB", "dK/dV written MiB", "repeat/reduce copies MiB",
        "total K/V traffic MiB", "ratio", "note"]
NOTES = {"cudnn": "new backend (issue 23)",
         "sdpa_efficient": "still repeated: its backward gives dK/dV per query head",
         "flash": "took grouped heads before too", "flex": "took grouped heads before too (enable_gqa)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench attention", description=__doc__.splitlines()[0])
    ap.add_argument("--sq", type=int, default=4096, help="query rows of the block")
    ap.add_argument("--sk", type=int, default=4096, help="key rows of the block")
    ap.add_argument("--heads", type=int, default=32, help="query heads (LLaMA-3-8B: 32)")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads (LLaMA-3-8B: 8)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--non-causal", action="store_true", help="a full block instead of a causal one")
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/attention.json)")
    a = ap.parse_args(argv)
    rows = bench(a.sq, a.sk, a.heads, a.kv_heads, a.head_dim, DTYPES[a.dtype], not a.non_causal)
    print(f"one {a.sq} x {a.sk} {'full' if a.non_causal else 'causal'} block, {a.heads}/{a.kv_heads} heads, "
          f"head_dim {a.head_dim}, {a.dtype}, forward + backward; before -> now (meta device, bytes recorded)")
    print_table(rows, SHOW)
    write_json("attention", {"rows": rows, "args": vars(a)}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
