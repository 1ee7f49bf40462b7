"""HF LLaMA import/export: logits parity with transformers' LlamaForCausalLM (models built and
saved by transformers in a temp dir, no downloads), bit-exact round trips, MoH conversion."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longtrain.models import MoHConfig  # noqa: E402
from longtrain.models.hf import (hf_model_config, hf_tokenizer_path, load_hf_checkpoint,  # noqa: E402
                                 save_hf_checkpoint)
from longtrain.models.moh import MoHAttention  # noqa: E402

CASES = {
    # GQA + llama3 rope scaling (original context 16 < test length 40, so the scaling matters), sharded
    "gqa_llama3": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, shard=True,
                       rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # tied embeddings + linear scaling, MHA, explicit head_dim != hidden/heads
    "tied_linear": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, head_dim=12,
                        shard=False, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # MQA, default rope
    "mqa_default": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, shard=False,
                        rope_scaling=None),
}


def make_hf(tmp_path, case: str):
    """A tiny random LlamaForCausalLM saved by transformers; weights scaled so attention is not uniform."""
    kw = dict(CASES[case])
    shard = kw.pop("shard")
    scaling = kw.pop("rope_scaling")
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500.0,
                      rope_scaling=scaling, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms: not all ones, so a swapped norm would show
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    out = tmp_path / case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out, max_shard_size="20KB" if shard else "5GB")
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    return model, out


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers_and_round_trips(tmp_path, case):
    hf, path = make_hf(tmp_path, case)
    if case == "gqa_llama3":
        assert (path / "model.safetensors.index.json").is_file()  # really sharded
    ours = load_hf_checkpoint(path).eval()
    cfg = ours.cfg
    assert (cfg.n_heads, cfg.n_kv_heads) == (hf.config.num_attention_heads, hf.config.num_key_value_heads)
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    if cfg.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        logits = ours(tokens)
    ref = hf_logits(hf, tokens)
    assert float((logits - ref).abs().max()) <= 1e-4
    assert float(ref.std()) > 0.5  # a meaningful comparison, not two near-zero tensors

    # export -> import is bit-exact
    out = save_hf_checkpoint(ours, tmp_path / "export", tokenizer_path=path)
    assert (out / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    back = load_hf_checkpoint(out).eval()
    assert back.cfg == ours.cfg
    sd0, sd1 = ours.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    with torch.no_grad():
        assert torch.equal(back(tokens), logits)

    # our export loads in transformers with the same logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf2 = LlamaForCausalLM.from_pretrained(out).eval()
    assert float((hf_logits(hf2, tokens) - logits).abs().max()) <= 1e-4


def test_config_mapping_and_tokenizer_path(tmp_path):
    _, path = make_hf(tmp_path, "gqa_llama3")
    cfg = hf_model_config(path)
    assert (cfg.dim, cfg.n_layers, cfg.ffn_dim, cfg.head_dim, cfg.vocab_size) == (32, 2, 48, 8, 97)
    assert cfg.rope_theta == 500.0 and cfg.max_seq_len == 128 and cfg.norm_eps == 1e-5
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    assert hf_tokenizer_path(path) == path / "tokenizer.json"
    assert hf_tokenizer_path(tmp_path) is None
    # transformers 4.x style keys
    legacy = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "rope_theta": 1e6,
              "rope_scaling": {"type": "linear", "factor": 8.0}}
    c = hf_model_config(legacy)
    assert c.rope_theta == 1e6 and c.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert c.n_kv_heads == 2 and c.head_dim == 8 and not c.tie_embeddings
    with pytest.raises(ValueError, match="yarn"):
        hf_model_config({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="attention_bias"):
        hf_model_config({**legacy, "attention_bias": True})


def test_moh_conversion_all_heads_equals_dense(tmp_path):
    """query_norm MoH with shared + routed = all heads is the dense model exactly."""
    hf, path = make_hf(tmp_path, "gqa_llama3")
    moh = load_hf_checkpoint(path, moh=MoHConfig(shared_heads=2, routed_heads=2, router="query_norm")).eval()
    tokens = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert float((moh(tokens) - hf_logits(hf, tokens)).abs().max()) <= 1e-4


@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_moh_conversion_export_round_trip(tmp_path, router):
    hf, path = make_hf(tmp_path, "gqa_llama3")
    mcfg = MoHConfig(shared_heads=1, routed_heads=2, router=router)
    model = load_hf_checkpoint(path, moh=mcfg)
    layers = [b.attn for b in model.layers]
    assert all(isinstance(m, MoHAttention) for m in layers)
    # dense weights are the HF ones, untouched
    assert torch.equal(model.layers[1].attn.wq.weight, hf.model.layers[1].self_attn.q_proj.weight)
    if router == "learned":
        assert all(float(m.stage_gate.weight.detach().abs().max()) == 0.0 for m in layers)
        assert all(float(m.router.weight.detach().std()) > 0 for m in layers)
        again = load_hf_checkpoint(path, moh=mcfg)  # seeded router init
        assert torch.equal(again.layers[0].attn.router.weight, layers[0].router.weight)
    # train one step so the router weights are not at their init, then export and reload
    model.train()
    tokens = torch.randint(0, 97, (2, 24))
    loss = model(tokens).logsumexp(-1).mean()
    if model.aux_loss() is not None:
        loss = loss + model.aux_loss()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    out = save_hf_checkpoint(model, tmp_path / "moh_export")
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["moh"] == {"shared_heads": 1, "routed_heads": 2, "router": router, "aux_loss_coef": 0.01}
    back = load_hf_checkpoint(out)
    assert back.cfg.moh == mcfg
    sd0, sd1 = model.state_dict(), back.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    model.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), back(tokens))
    with pytest.raises(ValueError, match="already MoH"):
        load_hf_checkpoint(out, moh=MoHConfig(shared_heads=2, routed_heads=1))


def test_bf16_round_trip_is_bit_exact(tmp_path):
    _, path = make_hf(tmp_path, "tied_linear")
    model = load_hf_checkpoint(path, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    out = save_hf_checkpoint(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_hf_checkpoint(out, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_mixed_span_plan_survives_export(tmp_path):
    _, path = make_hf(tmp_path, "mqa_default")
    model = load_hf_checkpoint(path)
    model.cfg.attention = ["full", "window:8"]
    out = save_hf_checkpoint(model, tmp_path / "spans")
    # the plan is exported only if the model's spans differ from all-full: rebuild with the plan
    from longtrain.models import Transformer

    m2 = Transformer(model.cfg)
    m2.load_state_dict(model.state_dict())
    out = save_hf_checkpoint(m2, tmp_path / "spans2")
    assert json.loads((out / "config.json").read_text())["longtrain_attention"] == ["full", "window:8"]
    assert [str(s) for s in load_hf_checkpoint(out).spans] == ["full", "window:8"]


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    _, path = make_hf(tmp_path, "mqa_default")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_checkpoint(path)


def test_init_with_window_plan_matches_transformers_with_window_mask(tmp_path):
    """Continue-tuning a LLaMA as a mixed-span model: the HF weights with every layer `window:W` equal
    transformers' LlamaForCausalLM given the same sliding-window mask (fp32, 1e-4); lightning is refused."""
    hf, path = make_hf(tmp_path, "gqa_llama3")
    T, W = 40, 7
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(3))
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < W)  # W keys, own token included
    mask = torch.zeros(T, T).masked_fill(~allowed, float("-inf")).expand(2, 1, T, T)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask).logits.float()
        dense_ref = hf(tokens).logits.float()
    ours = load_hf_checkpoint(path, attention=[f"window:{W}"]).eval()
    assert [str(s) for s in ours.spans] == [f"window:{W}"] * 2
    with torch.no_grad():
        got = ours(tokens).float()
    assert (ref - dense_ref).abs().max() > 1e-2  # the window matters at this length
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # a window wider than the sequence is full attention
    with torch.no_grad():
        wide = load_hf_checkpoint(path, attention=["full", f"window:{T}"]).eval()(tokens).float()
    torch.testing.assert_close(wide, dense_ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="lightning layers have no weights"):
        load_hf_checkpoint(path, attention=["full", "lightning"])
