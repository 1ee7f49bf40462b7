"""Data and evaluation with [[data.sources]] mixtures and synthetic documents (issues #25, #26): passkey
and RULER-style documents mixed into every source, held-out documents per source of a mixture, RULER
scores during training, and a corrupt parquet file reported in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, cli_env, run_train

from longtrain.launcher.config import load_recipe
from longtrain.launcher.data.corpus import build_corpus
from longtrain.launcher.data.prepared import PreparedFolder
from longtrain.launcher.data.sources import load_documents
from longtrain.launcher.eval.score import heldout_documents

TINY = REPO / "recipes" / "tiny-cpu.toml"


def _texts(folder: Path, name: str, n: int) -> Path:
    """`n` JSONL documents cut from stdlib sources, tagged with `name`."""
    text = "".join(load_documents("stdlib", max_documents=4))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"[{name} {i}] " + text[i * 700:(i + 1) * 700]}) + "\n")
    return folder / f"{name}.jsonl"


def _mixture(tmp_path: Path, *sets: str):
    a, b = _texts(tmp_path / "a", "alpha", 30), _texts(tmp_path / "b", "beta", 30)
    r = load_recipe(str(TINY), [f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=20", "data.seq_len=512",
                                *sets])
    data = r.to_dict()["data"]
    data["sources"] = [{"path": str(a), "name": "alpha"}, {"path": str(b), "name": "beta"}]
    from longtrain.launcher.config import recipe_from_dict

    d = r.to_dict()
    d["data"] = data
    return recipe_from_dict(d, str(TINY))


def test_synthetic_documents_go_into_every_source_of_a_mixture(tmp_path):
    r = _mixture(tmp_path, "data.passkey_fraction=0.2", "data.ruler_fraction=0.2")
    corpus, info = build_corpus(r.data, seq_len=512, seed=0, tokenizer="bytes", local_main=True)
    assert [s["name"] for s in info] == ["alpha", "beta"]
    for s, other in zip(info, ("beta", "alpha")):
        folder = PreparedFolder(s["folders"][0])
        docs = [bytes(folder.document(d)[:-1].astype("uint8")).decode("utf-8", "replace")
                for d in range(folder.n_documents)]
        ids = {int(d.split(" ")[1].rstrip("]")) for d in docs if d.startswith(f"[{s['name']} ")}
        assert ids == set(range(20))  # its own first 20 documents (haystacks may reuse their text)
        assert not any(f"[{other} " in d for d in docs)
        assert sum("The pass key is" in d for d in docs) >= 2  # passkey documents
        ruler = [d for d in docs if "The number for" in d or "Which variables are" in d]
        assert len(ruler) >= 2, "RULER-style documents"


def test_heldout_documents_come_from_each_source_of_the_mixture(tmp_path):
    r = _mixture(tmp_path)
    run_data = {**r.to_dict()["data"]}
    docs, rule = heldout_documents(run_data, None, None)
    assert len(docs) == 20  # documents 20..29 of both sources, which training never read
    assert sorted({d.split(" ")[0] for d in docs}) == ["[alpha", "[beta"]
    assert all(int(d.split(" ")[1].rstrip("]")) >= 20 for d in docs)
    assert "alpha: 10 documents (20..)" in rule and "beta: 10 documents (20..)" in rule


def test_ruler_scores_during_training(tmp_path):
    out = tmp_path / "run"
    run_train(out, "training.steps=2", "eval.every=2", "eval.lengths=[256]", "model.max_seq_len=512",
              "eval.ruler_tasks=[\"niah_single_1\", \"vt\"]", "eval.ruler_samples=2", nproc=1)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scores = {k: v for row in rows for k, v in row.items() if k.startswith("eval/ruler/")}
    assert set(scores) == {"eval/ruler/niah_single_1@256", "eval/ruler/vt@256"}
    assert all(0 <= v <= 100 for v in scores.values())


def test_a_corrupt_parquet_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + b"not a parquet file" + b"PAR1")
    for args in (["prepare", str(bad), "--out", str(tmp_path / "p")],
                 ["train", str(TINY), "--set", f"data.source={bad}", "--set", f"run.output_dir={tmp_path / 'r'}",
                  "--set", f"data.cache_dir={tmp_path / 'c'}"]):
        proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", *args], capture_output=True,
                              text=True, env=cli_env(), cwd=REPO, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("longtrain: error:") and "bad.parquet" in lines[0]
        assert "Failed to read schema" not in proc.stdout
