"""`make test-recipes` (not in `make test`: ~9 minutes of a 35-minute CI budget).

recipes/passkey-cpu.toml, run exactly as shipped (2 processes, sp = 2, in-training eval),
trains a byte-level model that retrieves the passkey at its trained length: >= 95% over all depths
(pooled, 40 prompts per depth) and no depth below 85%, while an untrained model of the same shape is
at chance; the same checkpoint scores identically on 1 process, on 2 ranks with sp=2, and as an
exported Hugging Face folder; the GPU recipe validates.

Context extension (recipes/passkey-extend-cpu.toml, shortened): the same base checkpoint, continue-tuned
to 1024 tokens (8x) through `model.init_from` with linear PI x8, sp = 2, must beat the base model at
1024 tokens by a measured margin (staged training, RoPE changes and init_from in one check)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, cli_env
from longtrain.launcher.config import load_recipe

RECIPE = REPO / "recipes" / "passkey-cpu.toml"
SAMPLES = 40  # prompts per depth: 200 in all, so one unlucky prompt moves the pooled accuracy by 0.5%
EXTEND = REPO / "recipes" / "passkey-extend-cpu.toml"
EXTEND_STEPS = 250  # of the recipe's 1000, at 4096 tokens each (the recipe: 8192): 74 s on the 2-core box
EXTEND_SAMPLES = 8  # prompts per depth at 1024 tokens (40 in all)
EXTEND_MARGIN = 30.0  # points over the base at 1024; measured with linear PI (the recipe): extended 47.5%, base
#                       0.0% (θ 100k, shipped before: 85.0%; PI relearns every position, so 250 steps get less far)


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          cwd=REPO)
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def _eval(ckpt: Path, out: Path, *extra: str, samples: int = 10) -> dict:
    _run([sys.executable, "-m", "longtrain.launcher.cli", "eval", "passkey", str(ckpt), "--samples", str(samples),
          "--out", str(out), *extra], timeout=300)
    return json.loads((out / "passkey.json").read_text())


def test_gpu_recipe_validates_and_matches_the_task():
    gpu = load_recipe(REPO / "recipes" / "passkey-gpu.toml")
    cpu = load_recipe(RECIPE)
    assert gpu.parallel.sp > 1 and cpu.parallel.sp == 2
    assert gpu.data.passkey_fraction > 0 and gpu.eval.passkey and gpu.eval.every > 0
    assert gpu.data.document_mask == cpu.data.document_mask
    assert gpu.data.seq_len in gpu.eval.lengths and gpu.data.seq_len % (2 * gpu.parallel.sp) == 0


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, str, float]:
    """The recipe exactly as shipped, trained once for this module: (run folder, stdout, seconds)."""
    out = tmp_path_factory.mktemp("passkey-base") / "run"
    t0 = time.perf_counter()
    proc = _run([sys.executable, "-m", "longtrain.launcher.cli", "train", str(RECIPE), "--nproc", "2",
                 "--set", f"run.output_dir={out}"], timeout=1200)
    return out, proc.stdout, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.recipe
def test_passkey_recipe_learns_retrieval_with_sp2(base_run, tmp_path):
    recipe = load_recipe(RECIPE)
    steps, L = recipe.training.steps, str(recipe.data.seq_len)
    out, stdout, train_s = base_run
    assert "sp 2" in stdout, stdout[-2000:]
    ckpt = out / "checkpoints" / f"step_{steps:08d}"

    # the in-training evaluation ran and logged its accuracy next to the loss
    from longtrain.launcher.metrics import read_jsonl

    evals = [r for r in read_jsonl(out / "metrics.jsonl") if f"eval/passkey_acc@{L}" in r]
    assert [r["step"] for r in evals][-1] == steps and len(evals) == steps // recipe.eval.every, evals

    one = _eval(ckpt, tmp_path / "e1", "--lengths", L, samples=SAMPLES)
    acc = np.asarray(one["accuracy"])[0]
    print(f"\ntrained {steps} steps in {train_s:.0f}s; passkey accuracy at {L} by depth: {acc.tolist()}, "
          f"pooled {acc.mean():.1f}; in-training evals: {[r[f'eval/passkey_acc@{L}'] for r in evals]}")
    assert acc.mean() >= 95.0 and acc.min() >= 85.0, one["accuracy"]

    sp2 = _eval(ckpt, tmp_path / "e2", "--lengths", L, "--nproc", "2", "--sp", "2", samples=SAMPLES)
    assert sp2["accuracy"] == one["accuracy"] and sp2["sp"] == 2 and sp2["world_size"] == 2
    np.testing.assert_allclose(sp2["digit_accuracy"], one["digit_accuracy"])

    hf = pytest.importorskip("longtrain.models.hf")
    from longtrain.launcher.eval.cli import load_model

    hf.save_hf_checkpoint(load_model(ckpt).model, tmp_path / "hf")
    # an HF folder has no run next to it: name the same held-out filler documents explicitly
    skip = str(recipe.data.max_documents)
    assert one["filler"] == f"stdlib documents {skip}.. (held out)", one["filler"]
    from_hf = _eval(tmp_path / "hf", tmp_path / "e3", "--lengths", L, "--data", "stdlib", "--skip-documents", skip,
                    samples=SAMPLES)
    assert from_hf["accuracy"] == one["accuracy"] and from_hf["examples"] == one["examples"]

    # an untrained model of the same shape: chance (exact match of 5 random digits: 1e-5)
    import torch.distributed.checkpoint as dcp

    from longtrain.models import ModelConfig, Transformer

    meta = json.loads((ckpt / "meta.json").read_text())
    model = Transformer(ModelConfig(**meta["model"]))
    model.init_weights(seed=123)
    raw = tmp_path / "untrained" / "step_00000000"
    raw.mkdir(parents=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(raw))
    (raw / "meta.json").write_text(json.dumps({**meta, "step": 0}))
    chance = _eval(raw, tmp_path / "e4", "--lengths", L)
    print(f"untrained: accuracy {chance['accuracy']}, digit accuracy {chance['digit_accuracy']}")
    assert np.max(chance["accuracy"]) <= 5.0 and np.mean(chance["digit_accuracy"]) < 40.0


@pytest.mark.slow
@pytest.mark.recipe
def test_context_extension_beats_the_base_at_1024(base_run, tmp_path):
    """A shortened passkey-extend-cpu run (EXTEND_STEPS steps at 1024 tokens, linear PI x8, sp = 2,
    init_from = the base run folder) retrieves at 1024 where the base model cannot."""
    base, _, _ = base_run
    ext = tmp_path / "extend"
    t0 = time.perf_counter()
    proc = _run([sys.executable, "-m", "longtrain.launcher.cli", "train", str(EXTEND), "--nproc", "2",
                 "--set", f"run.output_dir={ext}", "--set", f"model.init_from={base}",
                 "--set", f"training.steps={EXTEND_STEPS}", "--set", "eval.every=0",
                 # the margin was measured at 4096 tokens/step with needle depths u^2 only (85.0%); the recipe's
                 # near_share = 0.5 spends these few steps on near needles (72.5%), not what this test is for
                 "--set", "training.micro_batch=4", "--set", "data.passkey_options={align=true, copy_share=0.1}",
                 "--set", f"checkpoint.interval={EXTEND_STEPS}"], timeout=900)
    train_s = time.perf_counter() - t0
    assert "sp 2" in proc.stdout and "1024 tokens" in proc.stdout, proc.stdout[-2000:]
    meta = json.loads((ext / "checkpoints" / f"step_{EXTEND_STEPS:08d}" / "meta.json").read_text())
    assert meta["model"]["rope_theta"] == 10000.0 and meta["seq_len"] == 1024
    assert meta["model"]["rope_scaling"] == {"type": "linear", "factor": 8.0}
    assert meta["model"]["dim"] == 128 and meta["model"]["n_layers"] == 2  # the base model's shape, not the preset's

    ours = _eval(ext, tmp_path / "e-ext", "--lengths", "1024", samples=EXTEND_SAMPLES)
    theirs = _eval(base, tmp_path / "e-base", "--lengths", "1024", samples=EXTEND_SAMPLES)
    a, b = float(np.mean(ours["accuracy"][0])), float(np.mean(theirs["accuracy"][0]))
    print(f"\nextension: {EXTEND_STEPS} steps in {train_s:.0f}s; passkey at 1024: extended {a:.1f}%, base {b:.1f}%")
    assert a >= b + EXTEND_MARGIN, (ours["accuracy"], theirs["accuracy"])
