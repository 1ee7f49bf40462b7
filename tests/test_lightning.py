"""Lightning attention, torch path: against the token recurrence (fp64), plus the
properties the blocked algorithm must keep (block size, state carry, documents)."""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.kernels import lightning_attention, tnl_decay
from longtrain.kernels.lightning import naive_lightning_attention
from longtrain.kernels.lightning.chunk import chunk_lightning_attention

TOL = 1e-5  # relative L2, fp32 path against the fp64 recurrence


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def make(B, S, H, Dk, Dv=None, *, dtype=torch.float64, state=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or Dk
    q, k = (torch.randn(B, S, H, Dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, S, H, Dv, generator=g, dtype=dtype)
    do = torch.randn(B, S, H, Dv, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=dtype) if state else None
    dst = torch.randn(B, H, Dk, Dv, generator=g, dtype=dtype)
    return [q, k, v, s0], do, dst


def run(fn, inputs, do, dst, decay, dtype=None, **kw):
    """out, state and the gradients of <out, do> + <state, dst> w.r.t. q, k, v (, s0)."""
    leaves = [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_()
              for x in inputs]
    q, k, v, s0 = leaves
    out, st = fn(q, k, v, decay, initial_state=s0, return_state=True, **kw)
    loss = (out.double() * do.double()).sum() + (st.double() * dst.double()).sum()
    loss.backward()
    return out, st, [x.grad for x in leaves if x is not None]


def assert_close_to_reference(inputs, do, dst, decay, tol=TOL, **kw):
    ref_out, ref_st, ref_g = run(naive_lightning_attention, inputs, do, dst, decay,
                                 cu_seqlens=kw.get("cu_seqlens"))
    out, st, grads = run(lightning_attention, inputs, do, dst, decay, dtype=torch.float32,
                         backend="torch", **kw)
    assert out.dtype == torch.float32 and st.dtype == torch.float32
    errs = {"out": rel(out, ref_out), "state": rel(st, ref_st)}
    errs.update({n: rel(g, r) for n, g, r in zip(("dq", "dk", "dv", "ds0"), grads, ref_g)})
    assert max(errs.values()) <= tol, errs
    return errs


# --------------------------------------------------------------------------- decay


def test_tnl_decay_closed_form():
    # powers of two: s_i = 2^(-8 (i+1) / H)
    for H in (1, 2, 4, 8, 16, 32):
        want = torch.tensor([2.0 ** (-8 * (i + 1) / H) for i in range(H)])
        torch.testing.assert_close(tnl_decay(H, 0, 2), want * (1 + 1e-5), rtol=1e-6, atol=0)
    # H = 12: the 8 slopes of 8 heads, then every other slope of 16 heads (first 4)
    want12 = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]
    torch.testing.assert_close(tnl_decay(12, 0, 5), torch.tensor(want12) * (1 + 1e-5))
    # H = 6: 4 heads (2^-2, 2^-4, 2^-6, 2^-8), then 2^-1, 2^-3 from the 8-head set
    want6 = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    torch.testing.assert_close(tnl_decay(6, 0, 5), torch.tensor(want6) * (1 + 1e-5))
    # layer factor 1 - l/(L-1) + 1e-5, and a single layer
    base = tnl_decay(8, 0, 9) / (1 + 1e-5)
    for layer in range(9):
        torch.testing.assert_close(tnl_decay(8, layer, 9), base * (1 - layer / 8 + 1e-5))
    torch.testing.assert_close(tnl_decay(8, 0, 1), base * (1 + 1e-5))
    assert tnl_decay(24, 23, 24).min() > 0 and tnl_decay(24, 23, 24).max() < 1e-5
    assert tnl_decay(5, 0, 3).dtype == torch.float32 and tnl_decay(5, 0, 3).shape == (5,)
    for bad in ((0, 0, 1), (8, 3, 3), (8, -1, 3), (8, 0, 0)):
        with pytest.raises(ValueError):
            tnl_decay(*bad)


# ------------------------------------------------------------- against the recurrence

GRID = [  # (B, S, H, D, layer): every S, H, D value at least once, slow S=913 twice
    (2, 100, 8, 64, 0), (2, 100, 12, 80, 3), (2, 130, 8, 80, 1), (2, 130, 12, 64, 2),
    (1, 913, 8, 64, 3), (1, 913, 12, 80, 0),
]


@pytest.mark.parametrize("B,S,H,D,layer", GRID)
def test_torch_path_matches_recurrence(B, S, H, D, layer):
    inputs, do, dst = make(B, S, H, D, state=True, seed=S + H + D)
    assert_close_to_reference(inputs, do, dst, tnl_decay(H, layer, 4))


def test_recurrence_is_what_the_docstring_says():
    # o_p = sum_{j<=p} lambda^(p-j) (q_p.k_j) v_j + q_p^T lambda^(p+1) S0, written out in O(S^2)
    (q, k, v, s0), _, _ = make(2, 37, 3, 5, 4, state=True)
    decay = torch.tensor([0.0, 0.3, 2.0])
    out, st = naive_lightning_attention(q, k, v, decay, initial_state=s0, return_state=True)
    p = torch.arange(37, dtype=torch.float64)
    lam = torch.exp(-decay.double())
    expo = (p[:, None] - p[None, :]).clamp(min=0)
    w = lam[:, None, None] ** expo * (p[:, None] >= p[None, :])                   # [H, S, S]
    want = torch.einsum("bphd,bjhd,hpj,bjhe->bphe", q, k, w, v)
    want = want + torch.einsum("bphd,hp,bhde->bphe", q, lam[:, None] ** (p + 1), s0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    want_st = torch.einsum("hj,bjhd,bjhe->bhde", lam[:, None] ** (36 - p), k, v) \
        + lam[:, None, None] ** 37 * s0
    torch.testing.assert_close(st, want_st, rtol=1e-12, atol=1e-12)


def test_value_dim_differs_zero_decay_and_strong_decay():
    inputs, do, dst = make(1, 150, 3, 24, 40, state=True)
    assert_close_to_reference(inputs, do, dst, torch.tensor([0.0, 1e-3, 5.0]))


def test_several_segments_and_documents():
    # segment_tokens=128 forces the state hand-over between cache segments in both passes
    inputs, do, dst = make(2, 913, 4, 32, state=True)
    cu = torch.tensor([0, 64, 64, 200, 201, 640, 913])
    decay = tnl_decay(4, 2, 4)
    ref = run(naive_lightning_attention, inputs, do, dst, decay, cu_seqlens=cu)
    for seg in (128, 100_000):
        got = run(chunk_lightning_attention, inputs, do, dst, decay, dtype=torch.float32,
                  cu_seqlens=cu, segment_tokens=seg, block_size=32)
        for g, r in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
            assert rel(g, r) <= TOL


# ------------------------------------------------------------------------ properties


def test_block_size_invariance():
    inputs, do, dst = make(2, 300, 4, 32, state=True, dtype=torch.float32)
    cu = torch.tensor([0, 50, 128, 129, 300])
    decay = tnl_decay(4, 1, 3)
    ref = run(lightning_attention, inputs, do, dst, decay, backend="torch", cu_seqlens=cu,
              block_size=64)
    for C in (1, 16, 37, 100, 128, 512):
        got = run(lightning_attention, inputs, do, dst, decay, backend="torch", cu_seqlens=cu,
                  block_size=C)
        for g, r in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
            assert rel(g, r) <= 2e-6, C


@pytest.mark.parametrize("split", [64, 70])
def test_state_continuation(split):
    """Two halves with the carried state = one run: outputs, final state, and the
    gradients, which flow back through the carried state into the first half."""
    (q, k, v, s0), do, dst = make(2, 150, 4, 32, 16, state=True, dtype=torch.float32)
    decay = tnl_decay(4, 1, 4)
    ref_out, ref_st, ref_g = run(lightning_attention, [q, k, v, s0], do, dst, decay,
                                 backend="torch")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    ql, kl, vl, sl = leaves
    o1, st1 = lightning_attention(ql[:, :split], kl[:, :split], vl[:, :split], decay,
                                  initial_state=sl, return_state=True)
    o2, st2 = lightning_attention(ql[:, split:], kl[:, split:], vl[:, split:], decay,
                                  initial_state=st1, return_state=True)
    out = torch.cat([o1, o2], 1)
    ((out * do).sum() + (st2 * dst).sum()).backward()
    assert rel(out, ref_out) <= 1e-6 and rel(st2, ref_st) <= 1e-6
    for g, r in zip([x.grad for x in leaves], ref_g):
        assert rel(g, r) <= 1e-6
    assert leaves[0].grad[:, :split].abs().sum() > 0 and leaves[3].grad.abs().sum() > 0


def test_documents_equal_separate_runs():
    (q, k, v, s0), do, dst = make(2, 230, 4, 32, state=True, dtype=torch.float32)
    cu = torch.tensor([0, 37, 37, 100, 101, 230])
    decay = tnl_decay(4, 0, 2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    out, st = lightning_attention(*leaves[:3], decay, initial_state=leaves[3], return_state=True,
                                  cu_seqlens=cu)
    ((out * do).sum() + (st * dst).sum()).backward()
    sep = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    outs = []
    bounds = cu.tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        o, st_sep = lightning_attention(sep[0][:, a:b], sep[1][:, a:b], sep[2][:, a:b], decay,
                                        initial_state=sep[3] if i == 0 else None,
                                        return_state=True)
        outs.append(o)
    out_sep = torch.cat(outs, 1)
    ((out_sep * do).sum() + (st_sep * dst).sum()).backward()
    assert rel(out, out_sep) <= 1e-6 and rel(st, st_sep) <= 1e-6
    for a, b in zip(leaves, sep):
        assert rel(a.grad, b.grad) <= 1e-6
    # no information crosses a boundary: changing document 2 leaves document 3 alone
    k2 = k.clone()
    k2[:, 40:90] += 1.0
    out2 = lightning_attention(q, k2, v, decay, cu_seqlens=cu)
    assert torch.equal(out2[:, 101:], out[:, 101:].detach()) or rel(out2[:, 101:], out[:, 101:]) < 1e-7
    assert rel(out2[:, 37:100], out[:, 37:100]) > 1e-2


# --------------------------------------------------------------------------- API


def test_half_precision_inputs_and_auto_backend():
    (q, k, v, _), _, _ = make(1, 200, 4, 32, dtype=torch.float32)
    decay = tnl_decay(4, 0, 2)
    ref = lightning_attention(q, k, v, decay, backend="naive")
    assert rel(lightning_attention(q, k, v, decay), ref) <= TOL    # auto on CPU = torch path
    for dt in (torch.bfloat16, torch.float16):
        xs = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out, st = lightning_attention(*xs, decay, return_state=True)
        assert out.dtype == dt and st.dtype == torch.float32
        want = lightning_attention(*(x.detach().float() for x in xs), decay, backend="naive")
        assert rel(out, want) <= 1e-2
        out.float().sum().backward()
        assert all(x.grad.dtype == dt and torch.isfinite(x.grad).all() for x in xs)


def test_decay_is_constant_and_inputs_are_checked():
    (q, k, v, _), _, _ = make(1, 20, 2, 8, dtype=torch.float32)
    decay = torch.tensor([0.1, 0.2], requires_grad=True)
    qq = q.clone().requires_grad_()
    lightning_attention(qq, k, v, decay).sum().backward()
    assert decay.grad is None and qq.grad is not None
    with pytest.raises(ValueError, match="decay"):
        lightning_attention(q, k, v, torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, k, v, decay, backend="cuda")
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attention(q, k, v, decay, cu_seqlens=torch.tensor([0, 5, 19]))
    with pytest.raises(ValueError, match="non-decreasing"):
        lightning_attention(q, k, v, decay, cu_seqlens=torch.tensor([0, 9, 5, 20]))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, decay, initial_state=torch.zeros(1, 2, 8, 9))
    assert not math.isnan(lightning_attention(q[:, :1], k[:, :1], v[:, :1], decay).sum().item())


# ------------------------------------------------------------------ the layer module


def test_lightning_layer_matches_written_out_formula():
    from longtrain.models.lightning import LightningAttention

    torch.manual_seed(0)
    dim, H, D, S = 48, 4, 12, 40
    m = LightningAttention(dim, H, D, layer_idx=2, n_layers=6)
    x = torch.randn(2, S, dim, requires_grad=True)
    y = m(x)
    assert y.shape == (2, S, dim)
    # the same layer written out with the O(S^2) decay matrix
    q = torch.nn.functional.silu(x @ m.wq.weight.T).view(2, S, H, D)
    k = torch.nn.functional.silu(x @ m.wk.weight.T).view(2, S, H, D)
    v = (x @ m.wv.weight.T).view(2, S, H, D)
    lam = torch.exp(-tnl_decay(H, 2, 6))
    p = torch.arange(S)
    w = lam[:, None, None] ** (p[:, None] - p[None, :]).clamp(min=0) * (p[:, None] >= p[None, :])
    o = torch.einsum("bphd,bjhd,hpj,bjhe->bphe", q, k, w, v)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)
    o = o.reshape(2, S, H * D) * m.norm_weight
    want = (o * torch.sigmoid(x @ m.wg.weight.T)) @ m.wo.weight.T
    assert rel(y, want) <= 1e-5
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # causal: changing token 30 leaves outputs before it unchanged
    x2 = x.detach().clone()
    x2[:, 30] += 1.0
    y2 = m(x2)
    assert torch.equal(y2[:, :30], y.detach()[:, :30]) and not torch.allclose(y2[:, 30], y[:, 30])


def test_lightning_layer_attn_fn_hook():
    from longtrain.models.lightning import LightningAttention

    m = LightningAttention(32, 2, 16, layer_idx=0, n_layers=2)
    x = torch.randn(1, 70, 32)
    seen = []

    def naive(q, k, v, decay):
        seen.append((q.shape, decay.clone()))
        return lightning_attention(q, k, v, decay, backend="naive")

    assert rel(m(x, attn_fn=naive), m(x)) <= 1e-5
    assert seen and seen[0][0] == (1, 70, 2, 16) and torch.equal(seen[0][1], tnl_decay(2, 0, 2))


def test_lightning_layer_decay_buffer():
    from longtrain.models.lightning import LightningAttention

    m = LightningAttention(32, 6, 8, layer_idx=3, n_layers=5)
    assert torch.equal(m.decay, tnl_decay(6, 3, 5)) and "decay" not in m.state_dict()
    m2 = LightningAttention(32, 6, 8, layer_idx=3, n_layers=5)
    m2.load_state_dict(m.state_dict())                      # strict: same keys both ways
    m.to(torch.bfloat16)
    assert m.wq.weight.dtype == torch.bfloat16
    assert m.decay.dtype == torch.float32 and torch.equal(m.decay, tnl_decay(6, 3, 5))
    assert m(torch.randn(1, 9, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.device("meta"):
        meta = LightningAttention(32, 6, 8, layer_idx=3, n_layers=5)
    meta.to_empty(device="cpu")
    assert torch.equal(meta.decay, tnl_decay(6, 3, 5))
    meta.norm_weight.data.zero_()
    meta.reset_extra_parameters()
    assert torch.equal(meta.norm_weight.detach(), torch.ones(48))


def test_non_contiguous_inputs():
    x = torch.randn(2, 4, 150, 16, dtype=torch.float64)
    q, k, v = (x * 2).transpose(1, 2), x.flip(2).transpose(1, 2), x.transpose(1, 2)[..., :8]
    assert not q.is_contiguous()
    decay = tnl_decay(4, 0, 2)
    want = naive_lightning_attention(q, k, v, decay)
    assert rel(lightning_attention(q, k, v, decay, backend="torch"), want) <= 1e-12


def test_threaded_head_groups():
    """CPU path with head groups in worker threads (uneven split 3/3/2), documents and
    several segments: same numbers, and the caller's thread count is restored."""
    inputs, do, dst = make(2, 300, 8, 24, 16, state=True)
    cu = torch.tensor([0, 64, 100, 101, 300])
    decay = tnl_decay(8, 1, 3)
    ref = run(naive_lightning_attention, inputs, do, dst, decay, cu_seqlens=cu)
    before = torch.get_num_threads()
    for threads in (2, 3):
        got = run(chunk_lightning_attention, inputs, do, dst, decay, dtype=torch.float32,
                  cu_seqlens=cu, threads=threads, segment_tokens=128)
        for g, r in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
            assert rel(g, r) <= TOL
    assert torch.get_num_threads() == before
