"""Lightning attention in Triton: forward and backward, fp32 state.

Same blocked algorithm and factor conventions as chunk.py (see its docstring). Every kernel
works on head-dimension tiles (BK over Dk, BV over Dv; `tile()`), so its registers and
shared memory do not grow with head_dim:
  _state_fwd  inter-block sweep: the state entering every block, fp32 [BH, n+1, Dk, Dv] (the
              last entry is the final state); one program per (b, h, Dk tile, Dv tile)
  _out_fwd    O = (Q K^T * M) V + diag(qs) Q KV_i          one program per (block, b, h)
  _state_bwd  reverse sweep of the state gradient: dKV_(i+1) for every block, and dS0
  _dq_bwd     dq = (dO KV_i^T) * qs + (dO V^T * M) K        one program per (block, b, h)
  _dk_bwd     dk = (V dKV_(i+1)^T) * ks + (V dO^T * M^T) Q  one program per (block, b, h)
  _dv_bwd     dv = diag(ks) K dKV_(i+1) + (K Q^T * M^T) dO  one program per (block, b, h)
The intra-block programs first sum their [C, C] matrix over head tiles, then write the output
one head tile at a time (an inner loop over the other head dimension's tiles). The [C, C]
matrices are built in the orientation they are used in (no transposed accumulators), so each
backward kernel holds one of them; dA is computed twice (for dq and, transposed, for dk):
10 matmuls in the backward instead of 9.
Until issue 24 one `_grads_bwd` kernel held whole [C, D] tiles and both [D, D] states: 352 KiB
of shared memory at head_dim 128, more than any GPU has.

Loads are cast to fp32 (bf16 tl.dot is wrong in the interpreter). fp32 inputs use 3-pass tf32
dots ("tf32x3", about fp32 accuracy on tensor cores): exact "ieee" dots run on the FMA units,
spilled at 64-wide tiles, and one such kernel took over 10 minutes to compile on a 2-core box.
fp16/bf16 inputs use tf32 dots. @triton.autotune is only applied when compiling for a GPU (it
does not work under TRITON_INTERPRET=1); on the first call its configs are pruned by
`resource_problems` on the device, the same check `longtrain bench kernels` applies ahead of
time for sm_80/sm_90. Importing this module imports triton.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import triton
import triton.language as tl

from .chunk import DEFAULT_BLOCK, doc_ids

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_TILE: int | None = 64 if INTERPRET else None   # see tile()

# Autotune configs per kernel (the bench compiles every one of them for each target).
# Two, not six: each costs a compile per flag set on the first call (six took 180 s before
# the first fp32 step on an H200; docs/gpu.md).
CONFIGS: dict[str, list[tuple[int, int]]] = {   # kernel -> [(num_warps, num_stages)]
    "_state_fwd": [(4, 1), (8, 2)],
    "_out_fwd": [(4, 1), (8, 2)],
    "_state_bwd": [(4, 1), (8, 2)],
    "_dq_bwd": [(4, 1), (8, 2)],
    "_dk_bwd": [(4, 1), (8, 2)],
    "_dv_bwd": [(4, 1), (8, 2)],
}

# ------------------------------------------------------------------ resource check (one rule)


@dataclass(frozen=True)
class Limits:
    """Per-block limits of a CUDA target."""
    shared: int                  # bytes of shared memory one block may use (opt-in maximum)
    regs_per_block: int = 65536  # 32-bit registers per block
    regs_per_thread: int = 255


# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": maximum
# shared memory per thread block. sm_80 A100: 163 KiB; sm_86/89 (RTX 30/40, L4, L40): 99 KiB;
# sm_90 H100/H200 and sm_100 B200: 227 KiB; sm_120 (RTX 50): 99 KiB.
TARGET_LIMITS: dict[int, Limits] = {
    80: Limits(163 * 1024), 86: Limits(99 * 1024), 87: Limits(163 * 1024), 89: Limits(99 * 1024),
    90: Limits(227 * 1024), 100: Limits(227 * 1024), 120: Limits(99 * 1024),
}


def resource_problems(shared: int, regs: int | None, spills: int | None, num_warps: int,
                      limits: Limits) -> list[str]:
    """Why a compiled kernel cannot launch or should not be used (empty: fine).

    Used by the autotune pruning at run time and by `longtrain bench kernels` ahead of time.
    """
    out = []
    if shared > limits.shared:
        out.append(f"shared {shared / 1024:.0f} KiB > {limits.shared / 1024:.0f} KiB")
    if regs is not None and (regs > limits.regs_per_thread
                             or regs * 32 * num_warps > limits.regs_per_block):
        out.append(f"registers {regs} x {32 * num_warps} threads > {limits.regs_per_block}")
    if spills:
        out.append(f"spills {spills}")
    return out


def _hard(problems: list[str]) -> bool:
    """A problem that stops the launch (spills only slow a kernel down)."""
    return any(not p.startswith("spills") for p in problems)


@functools.lru_cache(maxsize=None)
def _device_limits(device: int) -> Limits:
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    return Limits(shared=int(props["max_shared_mem"]),
                  regs_per_block=int(props.get("max_num_regs", 65536)))


def _current_limits() -> Limits:
    return _device_limits(triton.runtime.driver.active.get_current_device())


PRUNED: list[dict[str, Any]] = []   # what the run-time pruning dropped (gpu-check reports it)


def _prune_configs(jit, configs, named_args, **kwargs):
    """early_config_prune: compile each config for this GPU (the kernel stays in the JIT's
    cache, so the autotuner does not compile it again) and keep those `resource_problems`
    accepts; if none, those that at least launch (spills only); never an empty list."""
    from triton.runtime.errors import OutOfResources

    limits = _current_limits()
    ok, launchable, dropped = [], [], []
    for cfg in configs:
        try:
            kern = jit.warmup(**named_args, **kwargs, **cfg.all_kwargs(), grid=(1,))
            kern._init_handles()
            problems = resource_problems(kern.metadata.shared, kern.n_regs, kern.n_spills,
                                         cfg.num_warps, limits)
        except OutOfResources as e:
            problems = [str(e)]
        except Exception as e:  # noqa: BLE001 - another triton's API: let the autotuner decide
            PRUNED.append({"kernel": jit.__name__, "config": str(cfg),
                           "problems": [f"not checked: {type(e).__name__}: {e}"[:200]]})
            problems = []
        if not problems:
            ok.append(cfg)
        elif not _hard(problems):
            launchable.append(cfg)
        if problems:
            dropped.append({"kernel": jit.__name__, "config": str(cfg), "problems": problems})
    PRUNED.extend(dropped)
    keep = ok or launchable or configs[:1]
    if not ok:
        warnings.warn(f"lightning Triton kernel {jit.__name__}: no autotune config fits this GPU "
                      f"without problems ({dropped}); using {keep[0]}", stacklevel=2)
    return keep


def _autotune(name: str, key: list[str]):
    def wrap(fn):
        if INTERPRET:
            return fn
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in CONFIGS[name]]
        return triton.autotune(configs=configs, key=key,
                               prune_configs_by={"early_config_prune":
                                                 functools.partial(_prune_configs, fn)})(fn)
    return wrap


_KEY = ["Dk", "Dv", "C", "BK", "BV", "HAS_DOCS", "PREC"]
_FLAGS = ["has_s0", "has_dsn", "has_ds0"]   # run-time flags: not a compile per flag set

# ------------------------------------------------------------------ kernels


@triton.jit
def _factors(DOC, s, t0, S, C: tl.constexpr, HAS_DOCS: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Decay factors of the block starting at t0: mask [C, C] (its transpose with TRANSPOSE),
    qs [C], ks [C], bd (scalar)."""
    a = tl.arange(0, C)
    L = tl.minimum(S - t0, C)
    af = a.to(tl.float32)
    qs = tl.exp(-s * (af + 1.0))
    kexp = (L - 1 - a).to(tl.float32)
    ks = tl.where(a < L, tl.exp(-s * tl.maximum(kexp, 0.0)), 0.0)
    bd = tl.exp(-s * L.to(tl.float32))
    if TRANSPOSE:
        diff = af[None, :] - af[:, None]
    else:
        diff = af[:, None] - af[None, :]
    mask = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
    if HAS_DOCS:
        d = tl.load(DOC + t0 + a, mask=a < L, other=-1)
        dprev = tl.load(DOC + tl.maximum(t0 - 1, 0))
        dend = tl.load(DOC + t0 + L - 1)
        mask = tl.where(d[:, None] == d[None, :], mask, 0.0)
        qs = tl.where(d == dprev, qs, 0.0)
        ks = tl.where(d == dend, ks, 0.0)
        bd = tl.where(dend == dprev, bd, 0.0)
    return mask, qs, ks, bd


@_autotune("_state_fwd", _KEY)
@triton.jit(do_not_specialize=_FLAGS)
def _state_fwd(K, V, S0, STATES, DECAY, DOC, S, H, n_blocks, has_s0,
               Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    ik = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    st_off = rk[:, None] * Dv + rv[None, :]
    st_mask = (rk[:, None] < Dk) & (rv[None, :] < Dv)
    kv = tl.zeros([BK, BV], dtype=tl.float32)
    if has_s0:
        kv = tl.load(S0 + bh * Dk * Dv + st_off, mask=st_mask, other=0.0).to(tl.float32)
    st_base = STATES + bh.to(tl.int64) * (n_blocks + 1) * Dk * Dv
    for i in range(0, n_blocks):
        t0 = i * C
        tl.store(st_base + i * Dk * Dv + st_off, kv, mask=st_mask)
        _m, _qs, ks, bd = _factors(DOC, s, t0, S, C, HAS_DOCS, False)
        rows = (b * S + t0 + rc).to(tl.int64) * H + h
        rmask = (t0 + rc) < S
        k = tl.load(K + rows[:, None] * Dk + rk[None, :],
                    mask=rmask[:, None] & (rk[None, :] < Dk), other=0.0).to(tl.float32)
        v = tl.load(V + rows[:, None] * Dv + rv[None, :],
                    mask=rmask[:, None] & (rv[None, :] < Dv), other=0.0).to(tl.float32)
        kv = kv * bd + tl.dot(tl.trans(k * ks[:, None]), v, input_precision=PREC)
    tl.store(st_base + n_blocks * Dk * Dv + st_off, kv, mask=st_mask)


@_autotune("_out_fwd", _KEY)
@triton.jit
def _out_fwd(Q, K, V, STATES, O, DECAY, DOC, S, H, n_blocks,
             Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    """O = (Q K^T * M) V + diag(qs) Q KV_i for one block: A once (summed over Dk tiles),
    then one [C, BV] output tile at a time."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    t0 = i * C
    rc = tl.arange(0, C)
    rows = (b * S + t0 + rc).to(tl.int64) * H + h
    rmask = (t0 + rc) < S
    st = STATES + (bh.to(tl.int64) * (n_blocks + 1) + i) * Dk * Dv
    a = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, Dk, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rmask[:, None] & (rk[None, :] < Dk)
        q = tl.load(Q + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
        k = tl.load(K + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
        a += tl.dot(q, tl.trans(k), input_precision=PREC)
    mask, qs, _ks, _bd = _factors(DOC, s, t0, S, C, HAS_DOCS, False)
    a = a * mask
    for v0 in range(0, Dv, BV):
        rv = v0 + tl.arange(0, BV)
        o = tl.zeros([C, BV], dtype=tl.float32)
        for k0 in range(0, Dk, BK):
            rk = k0 + tl.arange(0, BK)
            q = tl.load(Q + rows[:, None] * Dk + rk[None, :],
                        mask=rmask[:, None] & (rk[None, :] < Dk), other=0.0).to(tl.float32)
            kv = tl.load(st + rk[:, None] * Dv + rv[None, :],
                         mask=(rk[:, None] < Dk) & (rv[None, :] < Dv), other=0.0)
            o += tl.dot(q, kv, input_precision=PREC)
        vmask = rmask[:, None] & (rv[None, :] < Dv)
        v = tl.load(V + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
        o = o * qs[:, None] + tl.dot(a, v, input_precision=PREC)
        tl.store(O + rows[:, None] * Dv + rv[None, :], o.to(O.dtype.element_ty), mask=vmask)


@_autotune("_state_bwd", _KEY)
@triton.jit(do_not_specialize=_FLAGS)
def _state_bwd(Q, DO, DSN, GN, DS0, DECAY, DOC, S, H, n_blocks, has_dsn, has_ds0,
               Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    ik = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    rc = tl.arange(0, C)
    st_off = rk[:, None] * Dv + rv[None, :]
    st_mask = (rk[:, None] < Dk) & (rv[None, :] < Dv)
    g = tl.zeros([BK, BV], dtype=tl.float32)
    if has_dsn:
        g = tl.load(DSN + bh * Dk * Dv + st_off, mask=st_mask, other=0.0).to(tl.float32)
    gn_base = GN + bh.to(tl.int64) * n_blocks * Dk * Dv
    for j in range(0, n_blocks):
        i = n_blocks - 1 - j
        t0 = i * C
        tl.store(gn_base + i * Dk * Dv + st_off, g, mask=st_mask)
        _m, qs, _ks, bd = _factors(DOC, s, t0, S, C, HAS_DOCS, False)
        rows = (b * S + t0 + rc).to(tl.int64) * H + h
        rmask = (t0 + rc) < S
        q = tl.load(Q + rows[:, None] * Dk + rk[None, :],
                    mask=rmask[:, None] & (rk[None, :] < Dk), other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * Dv + rv[None, :],
                     mask=rmask[:, None] & (rv[None, :] < Dv), other=0.0).to(tl.float32)
        g = g * bd + tl.dot(tl.trans(q * qs[:, None]), do, input_precision=PREC)
    if has_ds0:
        tl.store(DS0 + bh * Dk * Dv + st_off, g, mask=st_mask)


@_autotune("_dq_bwd", _KEY)
@triton.jit
def _dq_bwd(K, V, DO, STATES, DQ, DECAY, DOC, S, H, n_blocks,
            Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
            BV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    """For one block: dA = dO V^T * M once (summed over Dv tiles), then per Dk tile
    dq = (dO KV_i^T) * qs + dA K."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    t0 = i * C
    rc = tl.arange(0, C)
    rows = (b * S + t0 + rc).to(tl.int64) * H + h
    rmask = (t0 + rc) < S
    kv_base = STATES + (bh.to(tl.int64) * (n_blocks + 1) + i) * Dk * Dv
    da = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, Dv, BV):
        rv = v0 + tl.arange(0, BV)
        vmask = rmask[:, None] & (rv[None, :] < Dv)
        v = tl.load(V + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
        da += tl.dot(do, tl.trans(v), input_precision=PREC)
    mask, qs, _ks, _bd = _factors(DOC, s, t0, S, C, HAS_DOCS, False)
    da = da * mask
    for k0 in range(0, Dk, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rmask[:, None] & (rk[None, :] < Dk)
        dq = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, Dv, BV):
            rv = v0 + tl.arange(0, BV)
            do = tl.load(DO + rows[:, None] * Dv + rv[None, :],
                         mask=rmask[:, None] & (rv[None, :] < Dv), other=0.0).to(tl.float32)
            kv = tl.load(kv_base + rk[:, None] * Dv + rv[None, :],
                         mask=(rk[:, None] < Dk) & (rv[None, :] < Dv), other=0.0)
            dq += tl.dot(do, tl.trans(kv), input_precision=PREC)
        k = tl.load(K + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
        dq = dq * qs[:, None] + tl.dot(da, k, input_precision=PREC)
        tl.store(DQ + rows[:, None] * Dk + rk[None, :], dq.to(DQ.dtype.element_ty), mask=kmask)


@_autotune("_dk_bwd", _KEY)
@triton.jit
def _dk_bwd(Q, V, DO, GN, DK, DECAY, DOC, S, H, n_blocks,
            Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
            BV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    """For one block: dA^T = V dO^T * M^T once (summed over Dv tiles), then per Dk tile
    dk = (V dKV_(i+1)^T) * ks + dA^T Q."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    t0 = i * C
    rc = tl.arange(0, C)
    rows = (b * S + t0 + rc).to(tl.int64) * H + h
    rmask = (t0 + rc) < S
    gn_base = GN + (bh.to(tl.int64) * n_blocks + i) * Dk * Dv
    dat = tl.zeros([C, C], dtype=tl.float32)
    for v0 in range(0, Dv, BV):
        rv = v0 + tl.arange(0, BV)
        vmask = rmask[:, None] & (rv[None, :] < Dv)
        v = tl.load(V + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
        dat += tl.dot(v, tl.trans(do), input_precision=PREC)
    mask_t, _qs, ks, _bd = _factors(DOC, s, t0, S, C, HAS_DOCS, True)
    dat = dat * mask_t
    for k0 in range(0, Dk, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rmask[:, None] & (rk[None, :] < Dk)
        dk = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, Dv, BV):
            rv = v0 + tl.arange(0, BV)
            v = tl.load(V + rows[:, None] * Dv + rv[None, :],
                        mask=rmask[:, None] & (rv[None, :] < Dv), other=0.0).to(tl.float32)
            gn = tl.load(gn_base + rk[:, None] * Dv + rv[None, :],
                         mask=(rk[:, None] < Dk) & (rv[None, :] < Dv), other=0.0)
            dk += tl.dot(v, tl.trans(gn), input_precision=PREC)
        q = tl.load(Q + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
        dk = dk * ks[:, None] + tl.dot(dat, q, input_precision=PREC)
        tl.store(DK + rows[:, None] * Dk + rk[None, :], dk.to(DK.dtype.element_ty), mask=kmask)


@_autotune("_dv_bwd", _KEY)
@triton.jit
def _dv_bwd(Q, K, DO, GN, DV, DECAY, DOC, S, H, n_blocks,
            Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
            BV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    """For one block: A^T = K Q^T * M^T once (summed over Dk tiles), then per Dv tile
    dv = diag(ks) K dKV_(i+1) + A^T dO."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    t0 = i * C
    rc = tl.arange(0, C)
    rows = (b * S + t0 + rc).to(tl.int64) * H + h
    rmask = (t0 + rc) < S
    gn_base = GN + (bh.to(tl.int64) * n_blocks + i) * Dk * Dv
    at = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, Dk, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rmask[:, None] & (rk[None, :] < Dk)
        q = tl.load(Q + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
        k = tl.load(K + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
        at += tl.dot(k, tl.trans(q), input_precision=PREC)
    mask_t, _qs, ks, _bd = _factors(DOC, s, t0, S, C, HAS_DOCS, True)
    at = at * mask_t
    for v0 in range(0, Dv, BV):
        rv = v0 + tl.arange(0, BV)
        dv = tl.zeros([C, BV], dtype=tl.float32)
        for k0 in range(0, Dk, BK):
            rk = k0 + tl.arange(0, BK)
            k = tl.load(K + rows[:, None] * Dk + rk[None, :],
                        mask=rmask[:, None] & (rk[None, :] < Dk), other=0.0).to(tl.float32)
            gn = tl.load(gn_base + rk[:, None] * Dv + rv[None, :],
                         mask=(rk[:, None] < Dk) & (rv[None, :] < Dv), other=0.0)
            dv += tl.dot(k * ks[:, None], gn, input_precision=PREC)
        vmask = rmask[:, None] & (rv[None, :] < Dv)
        do = tl.load(DO + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
        dv += tl.dot(at, do, input_precision=PREC)
        tl.store(DV + rows[:, None] * Dv + rv[None, :], dv.to(DV.dtype.element_ty), mask=vmask)


KERNELS = {"_state_fwd": _state_fwd, "_out_fwd": _out_fwd, "_state_bwd": _state_bwd,
           "_dq_bwd": _dq_bwd, "_dk_bwd": _dk_bwd, "_dv_bwd": _dv_bwd}

# ------------------------------------------------------------------ launch parameters (one place)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def tile(dtype: torch.dtype) -> int:
    """Head-dimension tile (BK = BV) of every kernel for this input dtype.

    Chosen by `longtrain bench kernels` (docs/lightning.md): with 3-pass tf32 dots an fp32
    tile needs about three times the registers of a half-precision one; at 32 (fp32) or 64
    (half) some kernels spilled on sm_80. The interpreter uses INTERPRET_TILE (fewer, larger
    programs keep the CPU tests fast); set it to None to run the compiled tiles.
    """
    if INTERPRET_TILE is not None:
        return INTERPRET_TILE
    return 16 if dtype == torch.float32 else 32


def meta(Dk: int, Dv: int, C: int, dtype: torch.dtype, has_docs: bool) -> dict[str, Any]:
    """The constexpr arguments every kernel gets: the launches below and the AOT bench use this."""
    t = tile(dtype)
    return dict(Dk=Dk, Dv=Dv, C=C, BK=min(t, _pow2(Dk)), BV=min(t, _pow2(Dv)),
                HAS_DOCS=has_docs, PREC="tf32x3" if dtype == torch.float32 else "tf32")


_PTR = {"Q": "io", "K": "io", "V": "io", "DO": "io", "O": "io", "DQ": "io", "DK": "io",
        "DV": "io", "DOC": "doc"}   # every other pointer is fp32; S, H, n_blocks, flags are i32


def signature(name: str, dtype: torch.dtype, has_docs: bool) -> dict[str, str]:
    """Triton signature of kernel `name` as the launches below call it (for AOT compiles)."""
    io = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    jit = _jit(KERNELS[name])
    m = meta(64, 64, 64, dtype, has_docs)
    sig = {}
    for arg in jit.arg_names:
        kind = _PTR.get(arg)
        if arg in m:
            sig[arg] = "constexpr"
        elif kind == "io":
            sig[arg] = io
        elif kind == "doc":
            sig[arg] = "*i32" if has_docs else "*fp32"   # without documents DOC is the decay
        elif arg in ("S", "H", "n_blocks") or arg in _FLAGS:
            sig[arg] = "i32"
        else:
            sig[arg] = "*fp32"
    return sig


def _jit(kernel):
    return getattr(kernel, "fn", kernel)   # Autotuner -> JITFunction


def aot_variants(head_dims=(64, 128), dtypes=(torch.float32, torch.bfloat16),
                 block_size: int = DEFAULT_BLOCK) -> Iterator[dict[str, Any]]:
    """Every (kernel, constexprs, autotune config) the dispatch can launch for these head dims
    and dtypes (Dk = Dv = head_dim; documents on and off; state flags are run-time arguments)."""
    for D in head_dims:
        for dtype in dtypes:
            for docs in (False, True):
                for name, kernel in KERNELS.items():
                    for warps, stages in CONFIGS[name]:
                        yield {"kernel": name, "fn": _jit(kernel), "head_dim": D,
                               "dtype": str(dtype).replace("torch.", ""), "docs": docs,
                               "signature": signature(name, dtype, docs),
                               "constexprs": meta(D, D, block_size, dtype, docs),
                               "num_warps": warps, "num_stages": stages}

# ------------------------------------------------------------------ autograd


class _TritonLightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s0, decay, docs, C):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, S, H, Dk = q.shape
        Dv = v.shape[-1]
        n = triton.cdiv(S, C)
        m = meta(Dk, Dv, C, q.dtype, docs is not None)
        nk, nv = triton.cdiv(Dk, m["BK"]), triton.cdiv(Dv, m["BV"])
        states = torch.empty(B * H, n + 1, Dk, Dv, device=q.device, dtype=torch.float32)
        s0c = s0.contiguous() if s0 is not None else states
        doc = docs if docs is not None else decay
        _state_fwd[(B * H, nk, nv)](k, v, s0c, states, decay, doc, S, H, n, int(s0 is not None),
                                    **m)
        out = torch.empty(B, S, H, Dv, device=q.device, dtype=q.dtype)
        _out_fwd[(n, B * H)](q, k, v, states, out, decay, doc, S, H, n, **m)
        ctx.save_for_backward(q, k, v, states, decay, docs)
        ctx.C, ctx.has_s0 = C, s0 is not None
        ctx.s0dtype = None if s0 is None else s0.dtype
        ctx.set_materialize_grads(False)
        return out, states[:, n].view(B, H, Dk, Dv).clone()

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, states, decay, docs = ctx.saved_tensors
        C = ctx.C
        B, S, H, Dk = q.shape
        Dv = v.shape[-1]
        n = states.shape[1] - 1
        m = meta(Dk, Dv, C, q.dtype, docs is not None)
        nk, nv = triton.cdiv(Dk, m["BK"]), triton.cdiv(Dv, m["BV"])
        do = torch.zeros_like(v) if dout is None else dout.contiguous()
        doc = docs if docs is not None else decay
        gn = torch.empty(B * H, n, Dk, Dv, device=q.device, dtype=torch.float32)
        ds0 = torch.empty(B, H, Dk, Dv, device=q.device, dtype=torch.float32) if ctx.has_s0 \
            else gn
        dsn = dstate.float().contiguous() if dstate is not None else gn
        _state_bwd[(B * H, nk, nv)](q, do, dsn, gn, ds0, decay, doc, S, H, n,
                                    int(dstate is not None), int(ctx.has_s0), **m)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _dq_bwd[(n, B * H)](k, v, do, states, dq, decay, doc, S, H, n, **m)
        _dk_bwd[(n, B * H)](q, v, do, gn, dk, decay, doc, S, H, n, **m)
        _dv_bwd[(n, B * H)](q, k, do, gn, dv, decay, doc, S, H, n, **m)
        ds0 = ds0.to(ctx.s0dtype) if ctx.has_s0 else None
        return dq, dk, dv, ds0, None, None, None


def triton_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               decay: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                               return_state: bool = False,
                               cu_seqlens=None, block_size: int | None = None):
    """Triton lightning attention; see `lightning_attention` for the contract.

    block_size must be a power of two >= 16 (default 64; at 128 the [C, C] matrices spill
    registers on sm_80 and sm_90: `longtrain bench kernels --block-size 128`). out has q's
    dtype; state fp32.
    """
    B, S, H, Dk = q.shape
    C = block_size or DEFAULT_BLOCK
    if C < 16 or C & (C - 1):
        raise ValueError(f"triton block_size must be a power of two >= 16, got {C}")
    docs = doc_ids(cu_seqlens, S, q.device)
    if docs is not None:
        docs = docs.to(torch.int32)
    dec = decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
    s0 = None if initial_state is None else initial_state.float()
    out, state = _TritonLightning.apply(q, k, v, s0, dec, docs, C)
    return (out, state) if return_state else out
