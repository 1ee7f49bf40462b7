"""Attention span kinds (full / window:N) against an explicitly masked naive attention, and
plan validation. Single process here; to run the same checks under sequence parallelism add an
entry to OPS (an ops object with `.softmax(q, k, v, *, window, softmax_scale)`) and run the
check inside a distributed worker on the rank's shard (see `span_case`)."""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.models import ModelConfig, MoHConfig
from longtrain.models.layers import apply_rope, rope_cos_sin, rope_inv_freq
from longtrain.models.llama import Attention
from longtrain.models.moh import MoHAttention
from longtrain.models.ops import LocalAttention
from longtrain.models.spans import Span, attention_flops_fraction, layer_plan, parse_span

S = 24  # sequence length N: windows of N-1, N, N+1 keys are tested, plus short ones
OPS = {"local": LocalAttention}


def naive_layer(layer, x, rope, window):
    """The layer's math written out in fp64 with an explicit [S, S] mask (independent of ops/kernels)."""
    B, T, _ = x.shape
    H, Hkv, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    xd = x.double()
    q = (xd @ layer.wq.weight.double().T).view(B, T, H, D)
    k = (xd @ layer.wk.weight.double().T).view(B, T, Hkv, D)
    v = (xd @ layer.wv.weight.double().T).view(B, T, Hkv, D)
    cos, sin = (t.double() for t in rope)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    keep = (j <= i) & ((i - j) < window if window is not None else True)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    p = s.masked_fill(~keep, float("-inf")).softmax(-1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, H * D)
    return o @ layer.wo.weight.double().T


def make(kind: str, span: Span):
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8)
    if kind == "moh":  # query-norm MoH with every head on: must equal dense attention
        cfg.moh = MoHConfig(shared_heads=1, routed_heads=3, router="query_norm")
        layer = MoHAttention(cfg, 0, span)
        layer.block_size = 8  # several query blocks: prefix runs and window bands are exercised
        layer.sparse_min_seq = 0  # the sparse path, even at test sizes
    else:
        layer = Attention(cfg, 0, span)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return cfg, layer


def span_case(layer, x, rope, ops, window):
    """Max errors (forward, input grad, weight grads) of layer(x) through `ops` vs the naive layer."""
    xx = x.clone().requires_grad_(True)
    out = layer(xx, rope, ops)
    xr = x.double().clone().requires_grad_(True)
    ref = naive_layer(layer, xr, rope, window)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    layer.zero_grad()
    (out * g).sum().backward()
    got = [xx.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad()
    (ref * g.double()).sum().backward()  # parameters are fp32 leaves: their grads come back fp32
    want = [xr.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    errs = [float((out.detach().double() - ref.detach()).abs().max() / max(1.0, float(ref.detach().abs().max())))]
    errs += [float((a.double() - b.double()).abs().max() / max(1.0, float(b.abs().max()))) for a, b in zip(got, want)]
    return errs


@pytest.mark.parametrize("ops_name", list(OPS))
@pytest.mark.parametrize("layer_kind", ["dense", "moh"])
@pytest.mark.parametrize("plan_entry", ["full", f"window:{S - 1}", f"window:{S}", f"window:{S + 1}",
                                        "window:1", "window:5"])
def test_span_kinds_equal_masked_naive_attention(ops_name, layer_kind, plan_entry):
    span = parse_span(plan_entry)
    cfg, layer = make(layer_kind, span)
    x = torch.randn(2, S, cfg.dim)
    rope = rope_cos_sin(torch.arange(S), rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    errs = span_case(layer, x, rope, OPS[ops_name](), span.window)
    # fp32 vs fp64: forward and input gradient <= 1e-5; weight gradients sum over B*S tokens
    # (with window:1 the exact q/k gradients are 0 and only fp32 rounding remains): <= 5e-5
    assert max(errs[:2]) <= 1e-5 and max(errs[2:]) <= 5e-5, errs


def test_window_of_n_minus_1_differs_from_full_and_n_does_not():
    """The tests above can fail: window N-1 drops exactly the (last query, first key) pair."""
    cfg, layer = make("dense", Span("full"))
    x = torch.randn(1, S, cfg.dim)
    rope = rope_cos_sin(torch.arange(S), rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    with torch.no_grad():
        full = naive_layer(layer, x, rope, None)
        assert torch.equal(naive_layer(layer, x, rope, S), full)
        w = naive_layer(layer, x, rope, S - 1)
    assert torch.equal(w[:, :-1], full[:, :-1])
    assert float((w[:, -1] - full[:, -1]).abs().max()) > 1e-3


def test_plan_expansion():
    spans = layer_plan(["full", "window:1024", "window:1024", "window:1024"], 8)
    assert [str(s) for s in spans] == ["full", "window:1024", "window:1024", "window:1024"] * 2
    assert [s.kind for s in layer_plan(["lightning"], 3)] == ["lightning"] * 3
    explicit = ["full", "window:4", "lightning"]
    assert [str(s) for s in layer_plan(explicit, 3)] == explicit
    assert parse_span(" Window:16 ") == Span("window", 16)


@pytest.mark.parametrize("plan,n_layers,match", [
    (["full", "sliding:4"], 2, "unknown kind"),
    (["window:0"], 2, "must be > 0"),
    (["window:-3"], 2, "must be > 0"),
    (["window:abc"], 2, "not an integer"),
    (["full", "full", "full"], 2, "only 2 layers"),
    (["full", "window:8", "window:8"], 4, "does not divide"),
    ([], 2, "empty"),
    ([1024], 2, "must be a string"),
])
def test_plan_validation_errors_are_clear(plan, n_layers, match):
    with pytest.raises(ValueError, match=match):
        layer_plan(plan, n_layers)
    with pytest.raises(ValueError, match=match):  # the same error through the model config
        ModelConfig(n_layers=n_layers, attention=plan).validate()


def test_flops_fraction_matches_counted_pairs():
    seq = 64
    spans = layer_plan(["full", "window:16", "window:16", "window:16"], 4)
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    full_pairs = int((j <= i).sum())
    win_pairs = int(((j <= i) & (i - j < 16)).sum())
    counted = (full_pairs + 3 * win_pairs) / (4 * full_pairs)
    # the formula uses the continuous approximation (S^2/2 pairs); agree within O(1/S)
    assert abs(attention_flops_fraction(spans, seq) - counted) <= 2.0 / seq
    # REFERENCES §5: 1/4 full + window 1024 at 8192 tokens ~ 0.44 of dense (0.43 with the W^2/2 term)
    big = layer_plan(["full", "window:1024", "window:1024", "window:1024"], 4)
    assert 0.42 <= attention_flops_fraction(big, 8192) <= 0.44
