"""A real single-node Slurm (slurm-wlm + munge, state under a temp folder, slurm/local-cluster.sh)
runs both sbatch templates for the tiny recipe with 2 CPU tasks: the jobs finish, losses fall,
checkpoints appear, a resubmission resumes, and a USR1 'preemption' requeues the job, which resumes.

Skips (with the reason) where Slurm cannot be installed: not root, no apt-get, or the install fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST, HANG_S, REPO, TINY, cli_env, losses

pytestmark = pytest.mark.slurm
SCRIPT = REPO / "slurm" / "local-cluster.sh"
JOB_SETS = [*FAST, "checkpoint.interval=3", "metrics.tensorboard=false"]


def _ensure_slurm() -> None:
    if os.geteuid() != 0:
        pytest.skip("the Slurm tier runs a local slurmctld/slurmd/munged as root; not root here")
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        pytest.skip("Slurm is not installed and apt-get/dpkg are unavailable to install slurm-wlm and munge")
    proc = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not shutil.which("slurmctld"):
        pytest.skip(f"could not install slurm-wlm and munge with apt-get: {(proc.stderr or proc.stdout).strip()[-300:]}")


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = cli_env(SLURM_CONF=str(root / "etc" / "slurm.conf"))
        for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(v, None)

    def submit(self, out: Path, mode: str, *sets: str, extra: tuple[str, ...] = (), nodes: int = 1,
               procs: int = 2) -> str:
        cmd = [sys.executable, "-m", "longtrain.launcher.cli", "slurm", str(TINY), "--nodes", str(nodes),
               "--gpus-per-node", "0", "--procs-per-node", str(procs), "--cpus-per-node", "2", "--mode", mode,
               "--time", "00:10:00", "--set", f"run.output_dir={out}", *extra, "--submit"]
        for s in (*JOB_SETS, *sets):
            cmd += ["--set", s]
        proc = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        m = re.search(r"submitted batch job (\d+)", proc.stdout)
        assert m, proc.stdout
        return m.group(1)

    def job(self, job_id: str) -> dict[str, str]:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def ended(self, job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
        """Wait for the job to end, however it ends."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} did not end in {timeout}s: {self.job(job_id)}\n{_tail(log)}")

    def wait(self, job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                assert info["JobState"] == "COMPLETED", (info, _tail(log))
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s: {self.job(job_id)}\n{_tail(log)}")


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text()[-n:] if log.is_file() else f"(no log {log})"


def _log(out: Path, job_id: str) -> Path:
    return out / "logs" / f"tiny-cpu-{job_id}.out"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _ensure_slurm()
    root = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(root), "8"], capture_output=True, text=True, timeout=180)
    try:
        assert proc.returncode == 0, f"local Slurm did not start: {proc.stderr}"
        yield Cluster(root)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(root)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def first_jobs(cluster, tmp_path_factory):
    """Submit everything at once (the node has room for all): both templates, and a preemption run."""
    runs = tmp_path_factory.mktemp("runs")
    jobs = {mode: (runs / mode, cluster.submit(runs / mode, mode, "training.steps=6")) for mode in ("torchrun", "srun")}
    # DeepSpeed reads LOCAL_RANK itself: srun tasks must export it (env.export_env)
    ds = runs / "deepspeed-srun"
    jobs["deepspeed-srun"] = (ds, cluster.submit(ds, "srun", "training.steps=4", "parallel.dp_engine=deepspeed",
                                                 "parallel.zero_stage=2"))
    # pauses after publishing step 3 until the test 'preempts' it
    pre = runs / "preempt"
    jobs["preempt"] = (pre, cluster.submit(pre, "srun", "training.steps=6",
                                           extra=("--env", "LONGTRAIN_FAULT=pause_after_save:3")))
    # the same through the torchrun template (the trap's SIGTERM goes srun -> torchrun -> workers);
    # it may wait in the queue for a free slot
    pre_t = runs / "preempt-torchrun"
    jobs["preempt-torchrun"] = (pre_t, cluster.submit(pre_t, "torchrun", "training.steps=6",
                                                      extra=("--env", "LONGTRAIN_FAULT=pause_after_save:3")))
    return jobs


@pytest.fixture(scope="module")
def fault_jobs(cluster, tmp_path_factory):
    """Submitted together once the jobs above are through (the paused preemption jobs hold CPUs until
    their test): a rank that stops at step 5 (both templates), a rank of 3 that dies at step 4 (srun)."""
    runs = tmp_path_factory.mktemp("faults")
    jobs = {}
    for mode in ("srun", "torchrun"):
        out = runs / f"hang-{mode}"
        jobs[f"hang-{mode}"] = (out, cluster.submit(out, mode, "training.steps=6", f"training.collective_timeout_s={HANG_S}",
                                                    extra=("--env", "LONGTRAIN_FAULT=hang:5:1")))
    dead = runs / "dead-srun"
    jobs["dead-srun"] = (dead, cluster.submit(dead, "srun", "training.steps=6", procs=3,
                                              extra=("--env", "LONGTRAIN_FAULT=die:4:2")))
    return jobs


@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_template_trains(cluster, first_jobs, mode):
    out, job = first_jobs[mode]
    cluster.wait(job, _log(out, job))
    log = _log(out, job).read_text()
    assert "done: 6 steps" in log and "world 2 (dp 2 x sp 1" in log, log[-2000:]
    ls = losses(out)
    assert sorted(ls) == list(range(1, 7)) and ls[6] < ls[1] - 1.0, ls
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000006"
    assert (ck / "step_00000003" / "meta.json").is_file() and (ck / "step_00000006" / "meta.json").is_file()
    launcher = "torchrun" if mode == "torchrun" else "slurm"  # srun mode: ranks from SLURM_* variables
    assert f'launcher = "{launcher}"' in (out / "recipe.resolved.toml").read_text()


def test_deepspeed_under_srun(cluster, first_jobs):
    out, job = first_jobs["deepspeed-srun"]
    cluster.wait(job, _log(out, job))
    log = _log(out, job).read_text()
    assert "done: 4 steps" in log and "world 2 (dp 2 x sp 1" in log, log[-2000:]
    ls = losses(out)
    assert sorted(ls) == list(range(1, 5)) and ls[4] < ls[1] - 0.5, ls
    assert 'launcher = "slurm"' in (out / "recipe.resolved.toml").read_text()
    assert (out / "checkpoints" / "step_00000003" / "deepspeed").is_dir()  # DeepSpeed's own files, per rank


def test_templates_agree(cluster, first_jobs):
    for mode in ("torchrun", "srun"):
        out, job = first_jobs[mode]
        cluster.wait(job, _log(out, job))
    a, b = losses(first_jobs["torchrun"][0]), losses(first_jobs["srun"][0])
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-6), (s, a, b)


def test_resubmission_resumes(cluster, first_jobs):
    new = {}
    for mode in ("torchrun", "srun"):
        out, job = first_jobs[mode]
        cluster.wait(job, _log(out, job))
        new[mode] = cluster.submit(out, mode, "training.steps=9")
    for mode, job in new.items():
        out = first_jobs[mode][0]
        cluster.wait(job, _log(out, job))
        log = _log(out, job).read_text()
        assert re.search(r"resumed from \S+step_00000006 at step 6", log), log[-2000:]
        assert "done: 9 steps" in log
        assert sorted(losses(out)) == list(range(1, 10))
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000009"


@pytest.mark.parametrize("which", ["preempt", "preempt-torchrun"])
def test_preemption_requeues_and_resumes(cluster, first_jobs, which):
    """USR1 to the batch script (what --signal=B:USR1@120 does at a time limit or preemption) while
    the job is paused after publishing step 3: the workers get the signal, exit 75, the job is
    requeued and resumes from step 3."""
    out, job = first_jobs[which]
    text = preempt_and_finish(cluster, job, out)
    assert re.search(r"resumed from \S+step_00000003 at step 3", text), text[-3000:]
    assert "done: 6 steps" in text
    ls = losses(out)
    assert sorted(ls) == list(range(1, 7)) and ls[6] < ls[1] - 1.0


def preempt_and_finish(cluster: Cluster, job: str, out: Path) -> str:
    """Wait until `job` (started with LONGTRAIN_FAULT=pause_after_save:3) has published step 3, send the
    batch script USR1, let the requeued job start at once, wait for it to complete; returns its log."""
    log = _log(out, job)
    deadline = time.time() + 420
    while not (out / "checkpoints" / "step_00000003" / "meta.json").is_file():
        assert time.time() < deadline, _tail(log)
        state = cluster.job(job).get("JobState")  # CONFIGURING/REQUEUED etc. show up on a loaded machine
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"), \
            (cluster.job(job), _tail(log))
        time.sleep(1)
    time.sleep(1)
    # what Slurm does before a time limit / preemption with --signal=B:USR1@120
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    # Slurm holds a requeued job ~2 minutes (BeginTime); once it is back in the queue, let it start now
    while True:
        info = cluster.job(job)
        assert time.time() < deadline, (info, _tail(log))
        if info.get("Restarts", "0") != "0" and info.get("JobState") == "PENDING":
            upd = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env,
                                 capture_output=True, text=True)
            if upd.returncode == 0:
                break
        elif info.get("Restarts", "0") != "0" and info.get("JobState") in ("RUNNING", "COMPLETED"):
            break
        time.sleep(0.5)
    info = cluster.wait(job, log)
    assert info["Restarts"] == "1"
    text = log.read_text()
    assert "requeueing" in text and "(restart 1)" in text, text[-3000:]
    return text


# ---- `longtrain slurm` without a cluster: the filled templates and its errors ---------------------

def _slurm_cli(capsys, *args: str) -> tuple[int, str, str]:
    from longtrain.launcher.cli import main

    rc = main(["slurm", str(TINY), *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def test_filled_torchrun_template(capsys, tmp_path):
    rc, out, err = _slurm_cli(capsys, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account",
                              "proj42", "--time", "48:00:00", "--env", "NCCL_SOCKET_IFNAME=ib0",
                              "--setup", "module load cuda/12.4", "--set", "parallel.sp=16",
                              "--set", "data.text_field=body text")
    assert rc == 0, err
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj42", "#SBATCH --time=48:00:00",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "#SBATCH --open-mode=append",
                 "export NCCL_SOCKET_IFNAME=ib0", "module load cuda/12.4", "PROCS_PER_NODE=8",
                 "--rdzv-backend=c10d", "trap requeue USR1", "# world 32 = 4 node(s) x 8 processes; dp 2 x sp 16"):
        assert line in out, line
    assert "OVERRIDES=(--set parallel.sp=16 --set 'data.text_field=body text')" in out
    assert re.search(r"#SBATCH --output=\S+/logs/%x-%j.out", out)
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid shell


def test_filled_srun_template(capsys):
    rc, out, err = _slurm_cli(capsys, "--nodes", "2", "--gpus-per-node", "4", "--mode", "srun", "--mpi", "pmix",
                              "--cpus-per-node", "32")
    assert rc == 0, err
    for line in ("#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8", "MPI=${LONGTRAIN_SRUN_MPI:-pmix}",
                 'srun --mpi="$MPI"', "export MASTER_PORT=$((29500 + SLURM_JOB_ID % 20000))",
                 "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}"):
        assert line in out, line
    # env.py's default rendezvous port for srun tasks is the same rule
    from longtrain.launcher.env import DEFAULT_PORT

    assert DEFAULT_PORT == 29500


@pytest.mark.parametrize("args,needle", [
    (["--nodes", "1", "--gpus-per-node", "8", "--procs-per-node", "3", "--set", "parallel.sp=2"],
     "3 is not divisible by parallel.sp = 2"),
    (["--nodes", "1", "--gpus-per-node", "4", "--procs-per-node", "8"], "more than --gpus-per-node 4"),
    (["--nodes", "1", "--gpus-per-node", "0"], "needs --procs-per-node"),
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes must be > 0"),
    (["--nodes", "1", "--gpus-per-node", "8", "--env", "1BAD=x"], "NAME=VALUE"),
    (["--nodes", "1", "--gpus-per-node", "8", "--set", "training.lrr=1"], "training.lrr"),
    (["--nodes", "1", "--gpus-per-node", "8", "--set", "run.output_dir=/tmp/a b"], "white space"),
])
def test_slurm_cli_errors(capsys, args, needle):
    rc, out, err = _slurm_cli(capsys, *args)
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_submit_without_sbatch(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, out, err = _slurm_cli(capsys, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2", "--submit",
                              "--set", f"run.output_dir={tmp_path / 'run'}")
    assert rc == 2 and "needs sbatch on PATH" in err, err


def _failed_job(cluster: Cluster, fault_jobs, which: str) -> tuple[Path, str, list[str], float]:
    """A job that failed: its run folder, log text, the log's `longtrain:` lines and the seconds from the
    last metrics record (step 4, just before the fault of step 5) to the job's last log line."""
    out, job = fault_jobs[which]
    log = _log(out, job)
    info = cluster.ended(job, log, timeout=420)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, _tail(log))
    text = log.read_text()
    took = log.stat().st_mtime - (out / "metrics.jsonl").stat().st_mtime
    return out, text, [x for x in text.splitlines() if x.startswith("longtrain")], took


@pytest.mark.parametrize("mode", ["srun", "torchrun"])
def test_hung_rank_is_reported_once(cluster, fault_jobs, mode):
    """Rank 1 stops (SIGSTOP) at step 5 with training.collective_timeout_s = HANG_S: the job fails with exit
    status 1 within the timeout + 30 s; its log has one block naming rank 1 and its node, the step, the
    intact newest checkpoint and the command that resumes (`sbatch SCRIPT`), and no traceback. srun
    template: the first survivor to ask reports, srun's step teardown (SIGCONT, SIGTERM) lets the stopped rank
    go, and it stops without a report; torchrun template: `longtrain train --torchrun` reports, the
    survivor SIGKILLs the stopped rank. Running the printed command resumes from the checkpoint."""
    from longtrain.launcher.checkpoint import check_checkpoint

    out, text, lines, took = _failed_job(cluster, fault_jobs, f"hang-{mode}")
    print(f"{mode} template: hang -> end of job step {took:.1f} s, {len(lines)} longtrain lines")
    assert took < HANG_S + 30 and "Traceback" not in text, text[-3000:]
    assert len(lines) == 3, text[-3000:]
    assert "rank 1 on " in lines[0] and f"stopped making progress during step 5: no answer for {HANG_S} s" in lines[0]
    assert "step_00000003" in lines[1] and check_checkpoint(out / "checkpoints" / "step_00000003") == []
    m = re.fullmatch(r"longtrain: resume with the same command: sbatch (\S+\.sbatch)", lines[2])
    assert m and Path(m.group(1)).is_file(), lines[2]
    if mode == "srun":  # the printed command resumes (once the fault is taken out of the script)
        script = Path(m.group(1))
        script.write_text(script.read_text().replace("export LONGTRAIN_FAULT=hang:5:1", ""))
        proc = subprocess.run(["sbatch", "--parsable", m.group(1)], env=cluster.env, capture_output=True, text=True)
        job = proc.stdout.strip().split(";")[0]
        cluster.wait(job, _log(out, job))
        log = _log(out, job).read_text()
        assert re.search(r"resumed from \S+step_00000003 at step 3", log) and "done: 6 steps" in log, log[-3000:]


def test_dead_rank_is_one_block_under_srun(cluster, fault_jobs):
    """3 tasks, rank 2 dies (SIGKILL) at step 4: only the first survivor to notice reports (the other
    may be blocked on it: gloo notices a dead peer only on the connections to it; the responder threads
    of the survivors answer for them), in one block; the job fails."""
    out, job = fault_jobs["dead-srun"]
    log = _log(out, job)
    info = cluster.ended(job, log, timeout=420)
    assert info["JobState"] == "FAILED", (info, _tail(log))
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.startswith("longtrain")]
    print(f"srun template: a dead rank of 3 -> {len(lines)} longtrain lines")
    assert len(lines) == 3 and "Traceback" not in text, text[-3000:]
    assert "rank 2 on " in lines[0] and "died during step 4" in lines[0], lines[0]
    assert "step_00000003" in lines[1] and lines[2].startswith("longtrain: resume with the same command: sbatch ")
