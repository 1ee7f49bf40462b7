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

from typing import NamedTuple

import torch

DEFAULT_BLOCK = 64
DEFAULT_SEGMENT = 2048   # tokens per cache-sized segment of the torch path


def doc_ids(cu_seqlens: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Document index of every position [S] (int64), or None without cu_seqlens."""
    if cu_seqlens is None:
        return None
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor [n_docs + 1]")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != seq_len:
        raise ValueError(f"cu_seqlens must run from 0 to S={seq_len}, got {first}..{last}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    pos = torch.arange(seq_len, device=device)
    return torch.searchsorted(cu[1:-1].contiguous(), pos, right=True)


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


def _to_blocks(x: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S, H, D] -> [n, B, H, C, D] contiguous, zero-padded to n*C tokens."""
    B, S, H, D = x.shape
    n = -(-S // C)
    if n * C != S:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n * C - S))
    return x.view(B, n, C, H, D).permute(1, 0, 3, 2, 4).to(dtype).contiguous()


def _unblock(x: torch.Tensor, S: int) -> torch.Tensor:
    """[n, B, H, C, D] -> [B, S, H, D] view (drops the padding)."""
    n, B, H, C, D = x.shape
    return x.permute(1, 0, 3, 2, 4).reshape(B, n * C, H, D)[:, :S]


def _bmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b over the flattened leading dims (all contiguous or transposed views)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]),
                                           b.reshape(-1, *b.shape[-2:]))
    return out


def _seg(f: BlockFactors, i0: int, i1: int) -> BlockFactors:
    return BlockFactors(*(t if t.shape[0] == 1 else t[i0:i1] for t in f))


class _ChunkLightning(torch.autograd.Function):
    # The work runs segment by segment (SEG blocks at a time) with the state
    # carried between segments, so that the temporaries stay in cache: the
    # throughput then does not fall with the sequence length. Only q, k, v (which
    # autograd keeps anyway) and the per-block states are saved; the blocked
    # copies and the intra-block scores are rebuilt in the backward.
    @staticmethod
    def forward(ctx, q, k, v, s0, f: BlockFactors, C: int, seg: int, dt: torch.dtype):
        B, S, H, Dk = q.shape
        Dv = v.shape[-1]
        n = -(-S // C)
        out = q.new_empty(B, S, H, Dv)
        states = q.new_empty(n + 1, B, H, Dk, Dv, dtype=dt)
        if s0 is None:
            states[0].zero_()
        else:
            states[0].copy_(s0)
        for i0 in range(0, n, seg):
            i1 = min(n, i0 + seg)
            p0, p1 = i0 * C, min(S, i1 * C)
            g = _seg(f, i0, i1)
            Qb, Kb, Vb = (_to_blocks(x[:, p0:p1], C, dt) for x in (q, k, v))
            A = torch.matmul(Qb, Kb.transpose(-1, -2)).mul_(g.mask)
            kv_local = torch.matmul((Kb * g.ks).transpose(-1, -2), Vb)   # [m, B, H, Dk, Dv]
            for j in range(i1 - i0):
                torch.addcmul(kv_local[j], states[i0 + j], g.bd[j], out=states[i0 + j + 1])
            O = torch.matmul(Qb, states[i0:i1]).mul_(g.qs)
            _bmm_(O, A, Vb)
            out[:, p0:p1].copy_(_unblock(O, p1 - p0))
        ctx.save_for_backward(q, k, v, states)
        ctx.f, ctx.C, ctx.seg, ctx.s0dtype = f, C, seg, None if s0 is None else s0.dtype
        ctx.set_materialize_grads(False)
        return out, states[n].clone()

    @staticmethod
    def backward(ctx, dout, dstate):
        q, k, v, states = ctx.saved_tensors
        f, C, seg = ctx.f, ctx.C, ctx.seg
        dt = states.dtype
        B, S, H, Dk = q.shape
        n = states.shape[0] - 1
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        G = torch.zeros_like(states[0]) if dstate is None else dstate.to(dt).clone()
        for i0 in reversed(range(0, n, seg)):
            i1 = min(n, i0 + seg)
            m = i1 - i0
            p0, p1 = i0 * C, min(S, i1 * C)
            g = _seg(f, i0, i1)
            Qb, Kb, Vb = (_to_blocks(x[:, p0:p1], C, dt) for x in (q, k, v))
            if dout is None:
                dO = torch.zeros_like(Vb)
            else:
                dO = _to_blocks(dout[:, p0:p1], C, dt)
            A = torch.matmul(Qb, Kb.transpose(-1, -2)).mul_(g.mask)
            dA = torch.matmul(dO, Vb.transpose(-1, -2)).mul_(g.mask)
            dQ = torch.matmul(dO, states[i0:i1].transpose(-1, -2)).mul_(g.qs)
            _bmm_(dQ, dA, Kb)
            dq[:, p0:p1].copy_(_unblock(dQ, p1 - p0))
            local = torch.matmul((Qb * g.qs).transpose(-1, -2), dO)     # dL/dKV_i from block i
            Gn = torch.empty_like(local)                                # dL/dKV_(i+1)
            for j in range(m - 1, -1, -1):
                Gn[j].copy_(G)
                G = torch.addcmul(local[j], G, g.bd[j])
            dK = torch.matmul(Vb, Gn.transpose(-1, -2)).mul_(g.ks)
            _bmm_(dK, dA.transpose(-1, -2), Qb)
            dk[:, p0:p1].copy_(_unblock(dK, p1 - p0))
            dV = torch.matmul(Kb * g.ks, Gn)
            _bmm_(dV, A.transpose(-1, -2), dO)
            dv[:, p0:p1].copy_(_unblock(dV, p1 - p0))
        ds0 = None if ctx.s0dtype is None else G.to(ctx.s0dtype)
        return dq, dk, dv, ds0, None, None, None, None


def chunk_lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              decay: torch.Tensor, *, initial_state: torch.Tensor | None = None,
                              return_state: bool = False,
                              cu_seqlens: torch.Tensor | None = None,
                              block_size: int | None = None,
                              segment_tokens: int = DEFAULT_SEGMENT):
    """Blocked torch lightning attention; see `lightning_attention` for the contract.

    Computes in fp32 (fp64 for fp64 inputs); out has q's dtype, state is fp32 [B, H, Dk, Dv].
    """
    B, S, H, Dk = q.shape
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = max(1, min(block_size or DEFAULT_BLOCK, S))
    docs = doc_ids(cu_seqlens, S, q.device)
    f = block_factors(decay.to(q.device), S, C, docs, dt)
    s0 = None if initial_state is None else initial_state.to(dt)
    seg = max(1, segment_tokens // C)
    out, state = _ChunkLightning.apply(q, k, v, s0, f, C, seg, dt)
    return (out, state) if return_state else out
