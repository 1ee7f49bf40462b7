"""attention_block (both backends) against naive_attention, forward and gradients."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from longtrain.kernels import attention_block, naive_attention
from longtrain.kernels.attention import block_backward, block_forward, classify_block, make_spec


def _inputs(b, s, hq, hkv, d, dtype=torch.float32, sk=None):
    sk = sk or s
    q = torch.randn(b, s, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, sk, hkv, d, dtype=dtype, requires_grad=True)
    return q, k, v


def _grads(out, q, k, v, g):
    return torch.autograd.grad(out, (q, k, v), g)


def test_naive_matches_torch_sdpa():
    # anchors the reference itself on an independent implementation
    q, k, v = _inputs(2, 40, 4, 4, 16)
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal).transpose(1, 2)
        torch.testing.assert_close(naive_attention(q, k, v, causal=causal), ref, atol=1e-6, rtol=0)


def test_naive_window_and_documents_by_hand():
    # one query per row; v = one-hot of the key index, so out shows which keys were averaged
    s = 8
    q = torch.zeros(1, s, 1, s)
    k = torch.zeros(1, s, 1, s)
    v = torch.eye(s).view(1, s, 1, s)
    out = naive_attention(q, k, v, causal=True, window=3, cu_seqlens=[0, 5, 8])[0, :, 0]
    expect = torch.zeros(s, s)
    for i in range(s):
        keys = [j for j in range(s) if i - 3 < j <= i and (j < 5) == (i < 5)]
        expect[i, keys] = 1.0 / len(keys)
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("backend", ["cpu", "math"])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 4, 48)])
def test_full_sequence_matches_naive(monkeypatch, backend, hq, hkv, d):
    monkeypatch.setenv("LONGTRAIN_ATTENTION_BACKEND", backend)
    s = 37
    cases = [dict(causal=c) for c in (False, True)]
    cases += [dict(causal=True, window=w) for w in (5, 6, 7)]
    cases += [dict(causal=False, window=6)]
    cases += [dict(causal=c, cu_seqlens=torch.tensor([0, 9, 10, 30])) for c in (False, True)]
    cases += [dict(causal=True, window=4, cu_seqlens=[0, 12, 37])]
    for kw in cases:
        q, k, v = _inputs(2, s, hq, hkv, d)
        out, lse = attention_block(q, k, v, **kw)
        ref = naive_attention(q, k, v, **kw)
        assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (2, hq, s)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=str(kw))
        g = torch.randn_like(out)
        for a, b in zip(_grads(out, q, k, v, g), _grads(ref, q, k, v, g)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=str(kw))


def test_lse_is_logsumexp_of_scores():
    q, k, v = _inputs(1, 12, 2, 1, 8)
    _, lse = attention_block(q, k, v, causal=True, softmax_scale=0.3)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.expand(-1, -1, 2, -1)) * 0.3
    s = s.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["cpu", "math"])
def test_blocks_with_offsets_merge_to_full(monkeypatch, backend):
    """Split keys/queries into blocks at arbitrary offsets; merged block results equal naive."""
    monkeypatch.setenv("LONGTRAIN_ATTENTION_BACKEND", backend)
    s, cuts = 30, [0, 7, 16, 30]
    for kw in [dict(causal=True), dict(causal=False), dict(causal=True, window=8),
               dict(causal=False, window=5), dict(causal=True, cu_seqlens=[0, 11, 23]),
               dict(causal=True, window=3, cu_seqlens=[0, 11, 23])]:
        q, k, v = _inputs(1, s, 4, 2, 16)
        ref = naive_attention(q, k, v, **kw)
        g = torch.randn_like(ref)
        rq, rk, rv = _grads(ref, q, k, v, g)
        for qa, qb in zip(cuts, cuts[1:]):
            outs, lses = [], []
            for ka, kb in zip(cuts, cuts[1:]):
                o, l = attention_block(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], q_offset=qa,
                                       k_offset=ka, **kw)
                assert torch.isfinite(o).all() and not torch.isnan(l).any()
                outs.append(o)
                lses.append(l)
            lse = torch.logsumexp(torch.stack(lses), 0)
            w = torch.exp(torch.stack(lses) - lse.masked_fill(lse.isinf(), 0))  # [n,B,H,S]
            merged = sum(wi.transpose(1, 2)[..., None] * oi for wi, oi in zip(w, outs))
            torch.testing.assert_close(merged, ref[:, qa:qb], atol=1e-5, rtol=0, msg=str(kw))


def test_fully_masked_block_gives_zero_and_neg_inf_without_nan():
    q, k, v = _inputs(1, 8, 2, 2, 16)
    # keys all in the future of every query
    out, lse = attention_block(q, k, v, causal=True, q_offset=0, k_offset=8)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    # partially dead rows: documents make queries 0..2 see none of the keys
    out, lse = attention_block(q, k, v, causal=False, q_offset=0, k_offset=8, cu_seqlens=[0, 3, 40])
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    gq, gk, gv = _grads(out, q, k, v, torch.randn_like(out))
    assert all(torch.isfinite(t).all() for t in (gq, gk, gv))
    assert torch.equal(gq[:, :3], torch.zeros_like(gq[:, :3]))


@pytest.mark.parametrize("backend", ["cpu", "math"])
def test_bf16_close_to_fp32_reference(monkeypatch, backend):
    monkeypatch.setenv("LONGTRAIN_ATTENTION_BACKEND", backend)
    q, k, v = _inputs(1, 48, 8, 2, 64, dtype=torch.bfloat16)
    out, _ = attention_block(q, k, v, causal=True, window=17)
    ref = naive_attention(*(t.float() for t in (q, k, v)), causal=True, window=17)
    assert out.dtype == torch.bfloat16
    # bf16 tolerance as TransformerEngine's CP tests: atol = rtol = 2.5e-2
    torch.testing.assert_close(out.float(), ref, atol=2.5e-2, rtol=2.5e-2)
    g = torch.randn_like(out)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = naive_attention(qf, kf, vf, causal=True, window=17)
    for a, b in zip(_grads(out, q, k, v, g), _grads(ref, qf, kf, vf, g.float())):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=2.5e-2, rtol=2.5e-2)


def test_backward_from_delta_equals_backward_from_out():
    q, k, v = _inputs(2, 20, 4, 2, 16)
    spec = make_spec(q, k, causal=True, softmax_scale=None, window=None, q_offset=0, k_offset=0,
                     bounds=None)
    with torch.no_grad():
        out, lse = block_forward(q, k, v, spec)
        dout = torch.randn_like(out)
        dout[0, 3] = 0.0  # a zero dO row must not break the reconstruction
        a = block_backward(dout, q, k, v, out, lse, spec)
        delta = (dout * out).sum(-1).transpose(1, 2)
        b = block_backward(dout, q, k, v, None, lse, spec, delta=delta)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_classify_block_agrees_with_explicit_mask():
    from longtrain.kernels.attention import block_mask
    bounds = (0, 6, 7, 19)
    for (a, m, b, n), causal, window, bd in itertools.product(
            [(0, 8, 0, 8), (8, 8, 0, 8), (0, 8, 8, 8), (10, 5, 3, 4), (4, 9, 9, 3), (16, 6, 18, 2)],
            (False, True), (None, 1, 3, 8), (None, bounds)):
        keep = block_mask(m, n, q_offset=a, k_offset=b, causal=causal, window=window, bounds=bd,
                          device=torch.device("cpu"))
        kind = classify_block(a, m, b, n, causal=causal, window=window, bounds=bd)
        expect = "empty" if not keep.any() else ("full" if keep.all() else "partial")
        assert kind == expect, (a, m, b, n, causal, window, bd, kind, expect)


def test_bad_shapes_raise():
    q, k, v = _inputs(1, 4, 3, 2, 8)
    with pytest.raises(ValueError):
        attention_block(q, k, v, causal=True)
    q, k, v = _inputs(1, 4, 2, 2, 8)
    with pytest.raises(ValueError):
        attention_block(q, k, v, causal=True, window=0)
