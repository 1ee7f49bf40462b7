"""Blocked lightning attention in plain torch: the CPU path (and the twin of triton.py).

The sequence is cut into blocks of C tokens. Per block i (positions t0..t0+C-1,
local index a, b) and head h with lambda = exp(-s_h):
    A      = (Q K^T) * M               M[a, b] = lambda^(a-b) for a >= b, same document
    O      = A V + diag(qs) Q KV_i     qs[a] = lambda^(a+1) if no document starts in t0..t0+a
    KV_i+1 = bd KV_i + K^T diag(ks) V  ks[b] = lambda^(L-1-b) for the block's last document
                                       bd = lambda^L if no document starts in the block
(L = number of real tokens in the block: only the last block may be short.)
Intra-block work is one batched matmul over all blocks at once; only the D x D
state sweep is a Python loop, one fused op per block. The backward is written
by hand in the same shape: batched intra-block products, a reverse sweep of the
state gradient, and batched inter-block products; autograd through a Python loop
of slices would be quadratic.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Sequence

import torch

from longtrain.kernels.documents import as_doc_bounds

DEFAULT_BLOCK = 64
DEFAULT_SEGMENT = 1024   # tokens per cache-sized segment of the torch path


def doc_ids(cu_seqlens: torch.Tensor | Sequence[int] | None, seq_len: int,
            device: torch.device) -> torch.Tensor | None:
    """Document index of every position [S] (int64), or None without cu_seqlens (or one document).

    Host bounds (a DocBounds, as the trainer hands them, or a sequence of ints) are checked on
    the host and reach the device as the DocBounds' one cached copy: no host sync. A tensor is
    read back to the host first (one sync per call: fine in tests and tools, not in a model).
    """
    if cu_seqlens is None:
        return None
    b = as_doc_bounds(cu_seqlens)
    if b.total != seq_len:
        raise ValueError(f"cu_seqlens must run from 0 to S={seq_len}, got {b[0]}..{b.total}")
    if len(b) == 2:
        return None
    pos = torch.arange(seq_len, device=device)
    return torch.searchsorted(b.on(device)[1:-1], pos, right=True)


class BlockFactors(NamedTuple):
    """Decay factors in the blocked layout [n, 1, H, ...] (broadcast over batch)."""
    mask: torch.Tensor   # [1 or n, 1, H, C, C]  intra-block decay mask
    qs: torch.Tensor     # [1 or n, 1, H, C, 1]  decay from the incoming state to each query
    ks: torch.Tensor     # [n, 1, H, C, 1]       decay from each key to the outgoing state
    bd: torch.Tensor     # [n, 1, H, 1, 1]       decay of the state across the whole block


def block_factors(decay: torch.Tensor, seq_len: int, block: int, docs: torch.Tensor | None,
                  dtype: torch.dtype) -> BlockFactors:
    s = decay.detach().to(dtype)
    dev = s.device
    H, C = s.numel(), block
    n = -(-seq_len // C)
    a = torch.arange(C, device=dev, dtype=dtype)
    lens = (seq_len - torch.arange(n, device=dev) * C).clamp(max=C).to(dtype)   # [n]
    diff = a[:, None] - a[None, :]
    mask = torch.exp(-s[:, None, None] * diff.clamp(min=0)) * (diff >= 0)          # [H, C, C]
    qs = torch.exp(-s[:, None] * (a + 1))                                            # [H, C]
    kexp = lens[:, None] - 1 - a                                                     # [n, C]
    ks = torch.exp(-s[None, :, None] * kexp.clamp(min=0)[:, None, :]) * (kexp >= 0)[:, None, :]
    bd = torch.exp(-s[None, :] * lens[:, None])                                      # [n, H]
    if docs is None:
        return BlockFactors(mask.view(1, 1, H, C, C), qs.view(1, 1, H, C, 1),
                            ks.view(n, 1, H, C, 1), bd.view(n, 1, H, 1, 1))
    d = torch.cat([docs, docs[-1:].expand(n * C - seq_len)]).view(n, C)
    starts = torch.arange(n, device=dev) * C
    prev = docs[(starts - 1).clamp(min=0)]                                           # [n]
    end = docs[starts + lens.long() - 1]                                             # [n]
    same = (d[:, :, None] == d[:, None, :]).to(dtype)                                # [n, C, C]
    mask = mask[None] * same[:, None]
    qs = qs[None] * (d == prev[:, None]).to(dtype)[:, None]
    ks = ks * (d == end[:, None]).to(dtype)[:, None]
    bd = bd * (end == prev).to(dtype)[:, None]
    return BlockFactors(mask.view(n, 1, H, C, C), qs.view(n, 1, H, C, 1),
                        ks.view(n, 1, H, C, 1), bd.view(n, 1, H, 1, 1))


def _load_blocks(buf: torch.Tensor, x: torch.Tensor, p0: int, C: int) -> torch.Tensor:
    """buf[:m] = tokens p0 .. p0 + m*C of x [B, S, H, D] as [m, B, H, C, D], zero past S."""
    m = buf.shape[0]
    B, S, H, D = x.shape
    full = min(m, (S - p0) // C)
    if full:
        buf[:full].copy_(x[:, p0:p0 + full * C].reshape(B, full, C, H, D).permute(1, 0, 3, 2, 4))
    if full < m:
        rem = S - p0 - full * C
        buf[full:].zero_()
        buf[full, :, :, :rem].copy_(x[:, p0 + full * C:].permute(0, 2, 1, 3))
    return buf


def _store_blocks(dst: torch.Tensor, p0: int, x: torch.Tensor) -> None:
    """dst[:, p0 : p0 + n*C] = x, for dst [B, >= p0 + n*C, H, D] and x [n, B, H, C, D]."""
    n, B, H, C, D = x.shape
    dst[:, p0:p0 + n * C].view(B, n, C, H, D).permute(1, 0, 3, 2, 4).copy_(x)


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, add: bool = False) -> torch.Tensor:
    """out (+)= a @ b batched over the leading dims (contiguous, or last two dims transposed)."""
    a3, b3, o3 = a.flatten(0, -3), b.flatten(0, -3), out.flatten(0, -3)
    if add:
        o3.baddbmm_(a3, b3)
    else:
        torch.bmm(a3, b3, out=o3)
    return out


def _seg(f: BlockFactors, i0: int, i1: int) -> BlockFactors:
    return BlockFactors(*(t if t.shape[0] == 1 else t[i0:i1] for t in f))


def _block_states(Kb, Vb, g: BlockFactors, first: torch.Tensor, ks_buf, kv_buf,
                  st_buf) -> torch.Tensor:
    """States entering each of the m blocks [m, B, H, Dk, Dv], from the one entering the first.

    Leaves each block's own contribution K^T diag(ks) V in kv_buf (see _last_state)."""
    m = Kb.shape[0]
    kv_local = _bmm(torch.mul(Kb, g.ks, out=ks_buf).transpose(-1, -2), Vb, kv_buf)
    st_buf[0].copy_(first)
    for j in range(m - 1):
        torch.addcmul(kv_local[j], st_buf[j], g.bd[j], out=st_buf[j + 1])
    return st_buf


def _last_state(st: torch.Tensor, kv_local: torch.Tensor, g: BlockFactors) -> torch.Tensor:
    """The state after the last block of the segment."""
    return torch.addcmul(kv_local[-1], st[-1], g.bd[-1])


class _Workspace:
    """Segment-sized buffers, allocated once per call and reused by every segment:
    fresh large allocations page-fault on first touch, which cost as much as the copies."""

    def __init__(self, like: torch.Tensor, seg: int, B: int, H: int, C: int, dims: dict[str, int]):
        self._t = {name: like.new_empty(seg, B, H, r, c) for name, (r, c) in dims.items()}

    def __call__(self, name: str, m: int) -> torch.Tensor:
        return self._t[name][:m]


def _heads(f: BlockFactors, h0: int, h1: int) -> BlockFactors:
    return BlockFactors(*(t[:, :, h0:h1] for t in f))


def _forward_heads(q, k, v, f: BlockFactors, C: int, seg: int, out, seg_states, h0: int,
                   h1: int) -> None:
    """Forward of heads h0..h1-1: writes out[:, :, h0:h1] and seg_states[1:, :, h0:h1]."""
    B, S, _, Dk = q.shape
    Dv, Hg = v.shape[-1], h1 - h0
    q, k, v = q[:, :, h0:h1], k[:, :, h0:h1], v[:, :, h0:h1]
    out, seg_states, f = out[:, :, h0:h1], seg_states[:, :, h0:h1], _heads(f, h0, h1)
    n = -(-S // C)
    ws = _Workspace(seg_states, seg, B, Hg, C,
                    dict(Q=(C, Dk), K=(C, Dk), V=(C, Dv), A=(C, C), KS=(C, Dk),
                         KV=(Dk, Dv), O=(C, Dv), ST=(Dk, Dv)))
    for s in range(seg_states.shape[0] - 1):
        i0, i1 = s * seg, min(n, (s + 1) * seg)
        m, p0 = i1 - i0, i0 * C
        g = _seg(f, i0, i1)
        Qb = _load_blocks(ws("Q", m), q, p0, C)
        Kb = _load_blocks(ws("K", m), k, p0, C)
        Vb = _load_blocks(ws("V", m), v, p0, C)
        st = _block_states(Kb, Vb, g, seg_states[s], ws("KS", m), ws("KV", m), ws("ST", m))
        seg_states[s + 1].copy_(_last_state(st, ws("KV", m), g))
        A = _bmm(Qb, Kb.transpose(-1, -2), ws("A", m)).mul_(g.mask)
        O = _bmm(Qb, st, ws("O", m)).mul_(g.qs)
        _bmm(A, Vb, O, add=True)
        _store_blocks(out, p0, O)


def _backward_heads(q, k, v, dout, dstate, seg_states, f: BlockFactors, C: int, seg: int,
                    dq, dk, dv, ds0, h0: int, h1: int) -> None:
    """Backward of heads h0..h1-1: writes dq, dk, dv [:, :, h0:h1] and ds0[:, h0:h1]."""
    B, S, _, Dk = q.shape
    Dv, Hg = v.shape[-1], h1 - h0
    q, k, v = q[:, :, h0:h1], k[:, :, h0:h1], v[:, :, h0:h1]
    dout = None if dout is None else dout[:, :, h0:h1]
    dq, dk, dv = dq[:, :, h0:h1], dk[:, :, h0:h1], dv[:, :, h0:h1]
    seg_states, f = seg_states[:, :, h0:h1], _heads(f, h0, h1)
    n = -(-S // C)
    ws = _Workspace(seg_states, seg, B, Hg, C,
                    dict(Q=(C, Dk), K=(C, Dk), V=(C, Dv), dO=(C, Dv), A=(C, C), dA=(C, C),
                         KS=(C, Dk), KV=(Dk, Dv), ST=(Dk, Dv), dQ=(C, Dk), L=(Dk, Dv),
                         G=(Dk, Dv), dK=(C, Dk), dV=(C, Dv)))
    G = seg_states.new_zeros(B, Hg, Dk, Dv) if dstate is None else \
        dstate[:, h0:h1].to(seg_states.dtype)
    for s in reversed(range(seg_states.shape[0] - 1)):
        i0, i1 = s * seg, min(n, (s + 1) * seg)
        m, p0 = i1 - i0, i0 * C
        g = _seg(f, i0, i1)
        Qb = _load_blocks(ws("Q", m), q, p0, C)
        Kb = _load_blocks(ws("K", m), k, p0, C)
        Vb = _load_blocks(ws("V", m), v, p0, C)
        if dout is None:
            dO = ws("dO", m).zero_()
        else:
            dO = _load_blocks(ws("dO", m), dout, p0, C)
        # the states entering each block of the segment, rebuilt from the segment's
        # first one: saving them all would cost as much memory traffic as v itself
        st = _block_states(Kb, Vb, g, seg_states[s], ws("KS", m), ws("KV", m), ws("ST", m))
        A = _bmm(Qb, Kb.transpose(-1, -2), ws("A", m)).mul_(g.mask)
        dA = _bmm(dO, Vb.transpose(-1, -2), ws("dA", m)).mul_(g.mask)
        dQ = _bmm(dO, st.transpose(-1, -2), ws("dQ", m)).mul_(g.qs)
        _bmm(dA, Kb, dQ, add=True)
        _store_blocks(dq, p0, dQ)
        local = _bmm(torch.mul(Qb, g.qs, out=ws("KS", m)).transpose(-1, -2), dO,
                     ws("L", m))                                  # dL/dKV_i from block i
        Gn = ws("G", m)                                           # dL/dKV_(i+1)
        Gn[m - 1].copy_(G)
        for j in range(m - 1, 0, -1):
            torch.addcmul(local[j], Gn[j], g.bd[j], out=Gn[j - 1])
        G = torch.addcmul(local[0], Gn[0], g.bd[0])
        dK = _bmm(Vb, Gn.transpose(-1, -2), ws("dK", m)).mul_(g.ks)
        _bmm(dA.transpose(-1, -2), Qb, dK, add=True)
        _store_blocks(dk, p0, dK)
        dV = _bmm(Kb, Gn, ws("dV", m)).mul_(g.ks)
        _bmm(A.transpose(-1, -2), dO, dV, add=True)
        _store_blocks(dv, p0, dV)
    if ds0 is not None:
        ds0[:, h0:h1].copy_(G)


_POOL: ThreadPoolExecutor | None = None


def _run_heads(fn, H: int, threads: int, *args) -> None:
    """fn(*args, h0, h1) over head groups, one per worker thread.

    Each worker runs its ops with ONE intra-op thread: a few big OpenMP regions per
    op on many small ops means thousands of barriers per call, and on a shared
    machine every barrier waits for a descheduled thread (3-6x slower measured at
    load 6 on 2 cores). Independent head groups need no barrier at all.
    """
    global _POOL
    threads = max(1, min(threads, H))
    bounds = [(H * i // threads, H * (i + 1) // threads) for i in range(threads)]
    if threads == 1:
        with torch.no_grad():
            fn(*args, 0, H)
        return
    if _POOL is None or _POOL._max_workers < threads:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lightning")
    outer = torch.get_num_threads()

    def work(h0: int, h1: int) -> None:
        torch.set_num_threads(1)          # this thread's OpenMP team (and MKL, restored below)
        with torch.no_grad():
            fn(*args, h0, h1)

    try:
        for fut in [_POOL.submit(work, h0, h1) for h0, h1 in bounds]:
            fut.result()
    finally:
        torch.set_num_threads(outer)


class _ChunkLightning(torch.autograd.Function):
    # The work runs segment by segment (SEG blocks at a time) with the state
    # carried between segments, so that the temporaries stay in cache: the
    # throughput then does not fall with the sequence length. Only q, k, v (which
    # autograd keeps anyway) and the state entering each segment are saved; the
    # blocked copies, the per-block states and the intra-block scores are rebuilt
    # in the backward, one segment at a time. Head groups run in parallel threads.
    @staticmethod
    def forward(ctx, q, k, v, s0, f: BlockFactors, C: int, seg: int, dt: torch.dtype,
                threads: int):
        B, S, H, Dk = q.shape
        Dv = v.shape[-1]
        n = -(-S // C)
        seg = max(1, min(seg, n))
        n_seg = -(-n // seg)
        out = q.new_empty(B, n * C, H, Dv)                  # padded to whole blocks
        seg_states = q.new_empty(n_seg + 1, B, H, Dk, Dv, dtype=dt)
        if s0 is None:
            seg_states[0].zero_()
        else:
            seg_states[0].copy_(s0)
        _run_heads(_forward_heads, H, threads, q, k, v, f, C, seg, out, seg_states)
        ctx.save_for_backward(q, k, v, seg_states)
        ctx.f, ctx.C, ctx.seg, ctx.threads = f, C, seg, threads
        ctx.s0dtype = None if s0 is None else s0.dtype
        ctx.set_materialize_grads(False)
        return out[:, :S], seg_states[n_seg].clone()

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, seg_states = ctx.saved_tensors
        B, S, H, Dk = q.shape
        Dv, C = v.shape[-1], ctx.C
        n = -(-S // C)
        dq, dk = q.new_empty(B, n * C, H, Dk), k.new_empty(B, n * C, H, Dk)
        dv = v.new_empty(B, n * C, H, Dv)
        ds0 = None if ctx.s0dtype is None else seg_states.new_empty(B, H, Dk, Dv)
        _run_heads(_backward_heads, H, ctx.threads, q, k, v, dout, dstate, seg_states, ctx.f,
                   C, ctx.seg, dq, dk, dv, ds0)
        ds0 = None if ds0 is None else ds0.to(ctx.s0dtype)
        return dq[:, :S], dk[:, :S], dv[:, :S], ds0, None, None, None, None, None


def chunk_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              decay: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                              return_state: bool = False,
                              cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                              block_size: int | None = None,
                              segment_tokens: int = DEFAULT_SEGMENT,
                              threads: int | None = None):
    """Blocked torch lightning attention; see `lightning_attention` for the contract.

    Computes in fp32 (fp64 for fp64 inputs); out has q's dtype, state is fp32 [B, H, Dk, Dv].
    threads: head groups processed by parallel worker threads, each with one intra-op
    thread (default: torch.get_num_threads() on CPU, 1 on other devices).
    """
    B, S, H, Dk = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = max(1, min(block_size or DEFAULT_BLOCK, S))
    docs = doc_ids(cu_seqlens, S, q.device)
    f = block_factors(decay.to(q.device), S, C, docs, dt)
    s0 = None if initial_state is None else initial_state.to(dt)
    seg = max(1, segment_tokens // C)
    if threads is None:
        threads = torch.get_num_threads() if q.device.type == "cpu" else 1
    out, state = _ChunkLightning.apply(q, k, v, s0, f, C, seg, dt, threads)
    return (out, state) if return_state else out
