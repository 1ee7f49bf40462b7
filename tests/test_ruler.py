"""RULER-style synthetic tasks: scorers against oracles, generators (exact token length for a byte and a
BPE tokenizer, answers recoverable from the prompt text, determinism), chat templates, too-long
prompts, training documents, and the runner with an oracle / anti-oracle `generate`."""

from __future__ import annotations

import json
import re
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from longtrain.errors import ConfigError
from longtrain.launcher.data.sources import load_documents
from longtrain.launcher.data.tokenizers import ByteTokenizer, HFTokenizer
from longtrain.launcher.eval import ruler_tasks as rt
from longtrain.launcher.eval.ruler import run_ruler
from longtrain.testing import train_bpe_tokenizer

BYTES = ByteTokenizer()
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return load_documents("stdlib", max_documents=30)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def bpe(bpe_dir) -> HFTokenizer:
    return HFTokenizer(str(bpe_dir))


# ---- answer recovery from the prompt text (independent of the generator) --------------------------

def _niah_answers(text: str) -> list[str]:
    pairs = re.findall(r"numbers? for ([\w-]+) is:? (\d+)\.", text)
    query = text.rsplit("numbers for ", 1)[1].removesuffix(" are").removesuffix(" mentioned in the provided text")
    asked = re.split(r", and |, ", query)
    return sorted(v for k, v in pairs if k in asked)


def _vt_answers(text: str) -> list[str]:
    value: dict[str, str] = {}
    for name, lit, ref in re.findall(r"VAR ([A-Z]+) = (?:(\d+)|VAR ([A-Z]+))", text):
        value[name] = lit or value[ref]  # a chain refers to variables assigned before it
    query = re.findall(r"\d{5}", text.splitlines()[-1])[0]
    return sorted(n for n, v in value.items() if v == query)


def _top(counts: Counter, k: int) -> list[str]:
    ranked = counts.most_common()
    assert ranked[k - 1][1] > (ranked[k][1] if len(ranked) > k else 0)  # the top k are unambiguous
    return sorted(w for w, _ in ranked[:k])


def _cwe_answers(text: str) -> list[str]:
    items = re.findall(r"(\d+)\. ([a-z]+)", text.rsplit("\n", 1)[0])
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))  # numbered in order
    return _top(Counter(w for _, w in items), 10)  # (a cut last item is a word seen nowhere else)


def _fwe_answers(text: str) -> list[str]:
    body = text.rsplit("\n", 1)[0].split("words.")[-1]
    return _top(Counter(w for w in body.split() if w.strip(".")), 3)


CHECK = {"niah": _niah_answers, "vt": _vt_answers, "cwe": _cwe_answers, "fwe": _fwe_answers}


def _family(task: str) -> str:
    return "niah" if task.startswith("niah") else task


# ---- scorers ------------------------------------------------------------------------------------

def test_string_match_metrics():
    assert rt.string_match_all(["The answer: 123 and ABC"], [["123", "abc"]]) == 100.0
    assert rt.string_match_all(["123", "nothing"], [["123", "456"], ["1"]]) == 25.0
    assert rt.string_match_part(["only 456"], [["123", "456"]]) == 100.0
    assert rt.string_match_part(["none", "123"], [["123"], ["123", "9"]]) == 50.0
    assert rt.string_match_all([], []) == 0.0
    assert rt.postprocess("  12\x0034 \n") == "12\n34"
    assert set(rt.METRICS) == set(rt.TASKS) and set(rt.METRICS.values()) == {"string_match_all"}


@pytest.mark.parametrize("task", rt.TASKS)
def test_scorer_oracle_wrong_partial(task, docs):
    samples = rt.ruler_samples(task, BYTES, 1500, 3, seed=0, docs=docs)
    refs = [s.answers for s in samples]
    assert rt.score_task(task, [s.answer_text for s in samples], refs) == 100.0
    assert rt.score_task(task, [s.answer_text.upper() + "\nmore text" for s in samples], refs) == 100.0
    assert rt.score_task(task, ["", "I do not know.", "#"], refs) == 0.0
    n = len(refs[0])
    assert n == {"niah_single_1": 1, "niah_single_2": 1, "niah_multikey": 1, "niah_multivalue": 4,
                 "niah_multiquery": 4, "vt": 5, "cwe": 10, "fwe": 3}[task]
    if n > 1:  # partial credit: first answer only, then all but one
        assert rt.score_task(task, [" " + r[0] for r in refs], refs) == round(100 / n, 2)
        assert rt.score_task(task, [", ".join(r[1:]) for r in refs], refs) == round(100 * (n - 1) / n, 2)
    with pytest.raises(ConfigError, match="unknown RULER task"):
        rt.score_task("qa_1", [""], [["x"]])


# ---- generators ---------------------------------------------------------------------------------

# (tokenizer, options) -> (length, task) that do not fit (ConfigError, "too few" / "more room")
TOO_SHORT = {("bytes", "short"): {(256, "cwe")},
             ("bpe", "short"): {(256, "cwe")},
             ("bpe", "ruler"): {(256, t) for t in rt.TASKS}}
BORDERLINE = {(256, "niah_multiquery")}  # fits or not depending on the keys drawn


@pytest.mark.parametrize("tok_name,wording", [("bytes", "short"), ("bpe", "short"), ("bpe", "ruler")])
@pytest.mark.parametrize("task", rt.TASKS)
def test_generator_exact_length_and_answers(task, tok_name, wording, docs, bpe):
    tok = BYTES if tok_name == "bytes" else bpe
    opts = rt.RulerOptions.compact() if wording == "short" else rt.RulerOptions()
    if tok_name == "bytes":
        assert rt.default_options(tok) == opts
    for length in (256, 1024, 3000):
        if (length, task) in TOO_SHORT[tok_name, wording]:
            with pytest.raises(ConfigError, match="too few|more room|longer context"):
                rt.ruler_samples(task, tok, length, 1, seed=0, docs=docs, options=opts)
            continue
        try:
            samples = rt.ruler_samples(task, tok, length, 2, seed=3, docs=docs, options=opts)
        except ConfigError:
            assert (length, task) in BORDERLINE
            continue
        for s in samples:
            budget = rt.answer_budget(task, tok, opts)
            assert s.max_new_tokens == budget and s.tokens.dtype == np.int64
            assert len(s.tokens) == length - budget  # prompt + answer budget = the context length, exactly
            text = tok.decode(s.tokens.tolist())
            assert sorted(s.answers) == CHECK[_family(task)](text), (task, length, text[-300:])
        assert not np.array_equal(samples[0].tokens, samples[1].tokens)
        if task == "niah_single_1":
            assert "The grass is green. The sky is blue." in text
        if task in ("niah_multikey", "niah_multivalue", "niah_multiquery"):
            assert len(re.findall(r"numbers? for [\w-]+ is", text)) == 4


@pytest.mark.parametrize("task", rt.TASKS)
def test_generator_deterministic(task, docs, bpe):
    a = rt.ruler_samples(task, bpe, 1200, 2, seed=7, docs=docs, options=rt.RulerOptions.compact())
    b = rt.ruler_samples(task, bpe, 1200, 2, seed=7, docs=docs, options=rt.RulerOptions.compact())
    c = rt.ruler_samples(task, bpe, 1200, 2, seed=8, docs=docs, options=rt.RulerOptions.compact())
    for x, y in zip(a, b):
        assert np.array_equal(x.tokens, y.tokens) and x.answers == y.answers
    assert any(not np.array_equal(x.tokens, z.tokens) for x, z in zip(a, c))


def test_needle_values_are_short_for_bytes(docs):
    s = rt.ruler_samples("niah_multivalue", BYTES, 800, 1, seed=0, docs=docs)[0]
    assert all(re.fullmatch(r"\d{5}", v) for v in s.answers)
    s = rt.ruler_samples("vt", BYTES, 800, 1, seed=0, docs=docs)[0]
    assert all(re.fullmatch(r"[A-Z]{3}", v) for v in s.answers)
    s = rt.ruler_samples("niah_single_2", BYTES, 800, 1, seed=0, docs=docs, options=rt.RulerOptions())[0]
    assert re.fullmatch(r"\d{7}", s.answers[0])  # RULER's 7-digit values in the full wording


def test_too_short_and_bad_input(docs):
    with pytest.raises(ConfigError, match="too few") as e:
        rt.ruler_samples("vt", BYTES, 40, 1, seed=0, docs=docs)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="empty"):
        rt.ruler_samples("niah_single_2", BYTES, 500, 1, seed=0, docs=["", "  "])
    with pytest.raises(ConfigError, match="wording"):
        rt.ruler_samples("vt", BYTES, 500, 1, seed=0, docs=docs, options=rt.RulerOptions(wording="long"))


# ---- chat template ------------------------------------------------------------------------------

def _tokenizer_folder(tmp_path, bpe_dir, template: str | None):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text((bpe_dir / "tokenizer.json").read_text())
    cfg = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|end_of_text|>"}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_chat_template_prompt(tmp_path, bpe_dir, bpe, docs):
    pytest.importorskip("jinja2")
    chat = rt.load_chat_template(_tokenizer_folder(tmp_path, bpe_dir, CHAT))
    assert chat.split() == ("<|begin_of_text|><|user|>\n", "\n<|assistant|>\n")
    opts = rt.RulerOptions.compact()
    s = rt.ruler_samples("niah_multikey", bpe, 900, 1, seed=1, docs=docs, options=opts, chat=chat)[0]
    assert len(s.tokens) == 900 - s.max_new_tokens
    assert s.tokens[0] == bpe.bos_id  # the template's bos_token became the special token
    text = bpe.decode(s.tokens.tolist())  # (special tokens are not decoded)
    assert text.startswith("<|user|>\n") and "?\n<|assistant|>\n The numbers for " in text
    assert _niah_answers(text) == sorted(s.answers)
    base = rt.ruler_samples("niah_multikey", bpe, 900, 1, seed=1, docs=docs, options=opts)[0]
    assert base.answers == s.answers and not bpe.decode(base.tokens.tolist()).startswith("<|user|>")


def test_chat_template_fallback_and_errors(tmp_path, bpe_dir, monkeypatch):
    folder = _tokenizer_folder(tmp_path, bpe_dir, CHAT)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)  # as if jinja2 were not installed
    assert rt.load_chat_template(folder / "tokenizer.json").split() == ("<|begin_of_text|>User: ", "\nAssistant:")
    monkeypatch.undo()
    bad = rt.ChatTemplate("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="exactly once"):
        bad.split()
    (folder / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="needs a chat_template"):
        rt.load_chat_template(folder)


# ---- training documents -------------------------------------------------------------------------

def test_mix_ruler_documents(docs):
    small = docs[:5]
    mixed = rt.mix_ruler_documents(small, 0.5, seed=4, seq_len=512)
    assert mixed[:5] == small and mixed == rt.mix_ruler_documents(small, 0.5, seed=4, seq_len=512)
    assert mixed != rt.mix_ruler_documents(small, 0.5, seed=5, seq_len=512)
    extra = mixed[5:]
    share = sum(map(len, extra)) / sum(map(len, mixed))
    assert 0.45 < share < 0.6
    kinds = Counter()
    for d in extra:
        assert len(d) <= 511 and d.endswith(".\n")
        prompt, answer = d[:-1].rsplit(" Answer:" if "VAR " in d else " are", 1)
        end = " Answer:" if "VAR " in d else " are"
        found = (_vt_answers if "VAR " in d else _niah_answers)(prompt + end)
        assert sorted(answer.strip(" .").split(", ")) == found  # the answer follows its question
        kinds["vt" if "VAR " in d else "multi" if len(found) > 1 else "key"] += 1
    assert set(kinds) == {"vt", "multi", "key"}
    only = rt.mix_ruler_documents(small, 1.0, seed=0, seq_len=300, kinds=["niah_single_1"])
    assert all("The grass is green." in d for d in only) and sum(map(len, only)) >= sum(map(len, small))
    with pytest.raises(ValueError, match="too short"):
        rt.mix_ruler_documents(small, 0.5, seq_len=64, kinds=["niah_multiquery"])
    with pytest.raises(ValueError, match="kinds"):
        rt.mix_ruler_documents(small, 0.5, kinds=["qa_1"])


# ---- runner -------------------------------------------------------------------------------------

class _Fake(nn.Module):
    def __init__(self, max_seq_len: int = 4096) -> None:
        super().__init__()
        self.cfg = types.SimpleNamespace(max_seq_len=max_seq_len, vocab_size=259)
        self.w = nn.Parameter(torch.zeros(1))


def _fake_generate(monkeypatch, reply):
    """Install a fake `longtrain.models.generate.generate`: reply(prompt_row) -> completion text."""
    calls = []

    def generate(model, prompt, max_new_tokens, *, temperature=0.0, eos_id=None, max_context=None):
        assert prompt.dtype == torch.int64 and prompt.dim() == 2 and temperature == 0.0
        assert prompt.shape[1] + max_new_tokens <= max_context
        calls.append((prompt.shape, max_new_tokens))
        rows = []
        for row in prompt.tolist():
            ids = list(BYTES.encode(reply(tuple(row)))) + [eos_id] * max_new_tokens
            rows.append(ids[:max_new_tokens])
        return torch.tensor(rows, dtype=torch.int64)

    mod = types.ModuleType("longtrain.models.generate")
    mod.generate = generate
    monkeypatch.setitem(sys.modules, "longtrain.models.generate", mod)
    return calls


def _join(answers: list[str]) -> str:
    return ", ".join(answers) + "."


TASKS_RUN = ["niah_single_1", "niah_multivalue", "vt", "cwe", "fwe"]


def _answers(docs, lengths, seed=5, n=3):
    return {tuple(s.tokens.tolist()): s for t in TASKS_RUN for L in lengths
            for s in rt.ruler_samples(t, BYTES, L, n, seed=seed, docs=docs)}


def test_run_ruler_oracle_and_anti_oracle(monkeypatch, docs):
    truth = _answers(docs, [1024, 1500])
    calls = _fake_generate(monkeypatch, lambda row: truth[row].answer_text)
    rep = run_ruler(_Fake(), BYTES, lengths=[1024, 1500], tasks=TASKS_RUN, samples=3, seed=5,
                    haystack_docs=docs, batch_size=2)
    assert rep["scores"] == {t: {1024: 100.0, 1500: 100.0} for t in TASKS_RUN}
    assert rep["average"] == {1024: 100.0, 1500: 100.0} and len(rep["samples"]) == 30
    assert all(r["score"] == 100.0 and r["prediction"] == _join(r["answers"]) for r in rep["samples"])
    assert [c[0][0] for c in calls[:2]] == [2, 1]  # batches of 2 then the rest
    assert all(c[0][1] + c[1] in (1024, 1500) for c in calls)
    json.dumps(rep)

    _fake_generate(monkeypatch, lambda row: "")
    rep = run_ruler(_Fake(), "bytes", lengths=[1024], tasks=TASKS_RUN, samples=3, seed=5, haystack_docs="stdlib")
    assert rep["scores"] == {t: {1024: 0.0} for t in TASKS_RUN}
    assert all(r["prediction"] == "" and r["score"] == 0.0 for r in rep["samples"])

    _fake_generate(monkeypatch, lambda row: " " + truth[row].answers[0] + ".")  # partial credit
    rep = run_ruler(_Fake(), BYTES, lengths=[1024], tasks=["niah_multivalue", "vt"], samples=3, seed=5,
                    haystack_docs=docs)
    assert rep["scores"] == {"niah_multivalue": {1024: 25.0}, "vt": {1024: 20.0}}


def test_run_ruler_errors(monkeypatch, docs, tmp_path):
    _fake_generate(monkeypatch, lambda row: "")
    with pytest.raises(ConfigError, match="exceeds the model's context of 512") as e:
        run_ruler(_Fake(512), BYTES, lengths=[256, 1024], tasks=["vt"], samples=1, seed=0, haystack_docs=docs)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="exceeds"):  # max_context overrides the model's own
        run_ruler(_Fake(), BYTES, lengths=[1024], tasks=["vt"], samples=1, seed=0, haystack_docs=docs,
                  max_context=1000)
    with pytest.raises(ConfigError, match="needs a chat template"):
        run_ruler(_Fake(), BYTES, lengths=[512], tasks=["vt"], samples=1, seed=0, haystack_docs=docs,
                  template="chat")
    with pytest.raises(ConfigError, match="unknown RULER task"):
        run_ruler(_Fake(), BYTES, lengths=[512], tasks=["qa_2"], samples=1, seed=0, haystack_docs=docs)


def test_run_ruler_real_generate(docs):
    """End to end with the real greedy decoder and a tiny random model: runs, scores in range."""
    pytest.importorskip("longtrain.models.generate")
    from longtrain.models import ModelConfig, Transformer

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                max_seq_len=512))
    m.init_weights(seed=0)
    rep = run_ruler(m, BYTES, lengths=[300], tasks=["niah_single_1", "vt"], samples=2, seed=0, haystack_docs=docs)
    assert all(0.0 <= rep["scores"][t][300] <= 100.0 for t in ("niah_single_1", "vt"))
    assert len(rep["samples"]) == 4 and m.training


def test_run_ruler_skips_a_length_too_short_for_a_task(monkeypatch, docs, tmp_path):
    """cwe cannot fit its word list in 384 byte tokens: that cell is skipped with its reason (None in the
    scores, n/a in the table and heat map), every other cell is still measured; none fitting is one error."""
    from longtrain.launcher.eval.report import plot_ruler, ruler_table

    truth = {tuple(s.tokens.tolist()): s for t in ("niah_single_1", "cwe") for L in (384, 1024)
             for s in (rt.ruler_samples(t, BYTES, L, 2, seed=1, docs=docs) if (t, L) != ("cwe", 384) else [])}
    _fake_generate(monkeypatch, lambda row: truth[row].answer_text)
    rep = run_ruler(_Fake(), BYTES, lengths=[384, 1024], tasks=["niah_single_1", "cwe"], samples=2, seed=1,
                    haystack_docs=docs)
    assert rep["scores"] == {"niah_single_1": {384: 100.0, 1024: 100.0}, "cwe": {384: None, 1024: 100.0}}
    assert rep["average"] == {384: 100.0, 1024: 100.0}
    assert list(rep["skipped"]) == ["cwe"] and "needs more room" in rep["skipped"]["cwe"][384]
    assert {(r["task"], r["length"]) for r in rep["samples"]} == {("niah_single_1", 384), ("niah_single_1", 1024),
                                                                  ("cwe", 1024)}
    table = ruler_table({**rep, "lengths": [384, 1024]})
    assert table.splitlines()[3].split("|")[1].strip() == "n/a" and "n/a: the length" in table
    plot_ruler({**rep, "lengths": [384, 1024], "samples_per_cell": 2}, tmp_path / "r.png", "skip")
    assert (tmp_path / "r.png").stat().st_size > 0
    json.dumps(rep)
    with pytest.raises(ConfigError, match="no RULER task fits the given lengths: cwe @ 300: "):
        run_ruler(_Fake(), BYTES, lengths=[300], tasks=["cwe"], samples=1, seed=0, haystack_docs=docs)
