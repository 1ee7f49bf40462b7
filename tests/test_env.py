"""Environment discovery (torchrun > Slurm > MPI > single) and clear one-line errors for bad launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FAST, REPO, TINY, cli_env
from longtrain.errors import LaunchError
from longtrain.launcher import env as E

_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
         "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS",
         "CUDA_VISIBLE_DEVICES"]


@pytest.fixture
def clean_env(monkeypatch):
    saved = dict(os.environ)
    for v in list(os.environ):
        if v in _VARS or v.startswith("SLURM_") or v.startswith("TORCHELASTIC"):
            monkeypatch.delenv(v, raising=False)
    E.reset_discovery()
    yield monkeypatch
    E.reset_discovery()
    monkeypatch.undo()  # first: undo would otherwise put back a variable a test deleted after discovery set it
    for v in _VARS:  # discovery exports the torchrun variables: take them back out
        if v not in saved:
            os.environ.pop(v, None)


def _set(mp, **kv):
    for k, v in kv.items():
        mp.setenv(k, str(v))


def test_single_process(clean_env):
    env = E.discover()
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")
    assert not E.under_launcher()


def test_torchrun(clean_env):
    _set(clean_env, RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, MASTER_ADDR="node1", MASTER_PORT=1234)
    env = E.discover()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert (env.master_addr, env.master_port, env.source) == ("node1", 1234, "torchrun")
    assert E.under_launcher()


def test_torchrun_beats_slurm(clean_env):
    _set(clean_env, RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=2222,
         SLURM_STEP_ID=0, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_LOCALID=0, SLURM_JOB_NODELIST="x")
    env = E.discover()
    assert (env.source, env.rank, env.world_size) == ("torchrun", 1, 2)


@pytest.mark.parametrize("kv,needles", [
    (dict(RANK=0, WORLD_SIZE=2), ["MASTER_ADDR is missing"]),
    (dict(RANK=0), ["half-set", "WORLD_SIZE"]),
    (dict(WORLD_SIZE=4, MASTER_ADDR="h"), ["half-set", "RANK"]),
    (dict(LOCAL_RANK=0), ["half-set", "RANK", "WORLD_SIZE"]),
    (dict(RANK=4, WORLD_SIZE=4, MASTER_ADDR="h"), ["RANK=4", "outside"]),
    (dict(RANK="one", WORLD_SIZE=2, MASTER_ADDR="h"), ["RANK", "not an integer"]),
    (dict(RANK=0, WORLD_SIZE=2, MASTER_ADDR="h", MASTER_PORT=70000), ["MASTER_PORT"]),
    (dict(SLURM_JOB_ID=7, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_LOCALID=0), ["not started by srun"]),
    (dict(SLURM_STEP_ID=0, SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_JOB_NODELIST="n1"), ["SLURM_LOCALID"]),
    (dict(SLURM_STEP_ID=0, SLURM_PROCID=2, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_JOB_NODELIST="n1"), ["outside"]),
])
def test_half_set_environments(clean_env, kv, needles):
    _set(clean_env, **kv)
    with pytest.raises(LaunchError) as e:
        E.discover()
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_slurm_step(clean_env):
    _set(clean_env, SLURM_JOB_ID=123456, SLURM_STEP_ID=0, SLURM_PROCID=5, SLURM_NTASKS=8, SLURM_STEP_NUM_TASKS=7,
         SLURM_LOCALID=1, SLURM_NODEID=1, SLURM_STEP_TASKS_PER_NODE="3(x2),1",
         SLURM_STEP_NODELIST="gpu[07-09]", SLURM_JOB_NODELIST="gpu[07-10]")
    env = E.discover()
    # step values win over job values; node 1 runs 3 tasks; rank 0 lives on the step's first host
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 7, 1, 3)
    assert env.master_addr == "gpu07" and env.master_port == 29500 + 123456 % 20000 and env.source == "slurm"
    assert E.under_launcher()
    # exported for code that reads them itself (DeepSpeed's engine asserts LOCAL_RANK is set)
    assert {v: os.environ[v] for v in _VARS[:6]} == {
        "RANK": "5", "WORLD_SIZE": "7", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(29500 + 123456 % 20000)}
    E.reset_discovery()  # and a second discovery (now through the torchrun variables) agrees
    again = E.discover()
    assert (again.rank, again.world_size, again.local_rank, again.local_world_size, again.master_port) == \
        (5, 7, 1, 3, env.master_port)


def test_torchrun_values_are_kept_and_gaps_filled(clean_env):
    _set(clean_env, RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=2345)
    env = E.discover()
    assert (env.local_rank, env.local_world_size, env.source) == (1, 2, "torchrun")
    assert (os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("1", "2", "2345")


def test_single_process_exports_nothing(clean_env):
    assert E.discover().source == "single"
    assert not any(v in os.environ for v in _VARS[:6]) and not E.under_launcher()


@pytest.mark.parametrize("source,visible,cvd,index", [
    ("slurm", 1, "3", 0),        # srun --gpus-per-task=1: every task sees its own GPU as cuda:0
    ("mpi", 1, "2", 0),          # mpirun wrapper exporting CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK
    ("slurm", 2, "4,5", 0),      # --gpus-per-task=2: the first of its own two
    ("slurm", 4, "0,1,2,3", 2),  # no binding: the node's GPUs, one per local rank
    ("torchrun", 4, None, 2),
])
def test_per_task_gpu_binding(clean_env, source, visible, cvd, index):
    if cvd is not None:
        clean_env.setenv("CUDA_VISIBLE_DEVICES", cvd)
    assert E.cuda_device_index(2, 4, visible, source) == index


@pytest.mark.parametrize("source,visible,cvd", [("torchrun", 1, "0"), ("slurm", 1, None), ("slurm", 1, "")])
def test_too_few_gpus_without_binding(clean_env, source, visible, cvd):
    if cvd is not None:
        clean_env.setenv("CUDA_VISIBLE_DEVICES", cvd)
    with pytest.raises(LaunchError, match="local rank 2 of 4 needs GPU 2 but only 1 is visible"):
        E.cuda_device_index(2, 4, visible, source)
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: visible)
    with pytest.raises(LaunchError, match="4 processes per node need 4 GPUs but only 1 is visible"):
        E.check_gpus(4, "auto", source)


def test_srun_task_with_one_bound_gpu_initialises_on_cuda0(clean_env):
    """A fake srun task (rank 3, local rank 3 of 4 on node 0, one GPU bound to it): the checks pass,
    cuda:0 is selected, and the torchrun variables are exported before the process group starts."""
    _set(clean_env, SLURM_JOB_ID=9, SLURM_STEP_ID=0, SLURM_PROCID=3, SLURM_NTASKS=8, SLURM_LOCALID=3,
         SLURM_NODEID=0, SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_STEP_NODELIST="localhost",
         CUDA_VISIBLE_DEVICES="3")
    seen: dict = {}
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 1)
    clean_env.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set_device", d))
    clean_env.setattr(E, "_report_placement", lambda env: None)
    import torch.distributed as dist

    def fake_init(backend, **kw):
        seen.update(backend=backend, device_id=kw.get("device_id"),
                    env={v: os.environ.get(v) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")})

    clean_env.setattr(dist, "is_initialized", lambda: False)
    clean_env.setattr(dist, "init_process_group", fake_init)
    env, dev = E.init_distributed("auto")
    assert (env.rank, env.local_rank, env.local_world_size, env.source) == (3, 3, 4, "slurm")
    assert dev == torch.device("cuda", 0) and seen["set_device"] == 0 and seen["device_id"] == dev
    assert seen["backend"] == "nccl"
    assert seen["env"] == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}


def test_slurm_master_addr_override_and_batch_shell(clean_env):
    _set(clean_env, SLURM_JOB_ID=1, SLURM_STEP_ID=3, SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0,
         SLURM_JOB_NODELIST="a,b", MASTER_ADDR="10.0.0.1", MASTER_PORT=4000, SLURM_TASKS_PER_NODE="1(x2)")
    env = E.discover()
    assert (env.master_addr, env.master_port, env.local_world_size) == ("10.0.0.1", 4000, 1)
    # the batch script of a 1-task job is a plain single process (another process: no exported variables)
    E.reset_discovery()
    for v in ("SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(v, None)  # not delenv: its undo would restore the values discovery exported
    _set(clean_env, SLURM_NTASKS=1)
    assert E.discover().source == "single" and not E.under_launcher()


def test_expand_nodelist_and_tasks():
    assert E.expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert E.expand_nodelist("n[8-10]-ib") == ["n8-ib", "n9-ib", "n10-ib"]
    assert E.expand_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert E.expand_tasks_per_node("2") == [2]
    with pytest.raises(LaunchError):
        E.expand_tasks_per_node("2(y3)")


def test_check_world():
    E.check_world(E.DistEnv(0, 4, 0, 4, "h", 1, "torchrun"), sp=2)
    with pytest.raises(LaunchError, match="world size 6 .* not divisible by parallel.sp = 4"):
        E.check_world(E.DistEnv(0, 6, 0, 6, "h", 1, "slurm"), sp=4)


def test_check_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert E.check_gpus(2) is True
    assert E.check_gpus(8, "cpu") is False
    with pytest.raises(LaunchError, match=r"4 processes per node need 4 GPUs but only 2 are visible.*'0,1'"):
        E.check_gpus(4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert E.check_gpus(4) is False  # auto -> CPU
    with pytest.raises(LaunchError, match="no CUDA GPU is visible"):
        E.check_gpus(1, "cuda")


# ---- through the CLI: one line, exit 2, no hang -----------------------------------------------

def _main(capsys, *args) -> tuple[int, str]:
    from longtrain.launcher.cli import main

    rc = main(["train", str(TINY), *[x for s in FAST for x in ("--set", s)], *args])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("longtrain: error:"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_more_gpus_than_visible(clean_env, capsys):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 1)
    _one_line(*_main(capsys, "--nproc", "2"), "2 processes per node need 2 GPUs but only 1 is visible")
    # under a launcher: every rank refuses before the rendezvous
    _set(clean_env, RANK=0, WORLD_SIZE=4, LOCAL_RANK=0, LOCAL_WORLD_SIZE=4, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    _one_line(*_main(capsys), "4 processes per node need 4 GPUs but only 1 is visible")


def test_cli_world_not_divisible_by_sp(clean_env, capsys):
    _one_line(*_main(capsys, "--nproc", "3", "--set", "parallel.sp=2"), "--nproc 3", "parallel.sp = 2")
    # RANK 0 of 3 with nobody else started: must fail at once, not wait at the rendezvous
    _set(clean_env, RANK=0, WORLD_SIZE=3, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    _one_line(*_main(capsys, "--set", "parallel.sp=2"), "world size 3", "parallel.sp = 2")


def test_cli_subprocess_missing_master_addr():
    env = cli_env(RANK="0", WORLD_SIZE="2")
    for v in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(v, None)
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train", str(TINY)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "MASTER_ADDR is missing" in lines[0] and "Traceback" not in proc.stdout, proc.stderr


def test_the_launcher_reads_a_recipe_without_importing_torch():
    """`longtrain train --nproc N` validates the recipe and starts torchrun without paying for torch
    (about 2 s per launch): models/ loads lazily, the GPU check looks for a driver first."""
    code = ("import sys; from longtrain.launcher.config import load_recipe; from longtrain.launcher import env; "
            "r = load_recipe('recipes/tiny-cpu.toml'); env.under_launcher(); "
            "print(env.check_gpus(2, r.training.device), sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    if torch.cuda.is_available() or any(os.path.exists(p) for p in E.GPU_DEVICE_NODES):
        pytest.skip("a GPU driver is present: the check asks torch")
    assert out.stdout.split() == ["False", "[]"], out.stdout
    # and the names models/ exports still resolve
    from longtrain.models import LocalAttention, Transformer, lm_loss_sum  # noqa: F401
    import longtrain.models as M

    with pytest.raises(AttributeError):
        M.no_such_name  # noqa: B018


def test_closing_the_process_groups_keeps_them_until_the_next_close():
    """close_process_groups shuts the groups down but keeps them referenced (their C++ destructor
    joins gloo's workers under the GIL: a teardown deadlock, once in ~40 two-rank DDP runs); the
    next close releases the previous ones."""
    import torch.distributed as dist

    from longtrain.parallel import comm
    from longtrain.testing import free_port

    first: list = []
    for round_ in range(2):
        store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
        dist.init_process_group("gloo", rank=0, world_size=1, store=store)
        sub = dist.new_group([0])
        x = torch.ones(4)
        dist.all_reduce(x, group=sub)
        groups = [dist.group.WORLD, sub]
        comm.close_process_groups()
        assert not dist.is_initialized()
        assert all(any(g is r for r in comm._RETIRED) for g in groups), "closed groups must stay referenced"
        if round_ == 0:
            first = groups
        else:
            assert not any(g is r for g in first for r in comm._RETIRED), "the previous groups are released"
    comm.close_process_groups()  # nothing initialised: a no-op


def test_process_tree_reaches_grandchildren_in_sessions_of_their_own():
    """What the test helpers kill on a timeout (and bench data measures): every process below a root."""
    import time

    from longtrain.launcher.faults import process_tree

    proc = subprocess.Popen(["bash", "-c", "setsid sleep 30 & wait"])
    try:
        deadline = time.time() + 10
        while len(process_tree(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        tree = process_tree(proc.pid)
        assert tree[0] == proc.pid and len(tree) == 2, tree
        assert b"sleep" in Path(f"/proc/{tree[1]}/cmdline").read_bytes()
    finally:
        for pid in process_tree(proc.pid)[::-1]:
            os.kill(pid, 9)
        proc.wait()
