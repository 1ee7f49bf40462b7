"""Lightning attention in Triton: forward and backward, fp32 state.

Same blocked algorithm and factor conventions as chunk.py (see its docstring):
  _state_fwd   inter-block sweep: the state entering every block, fp32 [BH, n+1, Dk, Dv]
               (the last entry is the final state); one program per (b, h, Dk tile, Dv tile)
  _out_fwd     intra-block parallel: O = (Q K^T * M) V + diag(qs) Q KV_i; one program per block
  _state_bwd   reverse sweep of the state gradient: dKV_(i+1) for every block, and dS0
  _grads_bwd   intra-block parallel: dq, dk, dv of one block from its KV_i and dKV_(i+1)
Loads are cast to fp32 (bf16 tl.dot is wrong in the interpreter); fp32 inputs use
exact ("ieee") dots, fp16/bf16 inputs use tf32 dots. @triton.autotune is only
applied when compiling for a GPU: it does not work under TRITON_INTERPRET=1.
Importing this module imports triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunk import DEFAULT_BLOCK, doc_ids

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune(key: list[str]):
    def wrap(fn):
        if INTERPRET:
            return fn
        # two configs, not six: each costs a compile per kernel and flag set on first use (six took
        # 180 s before the first fp32 step on an H200; make gpu-check), none spilled
        configs = [triton.Config({}, num_warps=4, num_stages=1), triton.Config({}, num_warps=8, num_stages=2)]
        return triton.autotune(configs=configs, key=key)(fn)
    return wrap


@triton.jit
def _factors(DOC, s, t0, S, C: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Decay factors of the block starting at t0: mask [C, C], qs [C], ks [C], bd (scalar)."""
    a = tl.arange(0, C)
    L = tl.minimum(S - t0, C)
    af = a.to(tl.float32)
    qs = tl.exp(-s * (af + 1.0))
    kexp = (L - 1 - a).to(tl.float32)
    ks = tl.where(a < L, tl.exp(-s * tl.maximum(kexp, 0.0)), 0.0)
    bd = tl.exp(-s * L.to(tl.float32))
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


@_autotune(key=["Dk", "Dv", "C", "BK", "BV"])
@triton.jit
def _state_fwd(K, V, S0, STATES, DECAY, DOC, S, H, n_blocks,
               Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, HAS_S0: tl.constexpr, HAS_DOCS: tl.constexpr,
               PREC: tl.constexpr):
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
    if HAS_S0:
        kv = tl.load(S0 + bh * Dk * Dv + st_off, mask=st_mask, other=0.0).to(tl.float32)
    else:
        kv = tl.zeros([BK, BV], dtype=tl.float32)
    st_base = STATES + bh.to(tl.int64) * (n_blocks + 1) * Dk * Dv
    for i in range(0, n_blocks):
        t0 = i * C
        tl.store(st_base + i * Dk * Dv + st_off, kv, mask=st_mask)
        _m, _qs, ks, bd = _factors(DOC, s, t0, S, C, HAS_DOCS)
        rows = (b * S + t0 + rc).to(tl.int64) * H + h
        rmask = (t0 + rc) < S
        k = tl.load(K + rows[:, None] * Dk + rk[None, :],
                    mask=rmask[:, None] & (rk[None, :] < Dk), other=0.0).to(tl.float32)
        v = tl.load(V + rows[:, None] * Dv + rv[None, :],
                    mask=rmask[:, None] & (rv[None, :] < Dv), other=0.0).to(tl.float32)
        kv = kv * bd + tl.dot(tl.trans(k * ks[:, None]), v, input_precision=PREC)
    tl.store(st_base + n_blocks * Dk * Dv + st_off, kv, mask=st_mask)


@_autotune(key=["Dk", "Dv", "C", "BDK", "BV"])
@triton.jit
def _out_fwd(Q, K, V, STATES, O, DECAY, DOC, S, H, n_blocks,
             Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BDK: tl.constexpr,
             BV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    t0 = i * C
    rc = tl.arange(0, C)
    rk = tl.arange(0, BDK)
    rv = iv * BV + tl.arange(0, BV)
    mask, qs, _ks, _bd = _factors(DOC, s, t0, S, C, HAS_DOCS)
    rows = (b * S + t0 + rc).to(tl.int64) * H + h
    rmask = (t0 + rc) < S
    kmask = rmask[:, None] & (rk[None, :] < Dk)
    vmask = rmask[:, None] & (rv[None, :] < Dv)
    q = tl.load(Q + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(K + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(V + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
    st = STATES + (bh.to(tl.int64) * (n_blocks + 1) + i) * Dk * Dv
    kv = tl.load(st + rk[:, None] * Dv + rv[None, :],
                 mask=(rk[:, None] < Dk) & (rv[None, :] < Dv), other=0.0)
    a = tl.dot(q, tl.trans(k), input_precision=PREC) * mask
    o = tl.dot(q, kv, input_precision=PREC) * qs[:, None]
    o += tl.dot(a, v, input_precision=PREC)
    tl.store(O + rows[:, None] * Dv + rv[None, :], o.to(O.dtype.element_ty), mask=vmask)


@_autotune(key=["Dk", "Dv", "C", "BK", "BV"])
@triton.jit
def _state_bwd(Q, DO, DSN, GN, DS0, DECAY, DOC, S, H, n_blocks,
               Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, HAS_DSN: tl.constexpr, HAS_DS0: tl.constexpr,
               HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
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
    if HAS_DSN:
        g = tl.load(DSN + bh * Dk * Dv + st_off, mask=st_mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BK, BV], dtype=tl.float32)
    gn_base = GN + bh.to(tl.int64) * n_blocks * Dk * Dv
    for j in range(0, n_blocks):
        i = n_blocks - 1 - j
        t0 = i * C
        tl.store(gn_base + i * Dk * Dv + st_off, g, mask=st_mask)
        _m, qs, _ks, bd = _factors(DOC, s, t0, S, C, HAS_DOCS)
        rows = (b * S + t0 + rc).to(tl.int64) * H + h
        rmask = (t0 + rc) < S
        q = tl.load(Q + rows[:, None] * Dk + rk[None, :],
                    mask=rmask[:, None] & (rk[None, :] < Dk), other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * Dv + rv[None, :],
                     mask=rmask[:, None] & (rv[None, :] < Dv), other=0.0).to(tl.float32)
        g = g * bd + tl.dot(tl.trans(q * qs[:, None]), do, input_precision=PREC)
    if HAS_DS0:
        tl.store(DS0 + bh * Dk * Dv + st_off, g, mask=st_mask)


@_autotune(key=["Dk", "Dv", "C", "BDK", "BDV"])
@triton.jit
def _grads_bwd(Q, K, V, DO, STATES, GN, DQ, DK, DV, DECAY, DOC, S, H, n_blocks,
               Dk: tl.constexpr, Dv: tl.constexpr, C: tl.constexpr, BDK: tl.constexpr,
               BDV: tl.constexpr, HAS_DOCS: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.load(DECAY + h)
    t0 = i * C
    rc = tl.arange(0, C)
    rk = tl.arange(0, BDK)
    rv = tl.arange(0, BDV)
    mask, qs, ks, _bd = _factors(DOC, s, t0, S, C, HAS_DOCS)
    rows = (b * S + t0 + rc).to(tl.int64) * H + h
    rmask = (t0 + rc) < S
    kmask = rmask[:, None] & (rk[None, :] < Dk)
    vmask = rmask[:, None] & (rv[None, :] < Dv)
    q = tl.load(Q + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(K + rows[:, None] * Dk + rk[None, :], mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(V + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * Dv + rv[None, :], mask=vmask, other=0.0).to(tl.float32)
    smask = (rk[:, None] < Dk) & (rv[None, :] < Dv)
    soff = rk[:, None] * Dv + rv[None, :]
    kv = tl.load(STATES + (bh.to(tl.int64) * (n_blocks + 1) + i) * Dk * Dv + soff,
                 mask=smask, other=0.0)
    gn = tl.load(GN + (bh.to(tl.int64) * n_blocks + i) * Dk * Dv + soff, mask=smask, other=0.0)
    a = tl.dot(q, tl.trans(k), input_precision=PREC) * mask
    da = tl.dot(do, tl.trans(v), input_precision=PREC) * mask
    dq = tl.dot(do, tl.trans(kv), input_precision=PREC) * qs[:, None]
    dq += tl.dot(da, k, input_precision=PREC)
    dk = tl.dot(v, tl.trans(gn), input_precision=PREC) * ks[:, None]
    dk += tl.dot(tl.trans(da), q, input_precision=PREC)
    dv = tl.dot(k * ks[:, None], gn, input_precision=PREC)
    dv += tl.dot(tl.trans(a), do, input_precision=PREC)
    tl.store(DQ + rows[:, None] * Dk + rk[None, :], dq.to(DQ.dtype.element_ty), mask=kmask)
    tl.store(DK + rows[:, None] * Dk + rk[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + rows[:, None] * Dv + rv[None, :], dv.to(DV.dtype.element_ty), mask=vmask)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _tiles(Dk: int, Dv: int) -> tuple[int, int]:
    # The interpreter runs one program at a time: whole-head tiles keep it fast.
    # Compiled, 64-wide tiles give the sweeps more programs to spread over the SMs.
    if INTERPRET:
        return _pow2(Dk), _pow2(Dv)
    return min(64, _pow2(Dk)), min(64, _pow2(Dv))


class _TritonLightning(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s0, decay, docs, C):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, S, H, Dk = q.shape
        Dv = v.shape[-1]
        n = triton.cdiv(S, C)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        BK, BV = _tiles(Dk, Dv)
        BDK = _pow2(Dk)
        states = torch.empty(B * H, n + 1, Dk, Dv, device=q.device, dtype=torch.float32)
        s0c = s0.contiguous() if s0 is not None else states
        doc = docs if docs is not None else decay
        _state_fwd[(B * H, triton.cdiv(Dk, BK), triton.cdiv(Dv, BV))](
            k, v, s0c, states, decay, doc, S, H, n, Dk=Dk, Dv=Dv, C=C, BK=BK, BV=BV,
            HAS_S0=s0 is not None, HAS_DOCS=docs is not None, PREC=prec)
        out = torch.empty(B, S, H, Dv, device=q.device, dtype=q.dtype)
        _out_fwd[(n, B * H, triton.cdiv(Dv, BV))](
            q, k, v, states, out, decay, doc, S, H, n, Dk=Dk, Dv=Dv, C=C, BDK=BDK, BV=BV,
            HAS_DOCS=docs is not None, PREC=prec)
        ctx.save_for_backward(q, k, v, states, decay, docs)
        ctx.C, ctx.prec, ctx.has_s0, ctx.s0dtype = C, prec, s0 is not None, \
            None if s0 is None else s0.dtype
        ctx.set_materialize_grads(False)
        return out, states[:, n].view(B, H, Dk, Dv).clone()

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, states, decay, docs = ctx.saved_tensors
        C, prec = ctx.C, ctx.prec
        B, S, H, Dk = q.shape
        Dv = v.shape[-1]
        n = states.shape[1] - 1
        BK, BV = _tiles(Dk, Dv)
        do = torch.zeros_like(v) if dout is None else dout.contiguous()
        doc = docs if docs is not None else decay
        gn = torch.empty(B * H, n, Dk, Dv, device=q.device, dtype=torch.float32)
        ds0 = torch.empty(B, H, Dk, Dv, device=q.device, dtype=torch.float32) if ctx.has_s0 \
            else gn
        dsn = dstate.float().contiguous() if dstate is not None else gn
        _state_bwd[(B * H, triton.cdiv(Dk, BK), triton.cdiv(Dv, BV))](
            q, do, dsn, gn, ds0, decay, doc, S, H, n, Dk=Dk, Dv=Dv, C=C, BK=BK, BV=BV,
            HAS_DSN=dstate is not None, HAS_DS0=ctx.has_s0, HAS_DOCS=docs is not None,
            PREC=prec)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _grads_bwd[(n, B * H)](
            q, k, v, do, states, gn, dq, dk, dv, decay, doc, S, H, n, Dk=Dk, Dv=Dv, C=C,
            BDK=_pow2(Dk), BDV=_pow2(Dv), HAS_DOCS=docs is not None, PREC=prec)
        ds0 = ds0.to(ctx.s0dtype) if ctx.has_s0 else None
        return dq, dk, dv, ds0, None, None, None


def triton_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               decay: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                               return_state: bool = False,
                               cu_seqlens: torch.Tensor | None = None,
                               block_size: int | None = None):
    """Triton lightning attention; see `lightning_attention` for the contract.

    block_size must be a power of two >= 16 (default 64). out has q's dtype; state fp32.
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
