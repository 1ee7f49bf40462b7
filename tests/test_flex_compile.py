"""FlexAttention blocks (issue 23, items 3 and 4): one forward per block, one compiled kernel for every
block geometry of a step, grouped K/V handed over without copies, gradients equal to the math path.

Compilations are counted on CPU as dynamo frame compilations with a counting backend (each one is
one inductor compilation on CUDA; inductor cannot compile flex with lse, nor its backward, on CPU in
torch 2.13, so the kernels here run eagerly behind the same dynamo graphs). Counted the same way,
the previous code compiled its forward 2 times for a W = 2 ring step and 5 times at W = 8 (Python
ints of each block's geometry in the mask_mod closure), plus as many again under grad mode for the
second forward inside every backward; now one forward and one backward graph at W = 2 and W = 8.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from longtrain.kernels.attention import (block_backward, block_forward, block_mask, flex, make_spec, tile_kinds,
                                         math_backward)
from longtrain.parallel.comm import COUNTERS
from longtrain.parallel.simulate import simulate_ring


@pytest.fixture
def counted_flex(monkeypatch):
    """Force the flex backend, compile with a frame counter, record what reaches the kernels."""
    cnt = CompileCounter()
    torch._dynamo.reset()
    monkeypatch.setattr(flex, "COMPILE_BACKEND", cnt)
    monkeypatch.setattr(flex, "_COMPILED", {})
    monkeypatch.setattr(flex, "_MASKS", {})
    monkeypatch.setattr(flex, "_DIRECT_BACKWARD", {"ok": None})
    monkeypatch.setenv("LONGTRAIN_ATTENTION_BACKEND", "flex")
    calls = {"fwd": [], "bwd": []}
    fwd, bwd = flex._flex_kernel_forward, flex._flex_kernel_backward

    def rec_fwd(qt, kt, vt, *a):
        calls["fwd"].append((qt.shape[1], kt.shape[1], vt.shape[1]))
        return fwd(qt, kt, vt, *a)

    def rec_bwd(qt, kt, vt, *a):
        calls["bwd"].append((qt.shape[1], kt.shape[1], vt.shape[1]))
        return bwd(qt, kt, vt, *a)

    monkeypatch.setattr(flex, "_flex_kernel_forward", rec_fwd)
    monkeypatch.setattr(flex, "_flex_kernel_backward", rec_bwd)
    yield cnt, calls
    torch._dynamo.reset()


def _problem(world, b=1, hq=4, hkv=2, d=16, per_rank=64):
    torch.manual_seed(world)
    s = per_rank * world
    q, dout = torch.randn(b, s, hq, d), torch.randn(b, s, hq, d)
    k, v = torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    kw = dict(window=s // 5, cu_seqlens=[0, s // 7, s // 3, s // 3 + 1, (4 * s) // 5])
    return q, k, v, dout, kw


def _reference(q, k, v, dout, kw):
    spec = make_spec(q, k, causal=True, softmax_scale=None, window=kw["window"], q_offset=0, k_offset=0,
                     bounds=tuple(kw["cu_seqlens"]))
    from longtrain.kernels.attention import math_forward
    out, lse = math_forward(q, k, v, spec)
    return (out, *math_backward(dout, q, k, v, out, lse, spec))


@pytest.mark.parametrize("impl", ["ring", "tokenring"])
def test_ring_step_one_forward_per_block_no_kv_copies(counted_flex, impl):
    cnt, calls = counted_flex
    q, k, v, dout, kw = _problem(4)
    COUNTERS.reset()
    got = simulate_ring(q, k, v, dout, 4, impl=impl, **kw)
    blocks = COUNTERS.compute_blocks
    assert blocks > 4 and COUNTERS.backward_blocks == blocks
    # one FlexAttention forward per block (before: a second one inside every block's backward)
    assert len(calls["fwd"]) == blocks and len(calls["bwd"]) == blocks
    # grouped K/V reach the kernels with their own 2 heads, forward and backward
    assert set(calls["fwd"]) == set(calls["bwd"]) == {(4, 2, 2)}
    for a, r in zip(got, _reference(q, k, v, dout, kw)):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=0)  # fp32 arithmetic, values O(1)


def test_compilations_per_step_do_not_grow_with_ring_size(counted_flex):
    cnt, _ = counted_flex
    seen = {}
    for world in (2, 8):  # W = 8 after W = 2 in the same process, as a second run would see it
        q, k, v, dout, kw = _problem(world, per_rank=48)
        COUNTERS.reset()
        simulate_ring(q, k, v, dout, world, impl="ring", **kw)
        seen[world] = (cnt.frame_count, COUNTERS.compute_blocks)
    (f2, blocks2), (f8, blocks8) = seen[2], seen[8]
    assert blocks8 > 4 * blocks2  # many more block geometries (offsets, windows, documents, sizes) ...
    assert f2 <= 4 and f8 == f2, seen  # ... and not one more compilation (here: 1 forward + 1 backward graph)


@pytest.mark.parametrize("causal,window,bounds,qo,ko", [
    (True, None, (0, 13, 22), 0, 0), (True, 7, (0, 5, 30), 10, 0), (False, 6, None, 40, 31), (True, None, None, 40, 0)])
def test_block_backward_for_a_merged_lse(counted_flex, causal, window, bounds, qo, ko):
    """flex's backward op handed the FINAL lse (other blocks' mass, rows dead everywhere) = closed form."""
    torch.manual_seed(0)
    q, out, dout = (torch.randn(2, 40, 4, 16) for _ in range(3))
    k, v = torch.randn(2, 33, 2, 16), torch.randn(2, 33, 2, 16)
    spec = make_spec(q, k, causal=causal, softmax_scale=None, window=window, q_offset=qo, k_offset=ko, bounds=bounds)
    assert spec.kind == "partial" or (causal and window is None and bounds is None)
    o, lse_b = block_forward(q, k, v, spec)
    final = torch.logaddexp(lse_b, torch.randn_like(lse_b))
    final = final.masked_fill(torch.rand_like(final) < 0.1, float("-inf"))
    got = block_backward(dout, q, k, v, out, final, spec)
    ref = math_backward(dout, q, k, v, out, final.masked_fill(final == float("-inf"), float("inf")), spec)
    for a, r in zip(got, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, atol=2e-5, rtol=0)
    assert flex._DIRECT_BACKWARD["ok"] is True  # the backward op itself, not the recompute fallback


def test_tile_kinds_are_exact_or_conservative():
    """'full' tiles are all visible and 'empty' tiles all masked (exactly the mask without documents)."""
    dev = torch.device("cpu")
    geoms = [(40, 56, 0, 0), (40, 56, 48, 3), (56, 40, 9, 70), (33, 65, 100, 20)]
    for (sq, sk, qo, ko), causal, window, bounds in itertools.product(
            geoms, (False, True), (None, 1, 9, 30), (None, (0, 17, 18, 60, 90))):
        keep = block_mask(sq, sk, q_offset=qo, k_offset=ko, causal=causal, window=window, bounds=bounds, device=dev)
        full, partial = tile_kinds(sq, sk, q_offset=qo, k_offset=ko, causal=causal, window=window, bounds=bounds,
                                   tile=8, device=dev)
        for (ti, tj) in itertools.product(range(full.shape[0]), range(full.shape[1])):
            t = keep[ti * 8:(ti + 1) * 8, tj * 8:(tj + 1) * 8]
            if full[ti, tj]:
                assert t.all()
            elif not partial[ti, tj]:
                assert not t.any()
            elif bounds is None:
                assert t.any() and not t.all()  # without documents the classification is exact
