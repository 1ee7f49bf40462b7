"""Shared helpers for end-to-end tests that drive the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-cpu.toml"

# training.collective_timeout_s of the hang drills (a rank stops; a survivor reports): long enough for
# the start-up collectives of a loaded 2-core machine, short enough not to dominate the suite
HANG_S = 15

# small, fast settings for CLI runs in tests
FAST = ["data.max_documents=60", "data.seq_len=64", "training.micro_batch=2", "training.warmup=2",
        "metrics.log_every=1", "model.max_seq_len=512"]


def engine_matrix_sets(engine: str, impl: str, policy: str) -> list[str]:
    """The 2-rank case the memory techniques are checked under: sp = 2 with `impl`, `engine`, packed
    documents, a window layer, 2 accumulation steps, checkpointing `policy`, 4 steps of 128 tokens."""
    return ["training.steps=4", "checkpoint.interval=100", "data.seq_len=128", "training.micro_batch=2",
            "training.grad_accum=2", "training.lr=1e-3", "data.document_mask=true",
            "model.attention=['full','window:48']", "parallel.sp=2", f"parallel.sp_impl={impl}",
            f"parallel.dp_engine={engine}", f"training.activation_checkpointing='{policy}'"]


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


def run_cli(cmd: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) with output captured. A run past `timeout` s fails with every longtrain
    process's thread stacks (SIGUSR2: faulthandler, see cli.main), and its whole tree is killed (not
    only the launcher: torchrun and the workers would outlive it)."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=REPO) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            from longtrain.launcher.faults import process_tree

            tree = process_tree(p.pid)
            for pid in tree:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    if b"longtrain.launcher.cli" in cmdline and b"torch.distributed.run" not in cmdline:
                        os.kill(pid, signal.SIGUSR2)
                except OSError:
                    pass
            time.sleep(3.0)
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            out, err = p.communicate()
            raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd[2:6])} ...\n{out[-3000:]}\n"
                                 f"--- stderr with the stacks of every process:\n{err[-20000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_train(out: Path, *sets: str, nproc: int = 2, timeout: int = 300, check: bool = True,
              recipe: Path = TINY, **env: str) -> subprocess.CompletedProcess:
    proc = run_cli(train_cmd(out, *sets, nproc=nproc, recipe=recipe), timeout, cli_env(**env))
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def steps_logged(out: Path) -> int:
    """Training steps in metrics.jsonl so far: lines with a loss (eval, MoH and plan-check records have none)."""
    f = out / "metrics.jsonl"
    return sum('"loss":' in line for line in f.read_text().splitlines()) if f.is_file() else 0


def losses(out: Path) -> dict[int, float]:
    """Per-step loss from metrics.jsonl; the LAST record of a step wins (a resumed run rewrites it)."""
    from longtrain.launcher.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r}
