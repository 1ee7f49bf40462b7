"""Which kernel computes each attention block: `choose_backend` is a pure function, so the CUDA
choice is proven here on CPU for every block kind x dtype x (flash-attn installed or not) x device
(Ampere, Hopper with and without a recent cuDNN).

Also checks, on CPU, the identity the FlexAttention backward relies on (gradients of a block for
the FINAL merged out/lse, by autograd through the block's own out and lse), against the
closed-form math backward; the fused kernels themselves are checked by `make gpu-check`.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from longtrain.kernels.attention import (BACKENDS, MATH_MAX_PAIRS, REGISTRY, math_backward, math_forward,
                                         backward_through_lse, choose_backend, make_spec)

FUSED = {"cudnn", "flash", "sdpa_flash", "sdpa_efficient", "flex"}
KINDS = ("full", "causal", "partial")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEVICES = {"A100": ((8, 0), 91600), "H200": ((9, 0), 91600), "H200 old cuDNN": ((9, 0), 91500)}


@pytest.mark.parametrize("kind,dtype,flash,expressible,device",
                         list(itertools.product(KINDS, DTYPES, (False, True), (False, True), DEVICES)))
def test_cuda_blocks_get_a_fused_kernel(kind, dtype, flash, expressible, device):
    cap, cudnn = DEVICES[device]
    got = choose_backend("cuda", dtype, kind, flash_installed=flash, flash_expressible=expressible,
                         head_dim=128, sq=4096, sk=4096, capability=cap, cudnn_version=cudnn)
    assert got in FUSED
    half = dtype != torch.float32
    if half and kind in ("full", "causal") and device == "H200":
        assert got == "cudnn"  # Hopper + cuDNN > 9.15: torch's cuDNN attention for dense blocks
    elif half and flash and expressible:
        assert got == "flash"
    elif kind in ("full", "causal"):
        assert got == ("sdpa_flash" if half else "sdpa_efficient")
    else:
        assert got == "flex"  # documents, windows, causal at offsets: a block mask, never S x S


def test_cudnn_only_where_it_runs_and_is_faster():
    kw = dict(flash_installed=False, flash_expressible=False, sq=4096, sk=4096, cudnn_version=91600)
    hopper = dict(kw, capability=(9, 0))
    assert choose_backend("cuda", torch.bfloat16, "causal", head_dim=128, **hopper) == "cudnn"
    assert choose_backend("cuda", torch.float16, "full", head_dim=64, **dict(hopper, capability=(10, 0))) == "cudnn"
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=256, **hopper) == "sdpa_flash"  # > 128
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=100, **hopper) == "sdpa_efficient"
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=128, **dict(hopper, capability=(12, 0))) \
        == "sdpa_flash"  # consumer Blackwell: not where torch prefers cuDNN either
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=128, **dict(hopper, cudnn_version=0)) \
        == "sdpa_flash"  # no cuDNN attention (not built, or torch.backends.cuda.enable_cudnn_sdp(False))
    # a causal block wider than tall (top-left): cuDNN and torch's flash kernel would align it bottom-right
    assert choose_backend("cuda", torch.bfloat16, "causal", head_dim=128, **dict(hopper, sq=2048)) \
        == "sdpa_efficient"
    assert choose_backend("cuda", torch.bfloat16, "partial", head_dim=128, **hopper) == "flex"
    # flash-attn installed: cuDNN still takes dense blocks on Hopper, flash-attn the diagonal windows
    fa = dict(hopper, flash_installed=True, flash_expressible=True)
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=128, **fa) == "cudnn"
    assert choose_backend("cuda", torch.bfloat16, "partial", head_dim=128, **fa) == "flash"
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=128, **dict(fa, capability=(8, 0))) == "flash"


def test_forcing_a_backend_only_applies_where_it_computes_the_block():
    kw = dict(flash_installed=False, flash_expressible=False, head_dim=128, sq=4096, sk=4096)
    assert choose_backend("cuda", torch.bfloat16, "full", forced="cudnn", **kw) == "cudnn"
    assert choose_backend("cuda", torch.bfloat16, "partial", forced="cudnn", **kw) == "flex"
    assert choose_backend("cuda", torch.bfloat16, "partial", forced="sdpa_flash", **kw) == "flex"
    assert choose_backend("cuda", torch.bfloat16, "partial", forced="flash", **kw) == "flex"
    assert choose_backend("cpu", torch.float32, "partial", forced="flash", **kw) == "cpu"
    assert choose_backend("cpu", torch.float32, "partial", forced="flex", **kw) == "flex"
    # K/V repeated per query head only for torch's memory-efficient kernel (fp32 / odd head_dim blocks)
    assert {n for n, b in REGISTRY.items() if not b.native_gqa} == {"sdpa_efficient"}


def test_sdpa_flash_needs_a_head_dim_it_supports():
    kw = dict(flash_installed=False, flash_expressible=True, sq=1024, sk=1024)
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=100, **kw) == "sdpa_efficient"
    assert choose_backend("cuda", torch.bfloat16, "full", head_dim=512, **kw) == "sdpa_efficient"
    # flash-attn installed but head_dim not a multiple of 8: torch's kernels, not flash-attn
    kw["flash_installed"] = True
    assert choose_backend("cuda", torch.bfloat16, "causal", head_dim=100, **kw) == "sdpa_efficient"


def test_math_only_when_forced_or_tiny():
    kw = dict(flash_installed=False, flash_expressible=False, head_dim=64)
    assert choose_backend("cuda", torch.bfloat16, "partial", sq=128, sk=128, **kw) == "math"
    assert MATH_MAX_PAIRS == 128 * 128
    assert choose_backend("cuda", torch.bfloat16, "partial", sq=128, sk=129, **kw) == "flex"
    assert choose_backend("cuda", torch.bfloat16, "full", sq=4096, sk=4096, forced="math", **kw) == "math"
    assert choose_backend("cpu", torch.float32, "partial", sq=4096, sk=4096, **kw) == "cpu"
    assert choose_backend("mps", torch.float32, "full", sq=4096, sk=4096, **kw) == "math"
    with pytest.raises(ValueError, match="LONGTRAIN_ATTENTION_BACKEND"):
        choose_backend("cuda", torch.float32, "full", sq=8, sk=8, forced="fastest", **kw)
    assert set(BACKENDS) == FUSED | {"cpu", "math"}
    assert choose_backend("cuda", torch.bfloat16, "full", sq=4096, sk=4096, forced="math", capability=(9, 0),
                          cudnn_version=91600, **kw) == "math"


def test_choice_is_logged_once(caplog, monkeypatch):
    from longtrain.kernels import attention as A
    from longtrain.kernels.attention import dispatch

    monkeypatch.setattr(dispatch, "_LOGGED", set())
    monkeypatch.delenv("LONGTRAIN_ATTENTION_BACKEND", raising=False)
    q = torch.randn(1, 8, 2, 8)
    causal = make_spec(q, q, causal=True, softmax_scale=None, window=None, q_offset=0, k_offset=0, bounds=None)
    window = make_spec(q, q, causal=True, softmax_scale=None, window=3, q_offset=0, k_offset=0, bounds=None)
    with caplog.at_level(logging.INFO, logger="longtrain.kernels.attention"):
        for _ in range(3):
            A.backend_for(q, causal)
            A.backend_for(q, window)
    lines = [r.message for r in caplog.records if "attention_block:" in r.message]
    assert lines == ["attention_block: cpu float32 causal blocks -> cpu",
                     "attention_block: cpu float32 partial blocks -> cpu"]


@pytest.mark.parametrize("window,bounds,q_offset", [(7, (0, 5, 30), 10), (None, (0, 13, 22), 0), (None, None, 40)])
def test_backward_through_lse_equals_closed_form(window, bounds, q_offset):
    """The FlexAttention backward identity, with the math forward standing in for flex.

    The final lse mixes in other blocks' mass and has rows dead everywhere (-inf -> +inf), as in a
    ring; tolerance: fp32 arithmetic on fp64 inputs, 1e-5 absolute (values are O(1)).
    """
    torch.manual_seed(0)
    b, s, hq, hkv, d = 2, 40, 4, 2, 16
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    spec = make_spec(q, k, causal=True, softmax_scale=None, window=window, q_offset=q_offset, k_offset=0,
                     bounds=bounds)
    _, lse_b = math_forward(q, k, v, spec)
    final = torch.logaddexp(lse_b, torch.randn_like(lse_b))
    final = final.masked_fill(torch.rand_like(final) < 0.1, float("-inf"))
    final = final.masked_fill(final == float("-inf"), float("inf"))  # block_backward's convention
    out, dout = torch.randn(b, s, hq, d, dtype=torch.float64), torch.randn(b, s, hq, d, dtype=torch.float64)
    ref = math_backward(dout, q, k, v, out, final, spec)
    got = backward_through_lse(math_forward, dout, q, k, v, out, final, spec)
    for r, g in zip(ref, got):
        assert torch.isfinite(g).all()
        assert (r - g).abs().max().item() < 1e-5


def test_grouped_kv_reach_the_torch_kernels_unrepeated():
    """GQA without K/V copies (issue 23, item 4), for the aten-op backends: their forward and backward
    run on the meta device (shapes only, so cuDNN's and the flash op's call conventions are exercised
    on CPU too) and the K/V operands handed to the kernel ops are recorded (bench attention)."""
    from longtrain.bench.attention import measure

    kw = dict(sq=256, sk=256, heads=8, kv_heads=2, head_dim=64, dtype=torch.bfloat16, causal=True)
    kv = 2 * 256 * 2 * 64 * 2  # K and V bytes at 2 heads
    for be in ("cudnn", "sdpa_flash"):
        assert measure(be, before=False, **kw) == {"kv_read": 2 * kv, "dkv_written": kv, "copies": 0}, be
    before = measure("sdpa_flash", before=True, **kw)  # the previous code: K/V repeated to 8 heads
    assert before["kv_read"] == 4 * 2 * kv and before["dkv_written"] == 4 * kv and before["copies"] > 0
    eff = measure("sdpa_efficient", before=False, **kw)
    assert eff["kv_read"] == 8 * kv and eff["copies"] > 0  # still repeated (its backward's contract)
