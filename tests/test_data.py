"""Prepared (memory-mapped) data: `longtrain prepare`, the equality with the in-memory reference
(longtrain.testing.PackedCorpus, the pre-memmap data path kept as the reference), mixtures,
long-document upsampling, bad input, and exact resume with a mixture after kill -9 at 2 -> 2, 1, 4 ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, cli_env, losses, run_train
from longtrain.errors import DataError
from longtrain.launcher.config import load_recipe
from longtrain.launcher.data.corpus import Blend, build_corpus, Corpus, corpus_tokenizer, SourceOptions, SourceStream
from longtrain.launcher.data.sources import load_documents
from longtrain.launcher.data.tokenizers import build_tokenizer
from longtrain.launcher.eval.passkey import mix_passkey_documents
from longtrain.launcher.data.prepare import prepare
from longtrain.launcher.data.prepared import PreparedFolder
from longtrain.testing import PackedCorpus, train_bpe_tokenizer

TINY = REPO / "recipes" / "tiny-cpu.toml"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one cache for the module: raw sources are prepared once, as on a user's machine
    root = tmp_path_factory.getbasetemp() / "longtrain-cache"
    monkeypatch.setenv("LONGTRAIN_CACHE", str(root))
    return root


def _cli(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env), cwd=REPO)


def _jsonl_corpus(folder: Path, n_files: int = 3, docs_per_file: int = 40, seed: int = 0) -> Path:
    """JSONL files of stdlib-like text with lengths spread over two orders of magnitude."""
    rng = np.random.default_rng(seed)
    text = "".join(load_documents("stdlib", max_documents=8))
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        with open(folder / f"part{f}.jsonl", "w") as out:
            for _ in range(docs_per_file):
                n = int(rng.integers(20, 3000))
                a = int(rng.integers(0, len(text) - n))
                out.write(json.dumps({"text": text[a:a + n], "id": f}) + "\n")
    return folder


def _same(a, b) -> bool:
    return torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels) and torch.equal(a.doc_starts,
                                                                                               b.doc_starts)


# ---- 1. equality with the in-memory reference ------------------------------------------------------------

@pytest.mark.parametrize("passkey,options,seq", [(0.0, None, 64), (0.5, None, 64),
                                                 (0.5, {"align": True, "copy_share": 0.1}, 256)])
def test_prepared_stdlib_reads_exactly_the_in_memory_reference(passkey, options, seq):
    sets = ["data.max_documents=40", f"data.seq_len={seq}", f"data.passkey_fraction={passkey}"]
    if options:
        sets.append("data.passkey_options={align = true, copy_share = 0.1}")
    r = load_recipe(TINY, sets)
    corpus, info = build_corpus(r.data, seq_len=seq, seed=3, tokenizer=corpus_tokenizer(r.data, "bytes"),
                                local_main=True)
    docs = load_documents("stdlib", max_documents=40)
    if passkey:
        docs = mix_passkey_documents(docs, passkey, seed=3, seq_len=seq, **(options or {}))
        assert len(info[0]["folders"]) == 1 and "passkey-" in info[0]["folders"][0]  # corpus + synthetic
    ref = PackedCorpus(docs, build_tokenizer("bytes"), seq, seed=3)
    assert corpus.n_samples == ref.n_samples and corpus.n_tokens == len(ref.tokens)
    n = ref.n_samples
    idx = list(range(300)) + list(range(n - 50, n + 50)) + [2 * n + 17]  # also across the epoch boundary
    assert all(_same(corpus.sample(i), ref.sample(i)) for i in idx)
    long_c, long_r = corpus.with_seq_len(256), ref.with_seq_len(256)  # a staged seq_len change
    assert all(_same(long_c.sample(i), long_r.sample(i)) for i in range(0, long_r.n_samples, 97))
    # the prepared token stream is every document's bytes + EOS, in the seeded document order
    order = np.random.default_rng(3).permutation(len(docs))
    want = np.concatenate([np.append(np.frombuffer(docs[i].encode("utf-8", errors="replace"), np.uint8), 257)
                           for i in order[:20]])
    got, _ = corpus.streams[0]._read(0, len(want))
    assert np.array_equal(got, want)


def test_prepare_jsonl_bpe_cli_matches_direct_encoding_and_scales_with_num_proc(tmp_path):
    src = _jsonl_corpus(tmp_path / "raw")
    tok_path = train_bpe_tokenizer(tmp_path / "tok")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"prep{n}"
        proc = _cli("prepare", str(src), "--tokenizer", tok_path, "--out", str(out), "--num-proc", str(n),
                    "--progress-every", "0.05")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"wrote {out}" in proc.stdout and "documents" in proc.stdout
        outs[n] = out
    assert (outs[1] / "tokens.bin").read_bytes() == (outs[2] / "tokens.bin").read_bytes()
    folder = PreparedFolder(outs[2])
    meta = folder.meta
    tok = build_tokenizer(tok_path)
    assert meta["dtype"] == "uint16" and meta["n_documents"] == 120 and meta["tokenizer"]["vocab_size"] == 384
    assert meta["source"]["files"] == 3 and meta["tokenizer"]["fingerprint"].startswith("bpe-")
    assert (outs[2] / "tokenizer.json").read_bytes() == Path(tok_path).read_bytes()
    # independent reference: json.loads + tokenizer.encode per document, EOS after each
    docs = [json.loads(line)["text"] for f in sorted(src.glob("*.jsonl")) for line in f.read_text().splitlines()]
    for d in (0, 1, 59, 119):
        want = np.append(tok.encode(docs[d]), tok.eos_id)
        assert np.array_equal(folder.document(d).astype(np.int64), want), d
    assert int(folder.offsets[-1]) == sum(len(tok.encode(t)) + 1 for t in docs)
    # re-running on the same input is a no-op; another output folder that exists is refused
    again = _cli("prepare", str(src), "--tokenizer", tok_path, "--out", str(outs[2]))
    assert again.returncode == 0 and "already prepared" in again.stdout


def test_prepare_text_parquet_and_saved_dataset(tmp_path):
    import datasets

    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "txt" / "b.txt").write_text("second")
    m = prepare([str(tmp_path / "txt")], tmp_path / "p_txt", "bytes", stream=sys.stdout)
    assert m["n_documents"] == 2 and m["n_tokens"] == len("first document\nwith two lines\n") + 1 + 6 + 1
    ds = datasets.Dataset.from_dict({"body": ["alpha", "beta gamma", ""]})
    ds.to_parquet(str(tmp_path / "x.parquet"))
    m = prepare([str(tmp_path / "x.parquet")], tmp_path / "p_pq", "bytes", text_field="body", stream=sys.stdout)
    assert m["n_documents"] == 3 and m["empty_documents"] == 0 and m["n_tokens"] == 5 + 10 + 3  # EOS each
    ds.save_to_disk(str(tmp_path / "saved"))
    m = prepare([str(tmp_path / "saved")], tmp_path / "p_saved", "bytes", text_field="body", stream=sys.stdout)
    assert m["n_tokens"] == 18 and m["source"]["format"] == "saved"
    assert PreparedFolder(tmp_path / "p_saved").document(1).tolist() == list(b"beta gamma") + [257]


def test_training_on_a_prepared_folder_gives_the_losses_of_the_raw_source(tmp_path):
    prep = tmp_path / "prep"
    proc = _cli("prepare", "stdlib", "--max-documents", "60", "--out", str(prep))
    assert proc.returncode == 0, proc.stderr
    a = run_train(tmp_path / "raw", "training.steps=20", "checkpoint.interval=100")
    b = run_train(tmp_path / "prep_run", "training.steps=20", "checkpoint.interval=100", f"data.source={prep}",
                  "data.max_documents=0")
    la, lb = losses(tmp_path / "raw"), losses(tmp_path / "prep_run")
    assert len(la) == 20 and la == lb  # fp32, identical
    recs = [json.loads(x) for x in (tmp_path / "prep_run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data_wait_s"] >= 0 for r in recs if "loss" in r)
    resolved = (tmp_path / "prep_run" / "recipe.resolved.toml").read_text()
    assert "data_sources" in resolved and "run_tokens" in resolved and 'tokenizer = "bytes"' in resolved


# ---- 2. mixtures and long-context sampling ------------------------------------------------------------------

@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.7, 0.3), (0.5, 0.3, 0.2), (0.05, 0.15, 0.3, 0.5),
                                     (1.0, 2.0, 3.0, 4.0, 5.0)])
def test_blend_stays_within_two_samples_of_weight_at_every_prefix(weights):
    w = np.array(weights, dtype=np.float64)
    b = Blend(w, np.full(len(w), np.inf))
    n = 10_000
    b.ensure(n)
    counts = np.zeros(len(w))
    worst = 0.0
    for i in range(n):
        counts[b.src[i]] += 1
        worst = max(worst, float(np.abs(counts - (i + 1) * w / w.sum()).max()))
    assert worst <= 2.0, worst
    # each source's local indices are 0, 1, 2, ... in order (no sample skipped or repeated)
    for k in range(len(w)):
        assert np.array_equal(b.loc[:n][b.src[:n] == k], np.arange(int((b.src[:n] == k).sum())))
    # random access agrees with the sequential prefix
    c = Blend(w, np.full(len(w), np.inf))
    assert [c.locate(i) for i in (9_999, 17, 5_000)] == [(int(b.src[i]), int(b.loc[i])) for i in (9_999, 17, 5_000)]


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "prep_a", tmp_path / "prep_b"
    if not a.exists():
        prepare(["stdlib"], a, "bytes", max_documents=30, stream=sys.stdout)
        prepare([str(_jsonl_corpus(tmp_path / "raw_b", seed=1))], b, "bytes", stream=sys.stdout)
    return a, b


def test_max_epochs_and_exhaustion(tmp_path):
    a, b = _folders(tmp_path)
    sb = SourceStream([PreparedFolder(b)], 64, options=SourceOptions("b", 0.5, max_epochs=1), index=1)
    sa = SourceStream([PreparedFolder(a)], 64, options=SourceOptions("a", 0.5), index=0)
    c = Corpus([sa, sb])
    n = 3 * sb.n_samples
    counts = c.source_counts(n)
    assert counts[1] == sb.n_samples and counts[0] == n - sb.n_samples  # b gives one pass, a fills in
    only_b = Corpus([SourceStream([PreparedFolder(b)], 64, options=SourceOptions("b", 1, max_epochs=2))])
    only_b.sample(2 * sb.n_samples - 1)
    with pytest.raises(DataError, match="exhausted"):
        only_b.sample(2 * sb.n_samples)


def test_long_document_upsampling_changes_the_long_share_and_keeps_source_shares(tmp_path):
    a, b = _folders(tmp_path)
    fb = PreparedFolder(b)
    lengths = np.diff(np.asarray(fb.offsets))
    thr = int(np.median(lengths))
    long_tok, short_tok = int(lengths[lengths >= thr].sum()), int(lengths[lengths < thr].sum())
    plain = SourceStream([fb], 64, options=SourceOptions("b"), index=1)
    up = SourceStream([fb], 64, options=SourceOptions("b", long_doc_tokens=thr, long_doc_upsample=3.0), index=1)

    def long_share(s: SourceStream) -> float:
        lens = s.doc_lengths[s.order]
        return float(lens[lens >= thr].sum() / lens.sum())

    assert long_share(plain) == pytest.approx(long_tok / (long_tok + short_tok))
    assert long_share(up) == pytest.approx(3 * long_tok / (3 * long_tok + short_tok))
    assert long_share(up) > long_share(plain) + 0.05
    # filters: min_doc_tokens drops the short ones altogether
    only_long = SourceStream([fb], 64, options=SourceOptions("b", min_doc_tokens=thr), index=1)
    assert long_share(only_long) == 1.0
    # in a 30/70 mixture the upsampled source keeps its token share (within 1%)
    sa = SourceStream([PreparedFolder(a)], 64, options=SourceOptions("a", 0.3), index=0)
    up.options.weight = 0.7
    c = Corpus([sa, up])
    n = 5000
    share = c.source_counts(n) / n
    assert abs(share[0] - 0.3) < 0.01 and abs(share[1] - 0.7) < 0.01
    # and the samples drawn from it really contain more long-document tokens
    def sampled_long_share(s: SourceStream, m: int) -> float:
        hits = total = 0
        for j in range(m):
            smp = s.sample(j)
            starts = s.starts
            a0 = int(s._perm(0)[j]) * s.seq_len
            d = np.searchsorted(starts, np.arange(a0, a0 + s.seq_len), side="right") - 1
            lens = s.doc_lengths[s.order[d]]
            hits += int((lens >= thr).sum())
            total += len(lens)
            assert smp.tokens.numel() == s.seq_len
        return hits / total
    assert sampled_long_share(up, 400) > sampled_long_share(plain, 400) + 0.03


# ---- 3. bad input: one line, exit 2, nothing half-written -----------------------------------------------

def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("longtrain: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_prepare_bad_input(tmp_path):
    raw = _jsonl_corpus(tmp_path / "raw", n_files=2, docs_per_file=5)
    bad = raw / "part1.jsonl"
    bad.write_text(bad.read_text() + '{"text": "unterminated\n')
    out = tmp_path / "out"
    _one_line_error(_cli("prepare", str(raw), "--out", str(out)), "part1.jsonl")
    assert not out.exists() and not list(tmp_path.glob("out.tmp*"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.jsonl").write_text("")
    _one_line_error(_cli("prepare", str(tmp_path / "empty"), "--out", str(out)), "no documents")
    _one_line_error(_cli("prepare", str(tmp_path / "nothing*.jsonl"), "--out", str(out)), "matched no files")
    assert not out.exists() and not list(tmp_path.glob("out.tmp*"))


def test_training_refuses_bad_prepared_folders(tmp_path):
    good = tmp_path / "good"
    assert _cli("prepare", "stdlib", "--max-documents", "5", "--out", str(good)).returncode == 0
    tok = train_bpe_tokenizer(tmp_path / "tok")

    def dry(*sets: str, nproc: int = 1) -> subprocess.CompletedProcess:
        cmd = ["train", str(TINY), "--dry-run", "--set", "data.seq_len=64", *[x for s in sets for x in ("--set", s)]]
        return _cli(*cmd, *(["--nproc", str(nproc)] if nproc > 1 else []))

    ok = dry(f"data.source={good}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    _one_line_error(dry(f"data.source={good}", f"data.tokenizer={tok}"), "another tokenizer", str(good))
    trunc = tmp_path / "trunc"
    shutil.copytree(good, trunc)
    with open(trunc / "tokens.bin", "r+b") as f:
        f.truncate(1000)
    _one_line_error(dry(f"data.source={trunc}"), "truncated", "tokens.bin")
    _one_line_error(dry(f"data.source={trunc}", nproc=2), "truncated", "tokens.bin")  # errors inside workers too
    nometa = tmp_path / "nometa"
    shutil.copytree(good, nometa)
    (nometa / "meta.json").unlink()
    _one_line_error(dry(f"data.source={nometa}"), "no meta.json", "interrupted")
    recipe = tmp_path / "mix.toml"
    recipe.write_text(TINY.read_text().replace('source = "stdlib"\n', "")
                      + f'\n[[data.sources]]\npath = "{good}"\nweight = 0\n')
    _one_line_error(_cli("train", str(recipe), "--dry-run"), "data.sources[0].weight", "> 0")


# ---- 4. exact resume / reshard with a mixture, after kill -9 ----------------------------------------------

def _trace(base: Path) -> dict[int, int]:
    """global sample index -> crc32 of its tokens, over every rank's trace (re-drawn samples must agree)."""
    seen: dict[int, int] = {}
    for f in sorted(base.parent.glob(base.name + ".rank*")):
        for line in f.read_text().splitlines():
            _, i, crc = map(int, line.split())
            assert seen.setdefault(i, crc) == crc, f"sample {i} differs between draws"
    return seen


@pytest.mark.slow
def test_kill9_resume_and_reshard_draw_the_uninterrupted_samples_with_a_mixture(tmp_path):
    a, b = _folders(tmp_path)
    recipe = tmp_path / "mix.toml"
    recipe.write_text(TINY.read_text().replace('source = "stdlib"\n', "").replace('tokenizer = "bytes"\n', "")
                      + f'\n[[data.sources]]\npath = "{a}"\nweight = 0.6\n'
                      + f'\n[[data.sources]]\npath = "{b}"\nweight = 0.4\nlong_doc_tokens = 1000\n'
                      + 'long_doc_upsample = 2.0\n')
    common = ("checkpoint.interval=4", "checkpoint.async=false")
    # uninterrupted: 2 ranks x micro_batch 2 = 4 samples a step, 12 steps = samples 0..47
    run_train(tmp_path / "ref", "training.steps=12", *common, recipe=recipe,
              LONGTRAIN_DATA_TRACE=str(tmp_path / "t_ref"))
    ref = _trace(tmp_path / "t_ref")
    assert sorted(ref) == list(range(48))
    # kill -9 (rank 0, while saving step 8: the newest complete checkpoint is step 4, position 16)
    crash = run_train(tmp_path / "run", "training.steps=12", *common, recipe=recipe, check=False,
                      LONGTRAIN_DATA_TRACE=str(tmp_path / "t_crash"), LONGTRAIN_FAULT="crash_during_save:8")
    assert crash.returncode != 0
    shared = _trace(tmp_path / "t_crash")
    assert all(ref[i] == c for i, c in shared.items())
    for world, steps in ((2, 12), (1, 20), (4, 8)):  # 16 + 32 samples in every case
        run = tmp_path / f"run{world}"
        shutil.copytree(tmp_path / "run", run)
        run_train(run, f"training.steps={steps}", *common, recipe=recipe, nproc=world,
                  LONGTRAIN_DATA_TRACE=str(tmp_path / f"t_w{world}"))
        got = _trace(tmp_path / f"t_w{world}")
        assert sorted(got) == list(range(16, 48)), (world, sorted(got)[:5])
        assert all(ref[i] == c for i, c in got.items()), world
    # the per-source token counts were logged
    recs = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if "loss" in r][-1]
    assert last["data/prep_a/tokens"] + last["data/prep_b/tokens"] == 48 * 64
    assert abs(last["data/prep_a/share"] - 0.6) <= 2 / 48


def test_prefetcher_builds_the_next_batches_ahead_and_recomputes_on_a_miss():
    import threading

    from longtrain.launcher.data.batches import Prefetcher

    calls: list[tuple[int, str]] = []
    release = threading.Event()

    def make(key: int) -> int:
        calls.append((key, threading.current_thread().name))
        if key == 2:
            release.wait(5)
        return key * 10

    p = Prefetcher(make)
    assert p.get(1, next_key=2) == 10 and calls[0] == (1, threading.current_thread().name)
    release.set()
    assert p.get(2, next_key=3) == 20  # built by the background thread
    assert calls[1][0] == 2 and calls[1][1].startswith("longtrain-data")
    assert p.get(7, next_key=None) == 70  # a miss (e.g. a stage changed seq_len): built here, synchronously
    assert calls[-1] == (7, threading.current_thread().name)
    assert p.last_wait_s >= 0
    p.close()
    off = Prefetcher(make, enabled=False)
    assert off.get(4, next_key=5) == 40 and all(k != 5 for k, _ in calls)
