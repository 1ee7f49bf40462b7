"""KV-cache decoding (longtrain.models.generate) against recomputing the whole sequence, for every
attention kind the model trains (full, sliding window, MoH, lightning, mixed plans, an HF folder);
sampling options; the context limit; the `generate` command line (in process)."""

from __future__ import annotations

import pytest
import torch

from longtrain.errors import ConfigError
from longtrain.models import ModelConfig, MoHConfig, Transformer
from longtrain.models.generate import KVCache, decode_step, forward_cached, generate, prefill, sample_next

VOCAB, PROMPT, NEW = 97, 20, 32
MAX_DIFF: dict[str, float] = {}  # measured cache-vs-recompute logit differences (printed with -s)

CASES = {
    "full": dict(attention=["full"]),
    "window": dict(attention=["window:5"]),  # window << prompt + 32 new tokens
    "moh": dict(attention=["full", "window:6"], moh=MoHConfig(shared_heads=1, routed_heads=2)),
    "moh_query_norm": dict(attention=["full"], moh=MoHConfig(shared_heads=2, routed_heads=1, router="query_norm")),
    "lightning": dict(attention=["lightning"]),
    "mixed": dict(n_layers=4, attention=["lightning", "window:5", "full", "window:3"]),
    "mixed_moh": dict(n_layers=3, attention=["lightning", "window:4", "full"],
                      moh=MoHConfig(shared_heads=1, routed_heads=2)),
}


def randomize(model: Transformer, seed: int = 0) -> Transformer:
    """Weights large enough that attention is far from uniform and logits spread (std ~0.8)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny(case: str, **extra) -> Transformer:
    kw = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    kw.update(CASES[case])
    kw.update(extra)
    torch.manual_seed(0)
    return randomize(Transformer(ModelConfig(**kw)))


def prompt_of(batch: int = 2, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cache_vs_recompute(model: Transformer, prompt: torch.Tensor, new: int = NEW) -> tuple[float, torch.Tensor]:
    """Greedy decoding with the cache, checked at every step against model(whole sequence)[:, -1]:
    returns (max |logit difference|, the generated tokens)."""
    logits, cache = prefill(model, prompt)
    seq, worst = prompt, 0.0
    for _ in range(new):
        ref = model(seq)[:, -1]
        assert ref.std() > 0.5  # a meaningful comparison
        worst = max(worst, float((logits - ref).abs().max()))
        nxt = logits.argmax(-1)
        assert torch.equal(nxt, ref.argmax(-1))
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        logits = decode_step(model, cache, nxt)
    assert cache.seen == seq.shape[1]
    return worst, seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("case", list(CASES))
def test_cache_matches_recompute(case):
    model = tiny(case)
    prompt = prompt_of()
    worst, tokens = cache_vs_recompute(model, prompt)
    # fp64: the same decoding with rounding out of the way; the cache is exact, not merely close
    worst64, tokens64 = cache_vs_recompute(model.double(), prompt)
    MAX_DIFF[case] = worst
    print(f"{case}: max |logit diff| fp32 {worst:.2e}, fp64 {worst64:.2e}")
    assert worst <= 1e-5, worst
    assert worst64 <= 1e-12, worst64
    assert torch.equal(tokens64, tokens)
    assert torch.equal(generate(model.float(), prompt, NEW), tokens)  # the public entry point, same tokens


def test_window_cache_is_bounded():
    model = tiny("window")
    _, cache = prefill(model, prompt_of())
    for _ in range(5):
        decode_step(model, cache, torch.zeros(2, dtype=torch.long))
    assert [k.shape[1] for k in cache._k] == [4, 4]  # window:5 -> the last 4 keys


@pytest.mark.parametrize("case", ["mixed", "mixed_moh"])
def test_chunked_prefill(case):
    """Multi-token calls on a non-empty cache (window history, lightning initial_state) equal recompute."""
    model = tiny(case)
    seq = prompt_of(length=40)
    cache = KVCache.for_model(model)
    at = 0
    with torch.no_grad():
        for n in (7, 1, 5, 12, 1, 14):
            logits = forward_cached(model, seq[:, at:at + n], cache)
            at += n
            ref = model(seq[:, :at])[:, -1]
            assert float((logits - ref).abs().max()) <= 1e-5
    assert at == 40 and cache.seen == 40


def test_logits_last_option():
    model = tiny("mixed")
    x = prompt_of()
    with torch.no_grad():
        full, last = model(x), model(x, logits="last")
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-6)


def test_hf_folder(tmp_path):
    """A tiny random HF LLaMA folder (GQA, llama3 RoPE scaling) loaded by the launcher's loader."""
    from longtrain.launcher.loading import load_model
    from longtrain.models.hf import save_hf_checkpoint

    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    src = randomize(Transformer(ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=1,
                                            max_seq_len=128, rope_theta=500.0, rope_scaling=scaling)))
    save_hf_checkpoint(src, tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.kind == "hf"
    model = loaded.model.eval()
    worst, tokens = cache_vs_recompute(model, prompt_of())
    MAX_DIFF["hf"] = worst
    print(f"hf: max |logit diff| {worst:.2e}")
    assert worst <= 1e-5
    assert torch.equal(tokens, generate(src, prompt_of(), NEW))  # same as the model it was saved from


def test_bf16_runs_close():
    """bf16 weights: decoding runs and its logits stay within a few bf16 steps of recompute."""
    model = tiny("mixed").to(torch.bfloat16)
    prompt = prompt_of()
    out = generate(model, prompt, 8)
    assert out.shape == (2, 8) and out.dtype == torch.long
    worst, top = 0.0, 0.0
    with torch.no_grad():
        logits, cache = prefill(model, prompt)
        seq = prompt
        for t in range(8):
            ref = model(seq)[:, -1]
            worst, top = max(worst, float((logits - ref).abs().max())), max(top, float(ref.abs().max()))
            seq = torch.cat([seq, out[:, t:t + 1]], dim=1)
            logits = decode_step(model, cache, out[:, t])
    print(f"bf16: max |logit diff| {worst:.2e} (max |logit| {top:.2f})")
    assert worst <= 4 * 2 ** -7 * top  # 4 bf16 rounding steps at the largest logit


# ---------------------------------------------------------------------- sampling
def test_sampling_options():
    model = tiny("mixed")
    prompt = prompt_of()
    greedy = generate(model, prompt, 16)

    def sample(seed, **kw):
        return generate(model, prompt, 16, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = sample(5), sample(5), sample(6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, greedy)
    assert torch.equal(sample(7, top_k=1), greedy)
    assert torch.equal(sample(7, top_p=1e-6), greedy)
    assert torch.equal(sample(7, top_k=5, top_p=1e-6), greedy)


def test_sample_next_restricts_support():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 2}
    # probabilities of 1, 2, 4 are ~0.34, 0.31, 0.28: top_p 0.6 keeps tokens 1 and 2
    nucleus = sample_next(logits, temperature=1.0, top_p=0.6, generator=g)
    assert set(nucleus.tolist()) == {1, 2}
    assert set(sample_next(logits, temperature=1.0, generator=g).tolist()) == {0, 1, 2, 3, 4}
    assert sample_next(logits[:2]).tolist() == [1, 1]


def test_eos_stops_and_pads():
    model = tiny("full")
    prompt = prompt_of()
    greedy = generate(model, prompt, NEW)
    eos = int(greedy[0, 5])
    out = generate(model, prompt, NEW, eos_id=eos)
    first = [next((t for t in range(NEW) if int(greedy[r, t]) == eos), None) for r in range(2)]
    n = NEW if None in first else max(first) + 1
    assert out.shape == (2, n)
    for r in range(2):
        f = first[r] if first[r] is not None else NEW
        assert torch.equal(out[r, :min(f + 1, n)], greedy[r, :min(f + 1, n)])
        assert (out[r, f + 1:] == eos).all()
    # one row: stops right after its first eos
    one = generate(model, prompt[:1], NEW, eos_id=eos)
    assert one.shape[1] == first[0] + 1 < NEW and int(one[0, -1]) == eos


def test_too_long_prompt_raises():
    model = tiny("full")  # max_seq_len 128
    with pytest.raises(ConfigError) as e:
        generate(model, prompt_of(length=120), 9)
    msg = str(e.value)
    assert "\n" not in msg and "120" in msg and "128" in msg
    assert generate(model, prompt_of(length=120), 8).shape == (2, 8)  # exactly the context: fine
    with pytest.raises(ConfigError):
        generate(model, prompt_of(length=20), 8, max_context=27)
    with pytest.raises(ConfigError):
        generate(model, torch.full((1, 3), VOCAB), 2)  # ids outside the vocabulary
    assert generate(model, prompt_of(), 0).shape == (2, 0)


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from longtrain.models.hf import save_hf_checkpoint

    torch.manual_seed(0)
    m = randomize(Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                          max_seq_len=64)))
    return save_hf_checkpoint(m, tmp_path_factory.mktemp("gen") / "hf")


def test_cli_generates(hf_dir, capsys, tmp_path):
    from longtrain.launcher.eval.generate import main

    rc = main([str(hf_dir), "--prompt", "Hello, world", "--max-new-tokens", "12", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.strip() and "tokens/s" in err
    # sampled, from a file, deterministic per seed
    f = tmp_path / "p.txt"
    f.write_text("Once upon a time")
    args = [str(hf_dir), "--prompt-file", str(f), "--max-new-tokens", "12", "--temperature", "0.9",
            "--top-k", "50", "--top-p", "0.95", "--seed", "3", "--dtype", "fp32"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("bad, needle", [
    (["{missing}", "--prompt", "hi", "--max-new-tokens", "4"], "not found"),
    (["{hf}", "--prompt", "", "--max-new-tokens", "4"], "empty"),
    (["{hf}", "--prompt", "x" * 60, "--max-new-tokens", "10"], "exceeds the context of 64"),
    (["{hf}", "--max-new-tokens", "4"], "--prompt"),
    (["{hf}", "--prompt", "hi"], "--max-new-tokens"),
    (["{hf}", "--prompt", "hi", "--max-new-tokens", "4", "--top-p", "0"], "top-p"),
])
def test_cli_bad_input(hf_dir, capsys, tmp_path, bad, needle):
    from longtrain.launcher.eval.generate import main

    argv = [a.format(hf=hf_dir, missing=tmp_path / "nope") for a in bad]
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and not out
    assert len(lines) == 1 and lines[0].startswith("longtrain: error:") and needle in lines[0], err
