"""Hybrid sharding (`parallel.dp_replicate`, FSDP2 over a (replicate, shard) mesh) trains exactly as
plain FSDP2: 4 gloo processes, fp32, per-step losses within 1e-5 over 20 steps, with sp = 2 too
(there under `auto` on 2 emulated nodes of 2 processes); DCP checkpoints reshard between hybrid and
plain both ways and the resumed run continues with the uninterrupted run's losses; bad values stop
with one line and exit 2. (The planner's traffic model is in tests/test_plan.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, TINY, cli_env, losses, run_train, train_cmd
from longtrain.errors import ConfigError
from longtrain.launcher.config import load_recipe
from longtrain.parallel.rules import choose_dp_replicate

STEPS = 20
COMMON = [f"training.steps={STEPS}", "training.schedule=constant", "training.dtype=fp32", "checkpoint.interval=10",
          "checkpoint.keep_last=5", "metrics.tensorboard=false"]
HYBRID_LOG = "FSDP2 sharding: hybrid, 2 replicas x 2 ranks"


def _close(got: dict[int, float], want: dict[int, float], steps: list[int]) -> float:
    """Largest |difference| over `steps` (asserting every step is there)."""
    assert all(s in got and s in want for s in steps), (sorted(got), sorted(want), steps)
    return max(abs(got[s] - want[s]) for s in steps)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    run_train(out, *COMMON, "parallel.dp_replicate=1", nproc=4)
    return out


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    proc = run_train(out, *COMMON, "parallel.dp_replicate=2", nproc=4)
    assert f"{HYBRID_LOG} (set in the recipe)" in proc.stdout, proc.stdout[-2000:]
    return out


def test_hybrid_equals_plain_over_20_steps(plain, hybrid):
    diff = _close(losses(hybrid), losses(plain), list(range(1, STEPS + 1)))
    print(f"dp_replicate 2 vs 1, 4 processes, {STEPS} fp32 steps: max |loss diff| {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("saved,resume_with", [("hybrid", 1), ("plain", 2)])
def test_checkpoint_reshards_between_hybrid_and_plain(plain, hybrid, tmp_path, saved, resume_with):
    """Step 10 of one run, resumed with the other sharding, continues as the uninterrupted run."""
    ck = {"plain": plain, "hybrid": hybrid}[saved] / "checkpoints" / "step_00000010"
    out = tmp_path / "resumed"
    proc = run_train(out, *COMMON, "training.steps=13", f"checkpoint.resume={ck}",
                     f"parallel.dp_replicate={resume_with}", nproc=4)
    assert "resumed from" in proc.stdout and "step_00000010" in proc.stdout, proc.stdout[-2000:]
    assert (HYBRID_LOG in proc.stdout) == (resume_with == 2)
    diff = _close(losses(out), losses(plain), [11, 12, 13])
    print(f"saved by {saved}, resumed with dp_replicate={resume_with}: max |loss diff| vs uninterrupted {diff:.2e}")
    assert diff < 1e-5


def _emulated_nodes(out, *sets: str, nodes: int = 2, per_node: int = 2) -> list[subprocess.CompletedProcess]:
    """`longtrain train` as torchrun would start it on `nodes` hosts: RANK, LOCAL_RANK and
    LOCAL_WORLD_SIZE per process (LOCAL_WORLD_SIZE < WORLD_SIZE: the run spans nodes)."""
    from longtrain.testing import free_port

    cmd = train_cmd(out, *sets)
    del cmd[cmd.index("--nproc"):cmd.index("--nproc") + 2]
    port, world = str(free_port()), nodes * per_node
    # TORCHELASTIC_RUN_ID: end like torchrun's workers (cli._worker_exit), not through the interpreter's
    # teardown, which now and then aborts in a torch C++ thread ("terminate called without an active exception")
    procs = [subprocess.Popen(cmd, env=cli_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r % per_node),
                                               LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR="127.0.0.1",
                                               MASTER_PORT=port, TORCHELASTIC_RUN_ID="emulated"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for r in range(world)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    assert all(p.returncode == 0 for p in done), [(p.returncode, p.stderr[-2000:]) for p in done]
    return done


def test_hybrid_with_sp2_auto_on_two_nodes_equals_plain(tmp_path):
    """sp = 2: an sp group is 2 consecutive ranks, so is a shard group (one node); `auto` picks 2 replicas
    when the run spans 2 nodes (and 1 on one node)."""
    sets = ["training.steps=5", "training.dtype=fp32", "parallel.sp=2", "metrics.tensorboard=false"]
    one_node = run_train(tmp_path / "plain", *sets, "parallel.dp_replicate=auto", nproc=4)
    assert "FSDP2 sharding: plain over all 4 ranks (auto: one node)" in one_node.stdout, one_node.stdout[-2000:]
    rank0 = _emulated_nodes(tmp_path / "hybrid", *sets, "parallel.dp_replicate=auto")[0]
    assert f"{HYBRID_LOG} (auto: 2 nodes" in rank0.stdout, rank0.stdout[-2000:]
    diff = _close(losses(tmp_path / "hybrid"), losses(tmp_path / "plain"), [1, 2, 3, 4, 5])
    print(f"sp=2: dp_replicate auto (2 nodes x 2) vs plain: max |loss diff| {diff:.2e}")
    assert diff < 1e-5


def _assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("longtrain: error:"), proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_replicate_not_dividing_the_world_is_one_line_under_nproc(tmp_path):
    """Only the workers know the world size: the check runs there, torchrun's report stays hidden."""
    proc = run_train(tmp_path / "out", "training.steps=2", "parallel.dp_replicate=3", nproc=4, check=False)
    _assert_one_line(proc, "world size 4", "parallel.dp_replicate = 3")


@pytest.mark.parametrize("sets,needle", [
    (["parallel.dp_replicate=0"], "must be an integer >= 1"),
    (["parallel.dp_replicate='two'"], "must be an integer >= 1"),
    (["parallel.dp_replicate=2", "parallel.dp_engine='ddp'"], "needs parallel.dp_engine"),
    (["parallel.dp_replicate='auto'", "parallel.dp_engine='deepspeed'"], "needs parallel.dp_engine"),
])
def test_bad_values_in_the_recipe(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        load_recipe(TINY, sets)


def test_bad_value_is_one_line_before_any_process_starts():
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train", str(TINY), "--nproc", "4",
                           "--set", "parallel.dp_replicate=0"], capture_output=True, text=True, timeout=120,
                          env=cli_env(), cwd=REPO)
    _assert_one_line(proc, "parallel.dp_replicate")


def test_auto_rule():
    fits, tight = (lambda r: True), (lambda r: False)
    assert choose_dp_replicate("auto", world=16, local_world=8, fits=fits)[0] == 2
    assert choose_dp_replicate("auto", world=16, local_world=8, fits=tight)[0] == 1  # needs all 16 shards
    assert choose_dp_replicate("auto", world=8, local_world=8, fits=fits)[0] == 1  # one node
    assert choose_dp_replicate(4, world=16, local_world=8, fits=tight)[0] == 4  # a number is taken as is
