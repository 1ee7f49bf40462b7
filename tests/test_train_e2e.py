"""End-to-end training through the CLI on 2 gloo processes: loss, exact resume, crash-safe saves,
TensorBoard events. fp32 on CPU is bit-deterministic, so resumed losses must be identical."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, cli_env, losses, run_train, train_cmd
from longtrain.launcher.checkpoint import is_complete, read_meta, safe_load
from longtrain.models import Transformer, model_config


def _load_model(ckpt: Path) -> dict[str, torch.Tensor]:
    meta = read_meta(ckpt)
    model = Transformer(model_config(None, **{k: v for k, v in meta["model"].items()}))
    sd = {"model": model.state_dict()}
    safe_load(sd, ckpt)
    return sd["model"]


def test_loss_falls_and_run_folder(tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, "training.steps=24", "checkpoint.interval=12", "training.lr=5e-3")
    ls = losses(out)
    assert sorted(ls) == list(range(1, 25))
    assert ls[24] < ls[1] - 1.0, ls  # bytes start near ln(320)=5.8
    assert (out / "recipe.resolved.toml").is_file()
    assert any(out.glob("events.out.tfevents.*"))  # in the run folder: `tensorboard --logdir runs` names it
    assert is_complete(out / "checkpoints" / "step_00000024")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000024"
    assert "first loss" in proc.stdout and "tok/s" in proc.stdout and "ETA" in proc.stdout


def test_exact_resume_after_sigkill(tmp_path):
    n = 8
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(straight, f"training.steps={n}", f"checkpoint.interval={n // 2}")
    # second run: pause right after publishing step n/2, then SIGKILL the whole job
    cmd = train_cmd(killed, f"training.steps={n}", f"checkpoint.interval={n // 2}")
    piddir = tmp_path / "pids"
    piddir.mkdir()
    proc = subprocess.Popen(cmd, env=cli_env(LONGTRAIN_FAULT=f"pause_after_save:{n // 2}",
                                             LONGTRAIN_FAULT_PIDDIR=str(piddir)), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = killed / "checkpoints" / f"step_{n // 2:08d}"
    deadline = time.time() + 240
    while not ((killed / "checkpoints" / "latest").is_file() and is_complete(ckpt)
               and len(list(piddir.glob("rank*.pid"))) == 2):
        assert proc.poll() is None, "training exited before the checkpoint"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.5)
    time.sleep(1.0)
    # SIGKILL the training processes (torchrun gives each worker a session of its own) and the launcher
    for f in piddir.glob("rank*.pid"):
        os.kill(int(f.read_text()), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(killed)) == n // 2  # nothing after the checkpoint was logged
    run_train(killed, f"training.steps={n}", f"checkpoint.interval={n // 2}")
    a, b = losses(straight), losses(killed)
    for step in range(n // 2 + 1, n + 1):
        assert a[step] == b[step], (step, a[step], b[step])
    pa = _load_model(straight / "checkpoints" / f"step_{n:08d}")
    pb = _load_model(killed / "checkpoints" / f"step_{n:08d}")
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_crash_during_save_keeps_previous(tmp_path):
    out = tmp_path / "run"
    proc = run_train(out, "training.steps=6", "checkpoint.interval=2", check=False,
                     LONGTRAIN_FAULT="crash_during_save:4")
    assert proc.returncode != 0
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert (ck / "step_00000004.tmp").is_dir()  # the partial save is left behind...
    assert not (ck / "step_00000004").exists()
    assert read_meta(ck / "step_00000002")["step"] == 2
    _load_model(ck / "step_00000002")  # ...and the previous checkpoint still loads
    run_train(out, "training.steps=6", "checkpoint.interval=2")
    assert not (ck / "step_00000004.tmp").exists()  # ...and is cleaned at the next start
    assert (ck / "latest").read_text().strip() == "step_00000006"
    assert sorted(losses(out)) == list(range(1, 7))


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_train(out, "training.steps=6", "checkpoint.interval=6", "metrics.log_every=2")
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tokens_per_s_per_process",
                "perf/step_time_s", "memory/used_mb"):
        assert tag in tags, (tag, tags)
    logged = {1, 2, 4, 6}
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"):
        assert {e.step for e in acc.Scalars(tag)} == logged, tag
    ls = losses(out)
    for e in acc.Scalars("train/loss"):
        assert e.value == pytest.approx(ls[e.step], rel=1e-6)
