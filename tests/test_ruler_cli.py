"""`longtrain eval ruler` and `longtrain generate` through the real command line: on a random tiny HF
LLaMA folder made here and on a longtrain run; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, cli_env, run_train

from longtrain.models import ModelConfig, Transformer


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", *args], capture_output=True, text=True,
                          env=cli_env(), cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from longtrain.models.hf import save_hf_checkpoint

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512))
    m.init_weights(seed=0)
    return save_hf_checkpoint(m, tmp_path_factory.mktemp("ruler") / "hf")


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("longtrain: error:") and needle in lines[0], proc.stderr


def test_eval_ruler_on_an_hf_folder(hf_dir, tmp_path):
    out = tmp_path / "res"
    proc = _cli("eval", "ruler", str(hf_dir), "--lengths", "384", "--tasks", "niah_single_1,vt", "--samples", "2",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "ruler.json").read_text())
    assert set(res["scores"]) == {"niah_single_1", "vt"} and all(
        0 <= v <= 100 for s in res["scores"].values() for v in s.values())
    assert len(res["samples"]) == 4 and (out / "ruler.png").stat().st_size > 1000
    assert "niah_single_1" in proc.stdout and "average" in proc.stdout  # the table


@pytest.mark.parametrize("args, needle", [
    (["--lengths", "1024"], "exceeds the model's max_seq_len 512"),
    (["--tasks", "needle"], "unknown RULER task"),
    (["--samples", "0"], "--samples"),
])
def test_eval_ruler_bad_input(hf_dir, args, needle):
    _one_line(_cli("eval", "ruler", str(hf_dir), *args), needle)


def test_eval_ruler_and_generate_on_a_run(tmp_path):
    out = tmp_path / "run"
    run_train(out, "training.steps=2", "checkpoint.interval=2", nproc=1)
    proc = _cli("eval", "ruler", str(out), "--lengths", "384", "--tasks", "niah_multikey", "--samples", "1",
                "--out", str(tmp_path / "res"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "res" / "ruler.json").read_text())["step"] == 2
    proc = _cli("generate", str(out), "--prompt", "def main(", "--max-new-tokens", "8")
    assert proc.returncode == 0 and "tokens/s" in proc.stderr, proc.stderr[-2000:]
    _one_line(_cli("generate", str(out), "--prompt", "x" * 600, "--max-new-tokens", "4"), "exceeds")


def test_ruler_recipe_chain_validates(hf_dir):
    """recipes/ruler-base-cpu.toml -> ruler-extend-cpu.toml (measured in docs/evaluation.md): each starts from
    the run before it, both validate (RULER kinds, eval tasks) and PI maps 1024 positions into the base's
    length."""
    import tomllib

    from longtrain.launcher.config import recipe_from_dict

    names = ("ruler-base-cpu", "ruler-extend-cpu")
    raw = {n: tomllib.loads((REPO / "recipes" / f"{n}.toml").read_text()) for n in names}
    assert raw["ruler-base-cpu"]["model"]["init_from"] == "runs/passkey-cpu"
    assert raw["ruler-extend-cpu"]["model"]["init_from"] == "runs/ruler-base-cpu"
    for d in raw.values():  # the chain's folders exist only after training: stand in a tiny HF folder
        d["model"]["init_from"] = str(hf_dir)
    base, ext = (recipe_from_dict(d, n) for n, d in raw.items())
    assert base.data.ruler_fraction > 0 and ext.data.ruler_fraction > 0
    assert ext.data.seq_len == 1024 and ext.model.rope_scaling["type"] == "linear"
    assert ext.data.seq_len <= base.data.seq_len * ext.model.rope_scaling["factor"]
    for r in (base, ext):
        assert set(r.eval.ruler_tasks) <= set(r.data.ruler_options["kinds"]), r.eval.ruler_tasks
