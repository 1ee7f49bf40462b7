"""Mesa on whole blocks: exact forward, gradients close to exact, memory saved, and the plumbing
(dedupe, parameters never quantized, checkpointing, state_dict, skip_layers, sequence parallelism)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from longtrain.kernels.mesa import MesaConfig, MesaState, enable_mesa, mesa_scope, saved_bytes_counter
from longtrain.models import Transformer, model_config

B, S = 2, 192


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _tokens(cfg, b=B, s=S, seed=1):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _loss(m, tok, ops=None):
    logits = m(tok, ops=ops)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tok[:, 1:].flatten()), logits


def _grads(m, tok, ops=None):
    m.zero_grad(set_to_none=True)
    loss, logits = _loss(m, tok, ops)
    loss.backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


class _InternalCopyAttention(torch.autograd.Function):
    """Like a ring kernel: saves its own [B,H,S,D] copies (no grad), out and fp32 lse."""

    @staticmethod
    def forward(ctx, q, k, v):
        rep = q.shape[2] // k.shape[2]
        qt = q.transpose(1, 2).contiguous()
        kt = k.repeat_interleave(rep, 2).transpose(1, 2).contiguous()
        vt = v.repeat_interleave(rep, 2).transpose(1, 2).contiguous()
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, True)
        ctx.save_for_backward(qt, kt, vt, out, lse)
        ctx.rep = rep
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        qt, kt, vt, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2).contiguous(), qt, kt, vt, out, lse, 0.0, True)
        b, h, s, d = dk.shape
        dk = dk.view(b, h // ctx.rep, ctx.rep, s, d).sum(2)
        dv = dv.view(b, h // ctx.rep, ctx.rep, s, d).sum(2)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class InternalCopyOps:
    def softmax(self, q, k, v, *, window=None, softmax_scale=None):
        assert window is None
        return _InternalCopyAttention.apply(q, k, v)


def _pair(attention=("full",), n_layers=2, dtype=torch.float32, config=None, seed=0):
    cfg = model_config("tiny", n_layers=n_layers, attention=list(attention))
    torch.manual_seed(seed)
    exact = Transformer(cfg).to(dtype)
    mesa = copy.deepcopy(exact)
    enable_mesa(mesa, config or MesaConfig())
    return cfg, exact, mesa


def _kinds():
    kinds = [pytest.param(("full",), None, id="full"), pytest.param(("window:48",), None, id="window"),
             pytest.param(("full",), "internal", id="full-internal-copies")]
    try:
        import longtrain.models.lightning  # noqa: F401
        import longtrain.kernels.lightning  # noqa: F401

        kinds.append(pytest.param(("full", "lightning"), None, id="lightning"))
    except ImportError:
        kinds.append(pytest.param(("full", "lightning"), None, id="lightning",
                                  marks=pytest.mark.skip(reason="lightning attention not built yet")))
    return kinds


@pytest.mark.parametrize("attention,ops", _kinds())
def test_gradients_close_to_exact_and_forward_identical(attention, ops):
    cfg, exact, mesa = _pair(attention)
    tok = _tokens(cfg)
    ops = InternalCopyOps() if ops == "internal" else None
    l0, g0 = _grads(exact, tok, ops)
    l1, g1 = _grads(mesa, tok, ops)
    assert torch.equal(l0, l1), "Mesa must not change the forward"
    assert set(g0) == set(g1)
    worst = min((_cos(g0[n], g1[n]), n) for n in g0)
    assert worst[0] >= 0.99, worst
    # something was quantized, head-wise for attention tensors; lse and rstd stayed exact
    for layer, rep in mesa.mesa.last_report.items():
        quant = [r for r in rep if r["action"].startswith("quantized")]
        exact_rows = [r for r in rep if r["action"].startswith("exact")]
        assert len(quant) >= 8, rep
        assert any(r["shape"][-1] == 1 for r in exact_rows)  # rstd
        assert all("parameter" in r["action"] for r in exact_rows if len(r["shape"]) == 2
                   and r["shape"][0] in (cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim))
        if mesa.spans[int(layer)].kind != "lightning":
            heads = [r for r in quant if len(r["shape"]) == 4]
            assert heads and all(f"{cfg.n_heads} groups" in r["action"] or f"{cfg.n_kv_heads} groups"
                                 in r["action"] for r in heads), heads
            assert any(r["shape"] == (B, cfg.n_heads, S) for r in exact_rows), "lse must stay exact"


def test_gradients_stay_close_over_steps_with_running_estimates():
    cfg, exact, mesa = _pair()
    opt = torch.optim.SGD(exact.parameters(), lr=0.5)
    for step in range(4):
        mesa.load_state_dict({**exact.state_dict(), **{k: v for k, v in mesa.state_dict().items()
                                                       if k.startswith("mesa.")}})
        tok = _tokens(cfg, seed=10 + step)
        _, g0 = _grads(exact, tok)
        _, g1 = _grads(mesa, tok)
        worst = min(_cos(g0[n], g1[n]) for n in g0)
        assert worst >= 0.99, (step, worst)
        opt.step()
    steps = mesa.mesa.ranges["0"].steps
    assert int(steps[0]) == 4 and int(steps.max()) == 4


def test_bf16_gradients_close_to_exact():
    cfg, exact, mesa = _pair(dtype=torch.bfloat16)
    tok = _tokens(cfg)
    _, g0 = _grads(exact, tok)
    _, g1 = _grads(mesa, tok)
    worst = min((_cos(g0[n], g1[n]), n) for n in g0)
    assert worst[0] >= 0.99, worst


def test_saved_range_covers_activations_that_outgrow_the_running_estimate():
    """A tensor 10x wider than the running estimate: "cover" keeps it within span/255, "ema" saturates."""
    x0 = torch.randn(64, 32)
    for mode in ("cover", "ema"):
        st = MesaState(MesaConfig(stochastic=False, range_mode=mode), layers=1)
        for scale in (1.0, 10.0):  # the first step copies the range of the small tensor
            x = (x0 * scale).requires_grad_()
            with mesa_scope(st, 0):
                y = torch.sin(x * 1.0)  # a leaf that requires grad would count as a parameter
            got = y.grad_fn._saved_self  # what backward would see: the dequantized copy
        err = (got - x.detach()).abs().max().item()
        assert got.shape == x.shape
        width = (x.max() - x.min()).item()
        if mode == "cover":
            assert err <= width / 255 * 1.0001, err
        else:  # the EMA widened only to 0.9 * 1 + 0.1 * 10 of the old range: the tails are clipped
            assert err > 2.0, err
    assert int(st.ranges["0"].steps[0]) == 2


def _text_batches(n, b=2, s=128):
    from longtrain.launcher.data.batches import collate
    from longtrain.launcher.data.sources import load_documents
    from longtrain.launcher.data.tokenizers import build_tokenizer
    from longtrain.testing import PackedCorpus

    corpus = PackedCorpus(load_documents("stdlib", max_documents=20), build_tokenizer("bytes"), s, seed=0)
    return [collate(corpus.batch(i * b, b), False) for i in range(n)]


@pytest.mark.parametrize("mode", ["cover", "ema"])
def test_gradients_stay_close_while_activations_grow_early_in_training(mode):
    """The first steps of real training (AdamW at lr 3e-3 on text) grow the residual stream faster
    than a decay-0.9 running range follows. Measured over 12 steps: global gradient relative error
    cover <= 0.0018, ema up to 0.075; worst cosine of a parameter carrying >= 1 % of the gradient
    norm: cover 1.000, ema 0.39 (its saturation made the tiny recipe train 5.9 % worse). Parameters
    whose gradient nearly vanishes (wq/wk of the upper layers at ~1e-3 of the norm here) are left
    out of the cosine: q/k/v rounding noise dominates their direction (cosine ~0.4 even with cover)."""
    from longtrain.models import lm_loss_sum

    torch.manual_seed(0)
    cfg = model_config("tiny")
    exact = Transformer(cfg)
    exact.init_weights(seed=0)
    mesa = copy.deepcopy(exact)
    enable_mesa(mesa, MesaConfig(range_mode=mode))
    opt = torch.optim.AdamW(exact.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rel_errs, worst = [], []
    for b in _text_batches(12):
        mesa.load_state_dict({**exact.state_dict(), **{k: v for k, v in mesa.state_dict().items()
                                                       if k.startswith("mesa.")}})
        g = []
        for m in (exact, mesa):
            m.zero_grad(set_to_none=True)
            loss, n = lm_loss_sum(m(b["tokens"], b["positions"]), b["labels"])
            (loss / n).backward()
            g.append({k: p.grad.double() for k, p in m.named_parameters()})
        norm = sum((v ** 2).sum() for v in g[0].values()).sqrt()
        rel_errs.append((sum(((g[1][k] - g[0][k]) ** 2).sum() for k in g[0]).sqrt() / norm).item())
        worst.append(min((_cos(g[0][k], g[1][k]), k) for k in g[0] if g[0][k].norm() >= 0.01 * norm))
        torch.nn.utils.clip_grad_norm_(exact.parameters(), 1.0)
        opt.step()
    if mode == "cover":
        assert max(rel_errs) <= 0.01, rel_errs
        assert min(worst)[0] >= 0.99, worst
    else:  # the test can tell: the running range alone fails both bounds
        assert max(rel_errs) > 0.03 and min(worst)[0] < 0.9, (rel_errs, worst)


def _block_bytes(model, tok, autocast=False):
    with saved_bytes_counter(model.layers) as c:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = _loss(model, tok)
    del loss
    return c.as_dict()


@pytest.mark.parametrize("setting,floor", [("fp32", 0.30), ("bf16", 0.55), ("autocast-bf16", 0.55)])
def test_saved_activation_bytes(setting, floor):
    dtype = torch.bfloat16 if setting == "bf16" else torch.float32
    cfg, exact, mesa = _pair(n_layers=2, dtype=dtype)
    tok = _tokens(cfg, b=1, s=512)
    a = _block_bytes(exact, tok, autocast=setting == "autocast-bf16")
    b = _block_bytes(mesa, tok, autocast=setting == "autocast-bf16")
    assert a["quantized_bytes"] == 0 and b["quantized_bytes"] > 0
    assert a["param_bytes"] == b["param_bytes"]  # parameters are never quantized
    ratio = b["activation_bytes"] / a["activation_bytes"]
    assert ratio <= floor, (setting, ratio, a, b)


def test_activation_checkpointing_steps_aside():
    cfg, exact, mesa = _pair()
    exact.activation_checkpointing = mesa.activation_checkpointing = True
    tok = _tokens(cfg)
    _, g0 = _grads(exact, tok)
    with saved_bytes_counter() as c:
        _, g1 = _grads(mesa, tok)
    assert c.n_quantized == 0  # checkpointed blocks are recomputed exactly, nothing quantized
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


class _TinyBlock(nn.Module):
    def __init__(self, d=64, f=160):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        b, s, d = x.shape
        a = F.scaled_dot_product_attention(*(t.view(b, s, 4, d // 4).transpose(1, 2) for t in (q, k, v)),
                                           is_causal=True)
        h = x + a.transpose(1, 2).reshape(b, s, d)
        return h + self.down(F.silu(self.up(h)))


def test_scope_outside_checkpoint_and_reentrant_checkpoint():
    blk = _TinyBlock()
    x0 = torch.randn(2, 64, 64)
    st = MesaState(MesaConfig(), layers=1)
    ref = []
    x = (x0 * 1).requires_grad_()
    blk(x).square().sum().backward()
    ref = [p.grad.clone() for p in blk.parameters()]
    for reentrant in (False, True):
        blk.zero_grad()
        x = (x0 * 1).requires_grad_()
        with mesa_scope(st, 0):
            y = checkpoint(blk, x, use_reentrant=reentrant)
        y.square().sum().backward()
        for p, r in zip(blk.parameters(), ref):
            assert _cos(p.grad, r) > 0.999


def test_dedupe_autocast_copies_and_views():
    blk = _TinyBlock()
    x = torch.randn(2, 64, 64) * 1.0
    st = MesaState(MesaConfig(), layers=1)
    for autocast in (False, True):
        with saved_bytes_counter() as c, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with mesa_scope(st, 0) as run:
                y = blk(x.requires_grad_() * 1.0)
        acts = [r for r in run.report if not r["action"].startswith("exact")]
        # x is input to three Linears (autocast: three bf16 copies of it) -> quantized once
        first = [r for r in acts if r["shape"] in ((2, 64, 64), (128, 64))][:3]
        assert [r["action"].split(" ")[0] for r in first] == ["quantized", "shared", "shared"], acts
        assert c.n_quantized == sum(r["action"].startswith("quantized") for r in acts)
        y.float().sum().backward()


def test_saved_views_round_trip_with_their_strides():
    st = MesaState(MesaConfig(stochastic=False), layers=1)
    base = torch.randn(2, 32, 4, 16, requires_grad=True) * 1.0
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a.sum() + b.sum()

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            seen["a"], seen["b"] = a, b
            return torch.zeros_like(a), torch.zeros_like(b)

    with mesa_scope(st, 0) as run:
        out = Probe.apply(base.transpose(1, 2), base[:, :16])  # a dense view and a gapped slice
    out.backward()
    assert seen["a"].shape == (2, 4, 32, 16) and seen["a"].stride() == base.transpose(1, 2).stride()
    for got, want in ((seen["a"], base.transpose(1, 2)), (seen["b"], base[:, :16])):
        span = (want.max() - want.min()).item()
        assert (got - want).abs().max().item() <= span / 255
    assert [r["action"].split(" ")[0] for r in run.report] == ["quantized", "shared"]


def test_state_dict_roundtrip_eval_and_skip_layers():
    cfg, _, mesa = _pair(n_layers=4, config=MesaConfig(skip_layers=(0, -1)))
    tok = _tokens(cfg)
    _grads(mesa, tok)
    assert set(mesa.mesa.last_report) == {"1", "2"}
    sd = mesa.state_dict()
    assert "mesa.ranges.1.shift" in sd and int(sd["mesa.ranges.1.steps"][0]) == 1
    fresh = Transformer(cfg)
    enable_mesa(fresh, MesaConfig(skip_layers=(0, -1)))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.mesa.ranges["1"].span, mesa.mesa.ranges["1"].span)
    lazy = MesaState(MesaConfig())  # no layers declared: created from the checkpoint
    lazy.load_state_dict({k[len("mesa."):]: v for k, v in sd.items() if k.startswith("mesa.")})
    assert torch.equal(lazy.ranges["2"].shift, mesa.mesa.ranges["2"].shift)
    mesa.eval()
    before = mesa.mesa.ranges["1"].span.clone()
    _grads(mesa, _tokens(cfg, seed=5))
    assert torch.equal(mesa.mesa.ranges["1"].span, before)  # eval: estimates are read-only
    assert enable_mesa(mesa, MesaConfig(enabled=False)) is None and not hasattr(mesa, "mesa")
    with pytest.raises(ValueError, match="mesa.bits"):
        MesaConfig(bits=3).validate()


def test_too_many_saved_tensors_is_a_clear_error():
    blk = _TinyBlock()
    st = MesaState(MesaConfig(slots=2), layers=1)
    with pytest.raises(RuntimeError, match="raise MesaConfig.slots"):
        with mesa_scope(st, 0):
            blk(torch.randn(2, 64, 64, requires_grad=True) * 1.0)


# --------------------------------------------------------------------------- sequence parallel


def _sp_worker(rank, world, impl):
    import torch.distributed as dist

    from longtrain.parallel import shard_positions, shard_sequence
    from longtrain.parallel.ops import SequenceParallelOps

    torch.manual_seed(0)
    cfg = model_config("tiny", n_layers=2)
    model = Transformer(cfg)
    enable_mesa(model, MesaConfig())
    tok = _tokens(cfg, b=1, s=256)
    labels = torch.cat([tok[:, 1:], torch.full((1, 1), -100)], dim=1)
    loc_tok, loc_lab = shard_sequence(tok, None, dim=1), shard_sequence(labels, None, dim=1)
    pos = shard_positions(tok.shape[1], None)
    logits = model(loc_tok, positions=pos, ops=SequenceParallelOps(None, impl=impl))
    loss = F.cross_entropy(logits.flatten(0, 1), loc_lab.flatten(), ignore_index=-100, reduction="sum")
    (loss / (tok.shape[1] - 1)).backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        grads[n] = g
    n_quant = sum(r["action"].startswith("quantized") for rep in model.mesa.last_report.values() for r in rep)
    return grads, n_quant


@pytest.mark.parametrize("impl", ["ring", "tokenring"])
def test_sp2_gradients_close_to_exact(impl):
    pytest.importorskip("longtrain.parallel.sp_attention", reason="sequence-parallel attention not built yet")
    from longtrain.testing import run_distributed

    torch.manual_seed(0)
    cfg = model_config("tiny", n_layers=2)
    ref = Transformer(cfg)
    tok = _tokens(cfg, b=1, s=256)
    _, g0 = _grads(ref, tok)
    g1, n_quant = run_distributed(_sp_worker, 2, impl)[0]
    assert n_quant >= 16  # both layers really saved quantized activations
    worst = min((_cos(g0[n], g1[n]), n) for n in g0)
    assert worst[0] >= 0.99, worst


@pytest.mark.parametrize("bits,min_cos,max_ratio", [(4, 0.8, 0.16), (2, 0.2, 0.09)])
def test_fewer_bits_save_less_and_stay_correlated(bits, min_cos, max_ratio):
    """mesa.bits < 8: packed codes shrink the saved bytes (8-bit: 0.263 of fp32 here), gradients get
    noisier but keep the exact direction on average. Measured: 4 bits cosine 0.863 / ratio 0.139,
    2 bits 0.276 / 0.078 (the forward is unchanged in every case)."""
    cfg, exact, mesa = _pair(("full",), config=MesaConfig(bits=bits))
    tok = _tokens(cfg)
    l0, g0 = _grads(exact, tok)
    l1, g1 = _grads(mesa, tok)
    assert torch.equal(l0, l1)
    worst = min((_cos(g0[n], g1[n]), n) for n in g0)
    assert min_cos <= worst[0] < 0.99, worst  # < 0.99: fewer bits really were used
    cfg, exact, mesa = _pair(n_layers=2, config=MesaConfig(bits=bits))
    tok = _tokens(cfg, b=1, s=512)
    ratio = _block_bytes(mesa, tok)["activation_bytes"] / _block_bytes(exact, tok)["activation_bytes"]
    assert ratio <= max_ratio, ratio
