"""Mesa on the long-sequence path: checkpointed layer inputs stored in 8 bits (kernels/offload.py
InputStore + kernels/mesa MesaInputCodec), on the device ('full', 'every:N') or in host memory
('offload'). References: the exact checkpointed model (same forward, bitwise), the codec's own
quantization bound, and the bytes the store holds."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from longtrain.kernels.mesa import MesaConfig, MesaState, enable_mesa
from longtrain.kernels.mesa.layers import MesaInputCodec, input_key
from longtrain.kernels.offload import InputStore
from longtrain.models import ModelConfig, Transformer

CFG = dict(vocab_size=300, dim=128, n_layers=4, n_heads=4, n_kv_heads=2)


def _pair(policy: str, mesa_inputs: bool, dtype=torch.float32, **mesa):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**CFG)).to(dtype)
    if mesa_inputs:
        enable_mesa(m, MesaConfig(**mesa), inputs=True)
    m.activation_checkpointing = policy
    return m


def _step(m, seed=1, S=128):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, 300, (2, S), generator=g)
    lab = torch.randint(0, 300, (2, S), generator=g)
    loss = m(tok, labels=lab)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_codec_round_trip_within_one_quantization_step():
    """Decoded = x within one code step per element: rows scaled to absmax 1, 255 levels over each
    group's range (<= 2), times the row's scale (bf16: +0.4 %), stochastic rounding (1 step)."""
    state = MesaState(MesaConfig(), [input_key(0)])
    codec = MesaInputCodec(state)
    x = torch.randn(2, 64, 256) * torch.logspace(-2, 2, 64).view(1, 64, 1)  # tokens of very different size
    x[0, 3, 7] = 500.0  # an outlier channel in one token
    payload, meta = codec.encode(0, x)
    y = codec.decode(payload, meta)
    assert y.shape == x.shape and y.dtype == x.dtype
    row = x.abs().amax(-1, keepdim=True)
    assert ((y - x).abs() <= row * (2.0 / 255 * 1.01 + 0.004)).all()
    assert payload["codes"].dtype == torch.uint8 and payload["codes"].numel() == x.numel()
    # a skipped layer's input stays exact
    skip = MesaInputCodec(MesaState(MesaConfig(skip_layers=(0,)), [input_key(0)]))
    p2, m2 = skip.encode(0, x)
    assert torch.equal(skip.decode(p2, m2), x)


@pytest.mark.parametrize("policy", ["full", "offload", "every:2"])
def test_8bit_inputs_forward_exact_gradients_close(policy):
    """The forward is the exact model's, bitwise (the layer runs on its real input); gradients are
    the recompute at the decoded input: per-parameter cosine >= 0.999 vs exact checkpointing."""
    la, ga = _step(_pair(policy, False))
    lb, gb = _step(_pair(policy, True, stochastic=False))
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    worst = min(torch.nn.functional.cosine_similarity(ga[n].flatten(), gb[n].flatten(), 0).item() for n in ga)
    assert worst > 0.999, worst
    assert any(not torch.equal(ga[n], gb[n]) for n in ga)  # the 8-bit path really ran


def test_without_mesa_inputs_checkpointing_is_bitwise_unchanged():
    """mesa off: 'full' / 'offload' / 'every:2' give the gradients of no checkpointing, bitwise."""
    l0, g0 = _step(_pair("none", False))
    for policy in ("full", "offload", "every:2"):
        l1, g1 = _step(_pair(policy, False))
        assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0), policy


def test_offloaded_8bit_inputs_take_half_the_host_bytes_of_bf16():
    """Acceptance: host bytes held for offloaded inputs, read from the store, <= 0.55x the bf16
    'offload' figure (an exact bf16 model's store): 1 byte per element + 2 per token + the ranges."""
    bf16 = _pair("offload", False, dtype=torch.bfloat16)
    _step(bf16)
    q = _pair("offload", True)
    _step(q)
    exact_b, int8_b = bf16.offload_store.host_bytes, q.offload_store.host_bytes
    assert exact_b == CFG["n_layers"] * 2 * 128 * CFG["dim"] * 2
    assert int8_b <= 0.55 * exact_b, (int8_b, exact_b)
    assert q.offload_store.puts == q.offload_store.takes == CFG["n_layers"]


def test_full_with_8bit_inputs_frees_the_exact_inputs():
    """'full' + Mesa: checkpoint holds the codes, not the layer inputs (freed after the forward);
    the device store holds 1/4 of their fp32 bytes and lets go of each in backward."""
    m = _pair("full", True)
    refs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))
             for layer in m.layers]
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, 300, (2, 128), generator=g)
    loss = m(tok, labels=tok)
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    store = m.input_stores["device"]
    fp32 = CFG["n_layers"] * 2 * 128 * CFG["dim"] * 4
    assert store.stored_bytes <= 0.27 * fp32 and store.host_bytes == 0
    loss.backward()
    for h in hooks:
        h.remove()
    assert store.stored_bytes == 0 and store.takes == CFG["n_layers"]


def test_input_ranges_are_state_and_travel_with_the_model():
    m = _pair("full", True)
    _step(m)
    keys = [k for k in m.state_dict() if ".ranges.input" in k]
    assert len(keys) == 4 * CFG["n_layers"]  # shift, span, steps, groups per layer
    assert int(m.mesa.ranges[input_key(0)].steps[0]) == 1  # updated once, in train mode
    fresh = _pair("full", True)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.mesa.ranges[input_key(2)].span, m.mesa.ranges[input_key(2)].span)
    # no checkpointing: no input estimates (old checkpoints keep their keys)
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**CFG))
    enable_mesa(plain, MesaConfig())
    assert not any(".ranges.input" in k for k in plain.state_dict()) and plain.input_codec is None


def test_store_rejects_an_unknown_place():
    with pytest.raises(ValueError, match="place"):
        InputStore("disk")


ENGINE_CASES = [("fsdp2", "tokenring", "offload"), ("ddp", "ulysses", "full"), ("deepspeed", "ring", "every:2")]


@pytest.mark.parametrize("engine,impl,policy", ENGINE_CASES)
def test_8bit_inputs_train_under_every_engine_and_sp_impl(tmp_path, engine, impl, policy):
    """2 ranks, sp = 2, packed documents, a window layer, 2 accumulation steps: the first step's loss
    equals exact checkpointing bitwise (8-bit inputs change only backward), later ones stay within 1 %."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    from helpers import engine_matrix_sets, losses, run_train

    sets = engine_matrix_sets(engine, impl, policy)
    if policy == "every:2":  # layers 1 and 3 are plain: Mesa quantizes their activations as before
        sets.append("mesa.skip_layers=[1,3]")
    run_train(tmp_path / "exact", *sets)
    run_train(tmp_path / "mesa", *sets, "mesa.enabled=true")
    a, b = losses(tmp_path / "exact"), losses(tmp_path / "mesa")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[1] == b[1]
    assert all(abs(b[s] - a[s]) / a[s] < 0.01 for s in (2, 3, 4)), (a, b)
    assert any(a[s] != b[s] for s in (2, 3, 4))


@pytest.mark.parametrize("bits", [8, 4])
def test_blocks_of_tokens_give_the_whole_tensors_codes(monkeypatch, bits):
    """Encode / decode (and the torch quantizer under them) work block by block of tokens so their fp32
    temporaries are a constant: with tiny blocks the codes, ranges and decoded values equal one block's
    (round to nearest), for packed 4-bit codes too."""
    import longtrain.kernels.mesa.quant as quant

    x = torch.randn(3, 50, 64) * torch.logspace(-1, 1, 50).view(1, 50, 1)
    whole = MesaInputCodec(MesaState(MesaConfig(stochastic=False, bits=bits), [input_key(0)]))
    p0, m0 = whole.encode(0, x)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 7 * 64)  # 7 tokens per block: 22 blocks, the last short
    assert len(quant.row_blocks(150, 64)) == 22
    blocked = MesaInputCodec(MesaState(MesaConfig(stochastic=False, bits=bits), [input_key(0)]))
    p1, m1 = blocked.encode(0, x)
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert torch.equal(blocked.decode(p1, m1), whole.decode(p0, m0))
    v = torch.randn(40, 4, 16)
    q0 = quant.quantize_codes_torch(v, torch.zeros(4), torch.ones(4) * 50, 4, 16, 8, False)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 1 << 22)
    assert torch.equal(q0, quant.quantize_codes_torch(v, torch.zeros(4), torch.ones(4) * 50, 4, 16, 8, False))
