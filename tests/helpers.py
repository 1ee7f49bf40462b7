"""Shared helpers for end-to-end tests that drive the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-cpu.toml"

# small, fast settings for CLI runs in tests
FAST = ["data.max_documents=60", "data.seq_len=64", "training.micro_batch=2", "training.warmup=2",
        "metrics.log_every=1", "model.max_seq_len=512"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("LONGTRAIN_FAULT", None)
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)  # a CLI run starts as a fresh shell would, whatever an in-process test left behind
    env.update(extra)
    return env


def train_cmd(out: Path, *sets: str, nproc: int = 2, recipe: Path = TINY) -> list[str]:
    cmd = [sys.executable, "-m", "longtrain.launcher.cli", "train", str(recipe), "--nproc", str(nproc),
           "--set", f"run.output_dir={out}"]
    for s in (*FAST, *sets):
        cmd += ["--set", s]
    return cmd


def run_train(out: Path, *sets: str, nproc: int = 2, timeout: int = 300, check: bool = True,
              recipe: Path = TINY, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(out, *sets, nproc=nproc, recipe=recipe), capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(out: Path) -> dict[int, float]:
    """Per-step loss from metrics.jsonl; the LAST record of a step wins (a resumed run rewrites it)."""
    from longtrain.launcher.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
