"""Mesa inside the recomputed layer (kernels/mesa/layers.mesa_checkpoint): a checkpointed Mesa layer's
recompute saves what backward needs in 8 bits, as a plain Mesa layer does. References: the same block
under `mesa_scope` without checkpointing (same quantizer, same fresh running ranges: gradients equal
to 1e-6, saved records byte for byte), exact checkpointing (forward bitwise)."""

from __future__ import annotations

import copy

import pytest
import torch

from longtrain.kernels.mesa import MesaConfig, enable_mesa, saved_bytes_counter
from longtrain.kernels.mesa.layers import mesa_checkpoint
from longtrain.models import ModelConfig, Transformer
from longtrain.models.layers import rope_cos_sin
from longtrain.models.ops import LocalAttention

CFG = dict(vocab_size=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256)


def _models(heads: int = 0):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**CFG))
    if heads:
        m.set_attn_head_chunk(heads)
    a, b = m, copy.deepcopy(m)
    sa = enable_mesa(a, MesaConfig(stochastic=False))
    sb = enable_mesa(b, MesaConfig(stochastic=False))
    return (a, sa), (b, sb)


def _block_grads(model, x, run):
    """Gradients of a seeded random projection of block 0's output, by `run(block, x, rope, ops)`."""
    block = model.layers[0]
    S = x.shape[1]
    rope = rope_cos_sin(torch.arange(S), model.inv_freq)
    x = x.clone().requires_grad_(True)
    y = run(block, x, rope, LocalAttention())
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    with saved_bytes_counter() as counted:
        (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads, counted


@pytest.mark.parametrize("heads", [0, 2])
def test_recompute_saves_what_a_plain_mesa_layer_saves(heads):
    """The checkpointed block's recompute quantizes the tensors a plain Mesa block quantizes, with
    the same ranges: output bitwise, gradients to 1e-6 (fp32), and the records the recompute held
    (counted while backward ran) are the plain block's records, byte for byte. With head groups of
    2 (nested checkpoints) too."""
    (a, sa), (b, sb) = _models(heads)
    x = torch.randn(2, 64, CFG["dim"], generator=torch.Generator().manual_seed(1))
    with saved_bytes_counter() as plain_fwd:
        ya, gxa, ga, _ = _block_grads(a, x, lambda blk, *args: blk(*args))
    yb, gxb, gb, rec = _block_grads(b, x, lambda blk, *args: mesa_checkpoint(sb, 0, blk, *args))
    assert torch.equal(ya, yb)
    torch.testing.assert_close(gxb, gxa, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-6, atol=1e-6, msg=n)
    assert rec.quantized_bytes > 0 and rec.n_quantized == plain_fwd.n_quantized
    assert rec.quantized_bytes == plain_fwd.quantized_bytes
    assert rec.exact_bytes <= plain_fwd.exact_bytes
    report = sb.last_report["0"]
    assert any(r["action"].startswith("quantized") for r in report)


def test_recompute_differs_from_exact_checkpointing_only_in_backward():
    """Against torch's checkpoint without Mesa: the same forward (bitwise), gradients those of 8-bit
    saved activations (cosine >= 0.999, not equal: the 8-bit path really ran)."""
    (a, _), (b, sb) = _models()
    a.mesa_scope = None
    for blk in a.layers:
        blk.mesa_scope = None
    x = torch.randn(2, 64, CFG["dim"], generator=torch.Generator().manual_seed(2))
    ck = torch.utils.checkpoint.checkpoint
    ya, _, ga, _ = _block_grads(a, x, lambda blk, *args: ck(blk, *args, use_reentrant=False))
    yb, _, gb, _ = _block_grads(b, x, lambda blk, *args: mesa_checkpoint(sb, 0, blk, *args))
    assert torch.equal(ya, yb)
    cos = min(torch.nn.functional.cosine_similarity(ga[n].flatten(), gb[n].flatten(), 0).item() for n in ga)
    assert cos > 0.999, cos
    assert any(not torch.equal(ga[n], gb[n]) for n in ga)


def test_recompute_replays_rng_and_autocast():
    """Dropout draws the forward's mask again, and an autocast forward is recomputed under autocast
    (torch.utils.checkpoint's contract): gradients equal the plain Mesa scope's."""
    from longtrain.kernels.mesa import MesaState, mesa_scope

    lin = torch.nn.Linear(64, 64)
    x = torch.randn(4, 32, 64)

    def fn(t):
        return torch.nn.functional.dropout(lin(t).relu(), 0.5, training=True)

    def grads(run):
        lin.zero_grad()
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = run(xx)
        torch.manual_seed(99)  # backward must not depend on the RNG's state by then
        y.float().sum().backward()
        return y.detach(), xx.grad, lin.weight.grad.clone()

    def plain(t):
        with mesa_scope(MesaState(MesaConfig(stochastic=False), [0]), 0):
            return fn(t)

    ref = grads(plain)
    got = grads(lambda t: mesa_checkpoint(MesaState(MesaConfig(stochastic=False), [0]), 0, fn, t))
    assert ref[0].dtype == got[0].dtype == torch.bfloat16
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_a_second_backward_is_refused_in_one_line():
    from longtrain.kernels.mesa import MesaState

    state = MesaState(MesaConfig(), [0])
    lin = torch.nn.Linear(32, 32)
    y = mesa_checkpoint(state, 0, lambda t: lin(t).relu(), torch.randn(8, 16, 32, requires_grad=True))
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="unpacked twice"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["dense", "moh", "lightning+window"])
def test_mesa_full_model_uses_the_8bit_recompute(kind):
    """With mesa.enabled and 'full', every layer's recompute in backward holds Mesa records (counted
    while backward runs; exact checkpointing holds none a counter sees), for MoH and lightning / window
    layers too; the loss is exact checkpointing's, bitwise, and the gradients within cosine 0.999."""
    from longtrain.models import MoHConfig

    extra = {"dense": {}, "moh": {"moh": MoHConfig(shared_heads=1, routed_heads=2, router="learned")},
             "lightning+window": {"attention": ["lightning", "window:16"]}}[kind]
    out = []
    for mesa in (False, True):
        torch.manual_seed(0)
        m = Transformer(ModelConfig(**CFG, **extra))
        if mesa:
            enable_mesa(m, MesaConfig(stochastic=False), inputs=True)
        m.activation_checkpointing = "full"
        tok = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(4))
        loss = m(tok, labels=tok)
        with saved_bytes_counter() as c:
            loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, c))
    (l0, g0, c0), (l1, g1, c1) = out
    assert c0.n_quantized == 0 and c1.n_quantized >= 4 * CFG["n_layers"], c1.as_dict()
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    cos = min(torch.nn.functional.cosine_similarity(g0[n].flatten(), g1[n].flatten(), 0).item() for n in g0)
    # MoH: the recompute routes from the decoded 8-bit input, which picks other heads for tokens whose
    # router scores nearly tie (router-gradient cosine 0.9957 with the exact recompute of the inputs alone)
    assert cos > (0.99 if kind == "moh" else 0.999), cos
