"""Long-context evaluation: passkey prompts and scoring, perplexity by position, sequence-parallel
and data-parallel evaluation vs one process, the CLI's outputs and bad-input errors, and the
periodic in-training evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import REPO, cli_env, run_train
from longtrain.errors import ConfigError
from longtrain.launcher.eval import passkey as pk
from longtrain.launcher.data.tokenizers import ByteTokenizer
from longtrain.launcher.eval.cli import (EvalLayout, Scorer, heldout_windows, parse_depths, parse_lengths,
                                         passkey_eval, ppl_eval)
from longtrain.models import ModelConfig, Transformer
from longtrain.testing import run_distributed

TOK = ByteTokenizer()
TEXT = ("def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 40)


def tiny_model(seed: int = 0, max_seq_len: int = 512) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=max_seq_len)
    m = Transformer(cfg)
    m.init_weights(seed=seed)
    return m.eval()


def save_dcp(model: Transformer, folder: Path, seq_len: int = 128, step: int = 7) -> Path:
    """A checkpoint folder as the trainer writes it (model tensors under 'model', meta.json)."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir(parents=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder))
    (folder / "meta.json").write_text(json.dumps({"step": step, "seq_len": seq_len, "model": model.cfg.to_dict()}))
    return folder


def _cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "eval", *args], capture_output=True,
                          text=True, timeout=timeout, env=cli_env(), cwd=REPO)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("longtrain: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- parsing -------------------------------------------------------------------------------------

def test_parse_lengths_and_depths():
    assert parse_lengths("1k,2k, 4096,512") == [512, 1024, 2048, 4096]
    assert parse_lengths("32K,1m") == [32768, 1 << 20]
    assert parse_depths("1,0,0.25") == [0.0, 0.25, 1.0]
    for bad in ("", "1x", "0", "-5", "1.5"):
        with pytest.raises(ConfigError):
            parse_lengths(bad)
    for bad in ("1.5", "a", ""):
        with pytest.raises(ConfigError):
            parse_depths(bad)


# ---- the passkey task ------------------------------------------------------------------------------

def test_prompt_has_exact_length_needle_at_depth_and_answer_at_end():
    filler = pk.filler_tokens([TEXT], TOK, 5000)
    needle, question, answer = (TOK.decode(t.tolist()) for t in pk.prompt_parts(TOK, "04217"))
    assert needle == pk.NEEDLE.format(key="04217") and answer == " 04217"
    for L in (pk.min_length(TOK), 150, 256, 1000):
        for depth in (0.0, 0.5, 1.0):
            tokens, a = pk.passkey_prompt(filler, TOK, L, depth, "04217", offset=13)
            assert tokens.shape == (L,) and tokens.dtype == torch.int64
            text = TOK.decode(tokens.tolist())
            assert text.endswith(pk.QUESTION + " 04217") and TOK.decode(tokens[a:].tolist()) == " 04217"
            n_fill = L - pk.min_length(TOK)
            at = text.index(needle)
            assert at == round(depth * n_fill), (L, depth, at)
    with pytest.raises(ValueError):
        pk.passkey_prompt(filler, TOK, pk.min_length(TOK) - 1, 0.5, "04217", offset=0)


def test_mixed_documents_fraction_format_and_determinism():
    docs = [TEXT, TEXT[::-1], "x = 1\n" * 500]
    total = sum(map(len, docs))
    mixed = pk.mix_passkey_documents(docs, 0.6, seed=3, seq_len=256, copy_share=0.5)
    again = pk.mix_passkey_documents(docs, 0.6, seed=3, seq_len=256, copy_share=0.5)
    other = pk.mix_passkey_documents(docs, 0.6, seed=4, seq_len=256, copy_share=0.5)
    assert mixed == again and mixed != other and mixed[:3] == docs
    synth = mixed[3:]
    share = sum(map(len, synth)) / (total + sum(map(len, synth)))
    assert abs(share - 0.6) < 0.02, share
    import re

    pat = re.compile(r"\nThe pass key is (\d{5})\. Remember it\.\n.*"
                     r"\nWhat is the pass key\? The pass key is (\d{5})\.\n$", re.S)
    bare = pk.min_length(TOK) + 2
    drill = re.compile(r"^([a-z0-9 ]{1,60})\|\1\|\1\n$")
    drills = [d for d in synth if drill.match(d)]
    assert 0.35 < len(drills) / len(synth) < 0.65  # copy_share = 0.5 of the synthetic documents
    synth = [d for d in synth if not drill.match(d)]
    keys = set()
    for d in synth:
        m = pat.search(d)
        assert m and m.group(1) == m.group(2), d
        assert bare + 8 <= len(d) <= 255, len(d)  # up to seq_len - 1: with its EOS it fills a sample
        keys.add(m.group(1))
    assert len(keys) > 0.9 * len(synth)  # keys are random
    fillers = [re.sub(r"\nThe pass key is \d{5}\. Remember it\.\n", "", d.split(pk.QUESTION)[0]) for d in synth]
    long = [f for f in fillers if len(f) > 130]
    assert len(long) >= 5 and all(any(f[p:] == f[:-p] for p in range(8, 65)) for f in long)  # repeated
    assert any(not re.search(r"[^a-z ]", f) for f in fillers) and any(re.search(r"[^a-z ]", f) for f in fillers)
    plain = pk.mix_passkey_documents(docs, 0.5, seed=1, seq_len=256, filler_mix={"corpus": 1.0}, copy_share=0)[3:]
    for d in plain:
        f = re.sub(r"\nThe pass key is \d{5}\. Remember it\.\n", "", d.split(pk.QUESTION)[0])
        assert any(f in doc for doc in docs), f
    with pytest.raises(ValueError):
        pk.mix_passkey_documents(docs, 0.5, filler_mix={"lorem": 1.0})
    aligned = pk.mix_passkey_documents(docs, 0.5, seed=1, seq_len=200, align=True)
    assert {len(d) for d in aligned} == {199}  # + EOS = one packed sample each (byte tokenizer)
    assert sum("The pass key is" in d for d in aligned) > 0 and "".join(aligned[:3]) in "".join(docs) * 2
    only = pk.mix_passkey_documents(docs, 1.0, seed=0, seq_len=256)
    assert abs(sum(map(len, only)) - total) < 0.06 * total


# ---- scoring -------------------------------------------------------------------------------------

def test_chunked_head_equals_full_forward():
    m = tiny_model()
    tokens = torch.randint(0, 256, (2, 96))
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    nll, pred = Scorer(m, EvalLayout(), torch.device("cpu"), chunk=40)(tokens, targets)
    with torch.no_grad():
        logits = m(tokens)
    ref = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, logits.argmax(-1))
    assert (nll[:, -1] == 0).all()
    full = Scorer(m, EvalLayout(), torch.device("cpu"), chunk=0)(tokens, targets)  # one chunk
    torch.testing.assert_close(full[0], ref, rtol=1e-5, atol=1e-5)


class InductionOracle(nn.Module):
    """A hand-written 'model': predicts the token that followed the latest earlier occurrence of
    the last 8 tokens (an ideal induction head), and is deliberately wrong at positions
    divisible by 11. One-hot logits over 259 ids."""

    cfg = ModelConfig(vocab_size=259, dim=8, n_layers=1, n_heads=1, max_seq_len=1 << 16)

    def forward(self, tokens, positions=None, ops=None):
        B, S = tokens.shape
        out = torch.zeros(B, S, 259)
        for b in range(B):
            t = tokens[b].tolist()
            for i in range(S):
                guess = 0
                for j in range(i - 1, 6, -1):
                    if t[j - 7:j + 1] == t[i - 7:i + 1]:
                        guess = t[j + 1]
                        break
                if i % 11 == 0:
                    guess = (guess + 1) % 256
                out[b, i, guess] = 10.0
        return out


def greedy_decode(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Reference: append the argmax token n times, one full forward per new token."""
    seq = prompt.clone()
    for _ in range(n):
        nxt = model(seq[None])[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1)])
    return seq[len(prompt):].tolist()


@pytest.mark.parametrize("mode", pk.FILLERS)
def test_teacher_forced_scoring_equals_greedy_decoding(mode):
    """A sample counts as correct iff greedy decoding reproduces the answer; the reported
    prediction is the greedy output up to (and including) its first wrong token."""
    oracle = InductionOracle()
    filler = pk.filler_tokens([TEXT], TOK, 5000)
    sc = Scorer(oracle, EvalLayout(), torch.device("cpu"))
    lengths, depths, samples = [120, 161], [0.0, 0.5, 1.0], 4
    res = passkey_eval(sc, TOK, filler, lengths, depths, samples, seed=5, batch=3, examples=100, filler_mode=mode)
    assert len(res["examples"]) == len(lengths) * len(depths) * samples
    n_right = 0
    for L in lengths:
        for di, d in enumerate(depths):
            exs = [e for e in res["examples"] if e["length"] == L and e["depth"] == d]
            assert len(exs) == samples
            for i, ex in enumerate(exs):
                tokens, a, key = pk.eval_prompt(filler, TOK, L, d, [5, L, di, i], mode)
                assert key == ex["key"] and len(tokens) == L
                got = greedy_decode(oracle, tokens[:a], len(tokens) - a)
                want = tokens[a:].tolist()
                assert ex["correct"] == (got == want)
                first_bad = next((j for j, (g, w) in enumerate(zip(got, want)) if g != w), len(want))
                assert ex["greedy"] == TOK.decode(got[:first_bad + 1]).strip()
                n_right += ex["correct"]
            acc = res["accuracy"][lengths.index(L)][di]
            assert acc == pytest.approx(100 * np.mean([e["correct"] for e in exs]))
    # the oracle fails exactly where an answer position is divisible by 11: some right, some wrong
    assert 0 < n_right < len(res["examples"])


def test_repeat_filler_is_one_snippet_repeated():
    filler = pk.filler_tokens([TEXT], TOK, 5000)
    tokens, a, key = pk.eval_prompt(filler, TOK, 400, 1.0, [1, 2, 3], "repeat")
    hay = TOK.decode(tokens.tolist()).split(pk.NEEDLE.format(key=key))[0]
    period = next(p for p in range(16, 65) if hay[p:] == hay[:-p])
    assert len(hay) > 4 * period
    t2, _, k2 = pk.eval_prompt(filler, TOK, 400, 1.0, [1, 2, 3], "corpus")
    assert k2 == key and not torch.equal(t2, tokens)


def test_untrained_model_is_at_chance():
    filler = pk.filler_tokens([TEXT], TOK, 5000)
    res = passkey_eval(Scorer(tiny_model(), EvalLayout(), torch.device("cpu")), TOK, filler, [128],
                       [0.0, 0.5, 1.0], 10, seed=1, batch=10)
    assert np.max(res["accuracy"]) == 0.0  # exact match of 5 random digits: chance 1e-5
    assert np.mean(res["digit_accuracy"]) < 40  # space + ~10% per digit


def test_ppl_buckets_match_direct_computation():
    m = tiny_model()
    docs = [TEXT[i:] for i in range(0, 300, 37)]
    windows = heldout_windows(docs, TOK, [64, 200], 3)
    assert windows[64].shape == (3, 65) and windows[200].shape == (3, 201)
    res = ppl_eval(Scorer(m, EvalLayout(), torch.device("cpu"), chunk=50), windows, buckets=4)
    w = windows[200]
    with torch.no_grad():
        logits = m(w[:, :-1])
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
    assert res["ppl"][1] == pytest.approx(float(nll.mean().exp()), rel=1e-5)
    b = res["buckets"][1]
    assert [(x["start"], x["end"]) for x in b] == [(0, 50), (50, 100), (100, 150), (150, 200)]
    for x in b:
        assert x["ppl"] == pytest.approx(float(nll[:, x["start"]:x["end"]].mean().exp()), rel=1e-5)


# ---- sequence- and data-parallel evaluation equals one process -----------------------------------

def _dist_eval(rank: int, world: int, sp: int, impl: str) -> dict:
    if world == 1:
        layout = EvalLayout()
    else:
        from longtrain.parallel.mesh import SPAttention, make_layout

        layout = EvalLayout.from_mesh(make_layout(sp), SPAttention(impl, "zigzag"))
    m = tiny_model()
    sc = Scorer(m, layout, torch.device("cpu"), chunk=48)
    filler = pk.filler_tokens([TEXT], TOK, 5000)
    pres = passkey_eval(sc, TOK, filler, [128, 256], [0.0, 0.5, 1.0], 3, seed=2, batch=2)
    docs = [TEXT[i:] for i in range(0, 300, 37)]
    ppl = ppl_eval(sc, heldout_windows(docs, TOK, [128, 256], 3), buckets=4)
    tokens = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(9))
    nll, pred = sc(tokens, torch.roll(tokens, -1, 1))
    return {"passkey": pres, "ppl": ppl, "nll": nll, "pred": pred}


@pytest.mark.parametrize("sp,impl", [(2, "tokenring"), (2, "ring"), (1, "tokenring")])
def test_two_ranks_equal_one_process(sp, impl):
    """W=2 on gloo, as 1 group with sequence parallelism (sp=2) or 2 data-parallel ranks (sp=1)."""
    ref = _dist_eval(0, 1, 1, impl)
    outs = run_distributed(_dist_eval, 2, sp, impl)
    for out in outs:
        assert out["passkey"]["accuracy"] == ref["passkey"]["accuracy"]
        np.testing.assert_allclose(out["passkey"]["digit_accuracy"], ref["passkey"]["digit_accuracy"])
        np.testing.assert_allclose(out["ppl"]["ppl"], ref["ppl"]["ppl"], rtol=1e-5)
        for b1, b2 in zip(out["ppl"]["buckets"], ref["ppl"]["buckets"]):
            np.testing.assert_allclose([x["ppl"] for x in b1], [x["ppl"] for x in b2], rtol=1e-5)
        torch.testing.assert_close(out["nll"], ref["nll"], rtol=1e-5, atol=1e-5)
        assert torch.equal(out["pred"], ref["pred"])


# ---- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dcp_ckpt(tmp_path_factory) -> Path:
    return save_dcp(tiny_model(seed=1, max_seq_len=512), tmp_path_factory.mktemp("ck") / "run" / "step_00000007")


def test_cli_passkey_and_ppl_write_table_json_png(dcp_ckpt, tmp_path):
    data = tmp_path / "heldout"
    data.mkdir()
    for i in range(4):
        (data / f"d{i}.txt").write_text(TEXT[i * 7:] + f"# file {i}\n")
    out = tmp_path / "out"
    p = _cli("passkey", str(dcp_ckpt), "--lengths", "128,256", "--depths", "0,0.5,1", "--samples", "2",
             "--out", str(out))
    _ok(p)
    assert "depth \\ length" in p.stdout and "all depths" in p.stdout
    res = json.loads((out / "passkey.json").read_text())
    assert res["lengths"] == [128, 256] and res["depths"] == [0.0, 0.5, 1.0] and res["step"] == 7
    assert np.asarray(res["accuracy"]).shape == (2, 3)
    p = _cli("ppl", str(dcp_ckpt), "--lengths", "64,512", "--samples", "2", "--buckets", "4",
             "--data", str(data), "--out", str(out))
    _ok(p)
    res = json.loads((out / "ppl.json").read_text())
    assert res["lengths"] == [64, 512] and res["windows"] == [2, 2] and len(res["buckets"][1]) == 4
    assert all(1 < x < 1000 for x in res["ppl"])
    for name in ("passkey.png", "ppl.png"):
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        import matplotlib.image

        img = matplotlib.image.imread(str(out / name))
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 0.05  # not blank


def test_cli_hf_folder_gives_identical_numbers(dcp_ckpt, tmp_path):
    hf = pytest.importorskip("longtrain.models.hf")
    from longtrain.launcher.eval.cli import load_model

    m = load_model(dcp_ckpt).model
    hf.save_hf_checkpoint(m, tmp_path / "hf")
    results = {}
    for name, path in (("dcp", dcp_ckpt), ("hf", tmp_path / "hf")):
        out = tmp_path / name
        _ok(_cli("passkey", str(path), "--lengths", "128", "--depths", "0,1", "--samples", "3", "--out", str(out)))
        _ok(_cli("ppl", str(path), "--lengths", "256", "--samples", "2", "--data", "stdlib", "--skip-documents",
                 "100", "--out", str(out)))
        results[name] = [json.loads((out / f).read_text()) for f in ("passkey.json", "ppl.json")]
    for a, b in zip(results["dcp"], results["hf"]):
        for k in ("accuracy", "digit_accuracy", "examples", "ppl", "buckets"):
            assert a.get(k) == b.get(k), k  # identical, not merely close
    assert results["hf"][0]["kind"] == "hf" and results["dcp"][0]["kind"] == "dcp"


def test_cli_bad_input(dcp_ckpt, tmp_path):
    _one_line_error(_cli("passkey", str(tmp_path / "nope")), "checkpoint not found", "nope")
    _one_line_error(_cli("perplexity", str(dcp_ckpt)), "unknown metric", "perplexity", "ppl")
    _one_line_error(_cli("passkey", str(dcp_ckpt), "--lengths", "1k"), "1024", "max_seq_len 512", "--extrapolate")
    _one_line_error(_cli("passkey", str(dcp_ckpt), "--lengths", "12k", "--sp", "2", "--nproc", "2"),
                    "max_seq_len 512")
    _one_line_error(_cli("passkey", str(dcp_ckpt), "--lengths", "2x"), "2x")
    _one_line_error(_cli("passkey", str(dcp_ckpt), "--lengths", "256", "--sp", "2"), "--nproc 2")
    _one_line_error(_cli("passkey", str(dcp_ckpt), "--lengths", "250", "--sp", "2", "--nproc", "2"),
                    "divisible by 4")
    _one_line_error(_cli("passkey", str(dcp_ckpt), "--lengths", "20"), "shorter than the bare passkey prompt")
    _one_line_error(_cli("passkey", str(dcp_ckpt), "--bogus"), "--bogus")
    _one_line_error(_cli("ppl", str(dcp_ckpt)), "--data")  # unknown run: which documents are held out?
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(_cli("ppl", str(empty)), "no checkpoint")


# ---- in-training evaluation ----------------------------------------------------------------------

@pytest.mark.parametrize("sp", [2])
def test_in_training_eval_logs_passkey_and_ppl(tmp_path, sp):
    """Collective-safe under sequence parallelism; results land in metrics.jsonl (and TensorBoard)."""
    out = tmp_path / "run"
    run_train(out, "training.steps=4", "eval.every=2", "eval.passkey=true", "eval.lengths=[256, 128]",
              "eval.samples=2", "eval.depths=[0.0, 1.0]", f"parallel.sp={sp}", "data.passkey_fraction=0.3")
    from longtrain.launcher.metrics import read_jsonl

    evals = [r for r in read_jsonl(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for L in (128, 256):
            assert 0 <= r[f"eval/passkey_acc@{L}"] <= 100
            assert 0 <= r[f"eval/passkey_digit_acc@{L}"] <= 100
            assert 1 < r[f"eval/ppl@{L}"] < 400
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out))
    ea.Reload()
    assert "eval/passkey_acc@128" in ea.Tags()["scalars"] and "eval/ppl@256" in ea.Tags()["scalars"]


def test_filler_skip_past_the_source_is_a_clear_error():
    from longtrain.errors import DataError
    from longtrain.launcher.eval.cli import filler_documents

    docs, label = filler_documents({}, "stdlib", 3)
    assert docs and label == "stdlib documents 3.."
    with pytest.raises(DataError, match="--skip-documents is 10000000"):
        filler_documents({}, "stdlib", 10_000_000)
