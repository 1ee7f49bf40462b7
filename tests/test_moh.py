"""Mixture-of-Head attention: routing invariants, aux loss, gradients, and the sparse
(compute-only-used-heads) path against a dense masked reference."""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.models import ModelConfig, MoHConfig, Transformer
from longtrain.models.layers import rope_cos_sin, rope_inv_freq
from longtrain.models.moh import MoHAttention, moh_stats
from longtrain.models.ops import LocalAttention
from longtrain.models.spans import Span


def naive_softmax(q, k, v, *, window=None, softmax_scale=None, cu_seqlens=None):
    """Explicitly masked causal GQA attention (independent reference). q [B,S,H,D], k/v [B,S,Hkv,D]."""
    B, S, H, D = q.shape
    G = H // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * scale
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= (i - j) < window
    if cu_seqlens is not None:
        doc = torch.searchsorted(torch.as_tensor(cu_seqlens), torch.arange(S), right=True)  # host bounds too
        allowed &= doc[:, None] == doc[None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv.double()).to(q.dtype)


class NaiveLocalOps(LocalAttention):
    """Single-process ops (so MoH takes its sparse path) whose softmax is the naive reference."""

    def softmax(self, q, k, v, *, window=None, softmax_scale=None):
        return naive_softmax(q, k, v, window=window, softmax_scale=softmax_scale, cu_seqlens=self.cu_seqlens)


class NaiveGenericOps:
    """Any other ops object (e.g. sequence parallel): MoH must fall back to masking all heads."""

    def __init__(self, cu_seqlens=None):
        self.cu_seqlens = cu_seqlens

    def softmax(self, q, k, v, *, window=None, softmax_scale=None):
        return naive_softmax(q, k, v, window=window, softmax_scale=softmax_scale, cu_seqlens=self.cu_seqlens)


def make_layer(router="learned", n_heads=8, n_kv=4, shared=2, routed=4, window=None, dim=32, head_dim=8,
               seed=0):
    cfg = ModelConfig(vocab_size=64, dim=dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                      moh=MoHConfig(shared_heads=shared, routed_heads=routed, router=router))
    span = Span("window", window) if window else Span("full")
    torch.manual_seed(seed)
    layer = MoHAttention(cfg, 0, span)
    layer.sparse_min_seq = 0  # exercise the sparse path at test sizes
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return cfg, layer


def rope_for(cfg, S):
    return rope_cos_sin(torch.arange(S), rope_inv_freq(cfg.head_dim, cfg.rope_theta))


def run(layer, x, rope, ops):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(x, rope, ops)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    loss = (out * g).sum()
    if layer.last_aux_loss is not None:
        loss = loss + layer.last_aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


CASES = [
    # router, heads, kv, shared, routed, window, packed docs
    ("learned", 8, 4, 2, 4, None, False),
    ("learned", 8, 2, 3, 3, 5, False),     # shared heads split a kv group, window
    ("query_norm", 8, 4, 2, 4, None, True),
    ("query_norm", 6, 6, 0, 2, 7, True),   # no shared heads (MHA), window + packed docs
    ("learned", 4, 1, 1, 2, 16, True),     # MQA, one shared head (gate 1, no W_s)
]


@pytest.mark.parametrize("router,H,Hkv,hs,k,window,docs", CASES)
@pytest.mark.parametrize("block", [4, 16])
def test_sparse_path_equals_dense_masked(router, H, Hkv, hs, k, window, docs, block):
    """The used-heads-only path equals 'compute every head, multiply by gates' (fwd and all grads)."""
    cfg, layer = make_layer(router, H, Hkv, hs, k, window)
    layer.train()
    layer.block_size = block
    S = 37
    x = torch.randn(2, S, cfg.dim)
    rope = rope_for(cfg, S)
    cu = torch.tensor([0, 9, 10, 30, S]) if docs else None
    o_ref, dx_ref, g_ref = run(layer, x, rope, NaiveGenericOps(cu))
    o_sp, dx_sp, g_sp = run(layer, x, rope, NaiveLocalOps(cu))
    assert close(o_sp, o_ref)
    assert close(dx_sp, dx_ref)
    assert g_ref.keys() == g_sp.keys()
    for n in g_ref:
        assert close(g_sp[n], g_ref[n]), n


def close(a, b, tol=1e-5):
    """fp32: max abs error <= tol relative to the reference's largest magnitude (at least 1)."""
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("window,docs", [(None, False), (5, True)])
def test_sparse_path_math_twin(monkeypatch, window, docs):
    """The plain-torch twin of the per-part kernel calls gives the same results."""
    import longtrain.models.moh_sparse as moh_mod

    cfg, layer = make_layer("learned", window=window)
    layer.block_size = 8
    S = 30
    x = torch.randn(1, S, cfg.dim)
    rope = rope_for(cfg, S)
    cu = torch.tensor([0, 11, S]) if docs else None
    o_ref, dx_ref, g_ref = run(layer, x, rope, NaiveGenericOps(cu))
    monkeypatch.setattr(moh_mod, "_FORCE_MATH", True)
    o_sp, dx_sp, g_sp = run(layer, x, rope, NaiveLocalOps(cu))
    assert close(o_sp, o_ref) and close(dx_sp, dx_ref)
    for n in g_ref:
        assert close(g_sp[n], g_ref[n]), n


@pytest.mark.parametrize("router,window", [("learned", None), ("query_norm", 6)])
def test_sparse_path_with_the_real_kernel(router, window):
    """LocalAttention (kernels.attention_block) as ops, docs with a trailing document, vs the naive masked path."""
    cfg, layer = make_layer(router, window=window)
    layer.block_size = 8
    S = 45
    x = torch.randn(2, S, cfg.dim)
    rope = rope_for(cfg, S)
    cu = torch.tensor([0, 13, 14, 40])  # positions 40.. form a trailing document
    o_ref, dx_ref, g_ref = run(layer, x, rope, NaiveGenericOps(torch.tensor([0, 13, 14, 40, S])))
    o_sp, dx_sp, g_sp = run(layer, x, rope, LocalAttention(cu))
    assert close(o_sp, o_ref) and close(dx_sp, dx_ref)
    for n in g_ref:
        assert close(g_sp[n], g_ref[n]), n


@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_exactly_shared_plus_routed_heads_contribute(router):
    cfg, layer = make_layer(router, n_heads=8, n_kv=4, shared=2, routed=3)
    S = 24
    x = torch.randn(1, S, cfg.dim)
    rope = rope_for(cfg, S)
    ops = NaiveLocalOps()
    out = layer(x, rope, ops).detach()
    gates = layer.last_gates[0]
    nz = gates != 0
    assert nz.sum(-1).eq(2 + 3).all()
    assert nz[:, :2].all()  # shared heads always on
    # a head a token did not choose has no influence on that token: perturb its query weights
    t, h = next((t, h) for t in range(S) for h in range(2, 8) if not nz[t, h])
    users = nz[:, h].nonzero().squeeze(1)
    rot, _ = torch.linalg.qr(torch.randn(cfg.head_dim, cfg.head_dim))  # norm-preserving: routing unchanged
    with torch.no_grad():
        rows = slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)
        layer.wq.weight[rows] = rot @ layer.wq.weight[rows]
    out2 = layer(x, rope, ops).detach()
    new_nz = layer.last_gates[0] != 0
    same_route = (new_nz == nz).all(-1)
    assert same_route[t]
    assert (out2[0, t] - out[0, t]).abs().max() <= 1e-6
    changed = [u for u in users.tolist() if same_route[u]]
    assert changed and (out2[0, changed] - out[0, changed]).abs().max() > 1e-4


def test_learned_gate_sums():
    cfg, layer = make_layer("learned", n_heads=8, n_kv=4, shared=3, routed=2)
    x = torch.randn(2, 11, cfg.dim)
    layer(x, rope_for(cfg, 11), NaiveLocalOps())
    g = layer.last_gates.double()
    a = torch.softmax(x.double() @ layer.stage_gate.weight.double().T, -1) * 2  # independent two-stage weights
    assert torch.allclose(a.sum(-1), torch.full_like(a[..., 0], 2.0))
    assert torch.allclose(g[..., :3].sum(-1), 3 * a[..., 0], atol=1e-5)
    assert torch.allclose(g[..., 3:].sum(-1), 2 * a[..., 1], atol=1e-5)
    # routed gates: renormalised top-k router probabilities times k, scaled by a2
    p = torch.softmax(x.double() @ layer.router.weight.double().T, -1)
    top = p.topk(2, -1)
    expect = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True) * 2)
    assert torch.allclose(g[..., 3:], expect * a[..., 1:], atol=1e-5)
    # shared gates: softmax(W_s x) * h_s, scaled by a1
    ps = torch.softmax(x.double() @ layer.shared_gate.weight.double().T, -1) * 3
    assert torch.allclose(g[..., :3], ps * a[..., :1], atol=1e-5)


def test_query_norm_gates_are_topk_of_pre_rope_query_norms():
    cfg, layer = make_layer("query_norm", n_heads=8, n_kv=2, shared=2, routed=4)
    x = torch.randn(1, 19, cfg.dim)
    layer(x, rope_for(cfg, 19), NaiveLocalOps())
    g = layer.last_gates[0]
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    assert g.sum(-1).eq(6).all()
    qn = (x[0] @ layer.wq.weight.T).view(19, 8, cfg.head_dim).norm(dim=-1)[:, 2:]
    chosen = g[:, 2:].bool()
    # every chosen head's norm >= every unchosen head's norm, per token
    assert (qn.masked_fill(~chosen, float("inf")).min(-1).values
            >= qn.masked_fill(chosen, float("-inf")).max(-1).values).all()
    assert not any(p.requires_grad for n, p in layer.named_parameters() if "router" in n)
    assert layer.last_aux_loss is None


def test_aux_loss_closed_form_uniform_and_general():
    cfg, layer = make_layer("learned", n_heads=8, n_kv=4, shared=2, routed=4)
    coef = layer.aux_loss_coef
    assert coef == 0.01
    layer.train()
    x = torch.randn(2, 13, cfg.dim)
    rope = rope_for(cfg, 13)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform router probabilities 1/E
    layer(x, rope, NaiveLocalOps())
    # E * sum_i f_i * (1/E) = sum_i f_i = k
    assert abs(layer.last_aux_loss.item() - coef * 4) <= 1e-7
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    layer(x, rope, NaiveLocalOps())
    p = torch.softmax(x.reshape(-1, cfg.dim).double() @ layer.router.weight.double().T, -1)  # [T, E]
    T, E = p.shape
    f = torch.zeros(E, dtype=torch.float64)
    for t in range(T):
        for i in p[t].topk(4).indices.tolist():
            f[i] += 1.0 / T
    expect = coef * E * float((f * p.mean(0)).sum().detach())
    assert abs(layer.last_aux_loss.item() - expect) <= 1e-6
    layer.eval()
    layer(x, rope, NaiveLocalOps())
    assert layer.last_aux_loss is None


def test_gradients_reach_router_and_match_finite_differences():
    cfg, layer = make_layer("learned", n_heads=4, n_kv=2, shared=1, routed=2)
    layer.double().train()
    S = 9
    x = torch.randn(1, S, cfg.dim, dtype=torch.float64)
    cos, sin = rope_for(cfg, S)
    rope = (cos.double(), sin.double())
    ops = NaiveGenericOps()
    w = torch.randn(1, S, cfg.dim, dtype=torch.float64)

    def loss_fn():
        out = layer(x, rope, ops)
        return (out * w).sum() + 10 * layer.last_aux_loss

    layer.zero_grad()
    loss_fn().backward()
    for name in ("router", "stage_gate"):
        gr = getattr(layer, name).weight.grad
        assert gr is not None and gr.abs().max() > 1e-6, name
        direction = torch.randn_like(gr)
        p = getattr(layer, name).weight
        eps = 1e-6
        with torch.no_grad():
            p += eps * direction
            lp = loss_fn().item()
            p -= 2 * eps * direction
            lm = loss_fn().item()
            p += eps * direction
        fd = (lp - lm) / (2 * eps)
        assert abs(fd - float((gr * direction).sum())) <= 1e-6 * max(1.0, abs(fd)), name


def test_transformer_aux_loss_usage_stats_and_checkpointing():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=8, n_kv_heads=4,
                      attention=["full", "window:6"], moh=MoHConfig(shared_heads=2, routed_heads=4))
    model = Transformer(cfg)
    model.train()
    tokens = torch.randint(0, 50, (2, 30))
    ops = NaiveLocalOps()
    logits = model(tokens, ops=ops)
    aux = model.aux_loss()
    layers = [b.attn for b in model.layers]
    assert all(isinstance(m, MoHAttention) for m in layers)
    assert torch.allclose(aux, sum(m.last_aux_loss for m in layers))
    stats = moh_stats(model)
    assert stats["moh/L0/usage/h0"] == 1.0 and stats["moh/L1/usage/h1"] == 1.0
    routed = [stats[f"moh/L0/usage/h{h}"] for h in range(2, 8)]
    assert abs(sum(routed) - 4.0) <= 1e-5  # each token uses exactly k routed heads
    assert stats["moh/L0/usage_max_over_mean"] >= 1.0
    assert abs(stats["moh/aux_loss"] - aux.item()) <= 1e-6
    loss = logits.float().logsumexp(-1).mean() + aux
    loss.backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    loss2 = model(tokens, ops=ops).float().logsumexp(-1).mean() + model.aux_loss()
    loss2.backward()
    for n, p in model.named_parameters():
        assert (p.grad - g1[n]).abs().max() <= 1e-6, n


def test_sparse_path_bf16_runs_and_is_close():
    cfg, layer = make_layer("learned")
    layer.block_size = 8
    x = torch.randn(1, 40, cfg.dim)
    rope = rope_for(cfg, 40)
    ref = layer(x, rope, NaiveGenericOps()).detach()
    lb = layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    out = lb(xb, rope, NaiveLocalOps())
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    assert (out.float() - ref).abs().max() <= 5e-2 * ref.abs().max()
