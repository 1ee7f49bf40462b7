"""`longtrain slurm RECIPE --nodes N --gpus-per-node G [--mode torchrun|srun] [--submit]`.

Fills one of the sbatch templates in slurm/ (torchrun.sbatch: one task per node running torchrun
with a c10d rendezvous; srun.sbatch: one task per GPU, ranks from SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID) and prints it, writes it (--output) or submits it with sbatch (--submit). The recipe
and the layout (world size vs parallel.sp, processes vs GPUs) are validated first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from longtrain.errors import ConfigError, LaunchError

MODES = ("torchrun", "srun")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtrain slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: a CPU job)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="training processes per node (default: one per GPU; required for CPU jobs)")
    p.add_argument("--mode", choices=MODES, default="torchrun",
                   help="torchrun: one task per node + c10d rendezvous; srun: one task per GPU")
    p.add_argument("--mpi", default="none", help="srun mode: srun --mpi=VALUE (none, pmix, pmi2)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--time", default="24:00:00", help="wall-clock limit, e.g. 24:00:00")
    p.add_argument("--cpus-per-node", type=int, default=None, help="CPU cores per node for the job")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 0 (all) or 500G")
    p.add_argument("--exclusive", action="store_true", help="whole nodes")
    p.add_argument("--job-name", default=None, help="default: the recipe's run.name")
    p.add_argument("--log-dir", default=None, help="per-job logs (default: <run output_dir>/logs)")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="send USR1 this long before the time limit / at preemption; the script requeues")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export in the job (NCCL_SOCKET_IFNAME=ib0, NCCL_IB_HCA=mlx5, ...); repeatable")
    p.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                   help="shell line run before the launch (module load ..., source venv/bin/activate)")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="extra #SBATCH line, e.g. --sbatch-arg=--constraint=h100")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="recipe override passed to every rank (repeatable)")
    p.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    p.add_argument("--workdir", default=os.getcwd(), help="working directory of the job")
    p.add_argument("--output", default=None, help="write the script here instead of printing it")
    p.add_argument("--submit", action="store_true", help="write the script next to the run and sbatch it")
    return p


def _sbatch_lines(a: argparse.Namespace, job_name: str, procs: int, log_dir: Path) -> list[str]:
    lines = [f"--job-name={job_name}", f"--nodes={a.nodes}"]
    if a.mode == "torchrun":
        lines.append("--ntasks-per-node=1")
        if a.cpus_per_node:
            lines.append(f"--cpus-per-task={a.cpus_per_node}")
    else:
        lines.append(f"--ntasks-per-node={procs}")
        if a.cpus_per_node:
            lines.append(f"--cpus-per-task={max(1, a.cpus_per_node // procs)}")
    if a.gpus_per_node:
        lines.append(f"--gpus-per-node={a.gpus_per_node}")
    for flag, value in (("partition", a.partition), ("account", a.account), ("qos", a.qos), ("mem", a.mem)):
        if value is not None:
            lines.append(f"--{flag}={value}")
    lines.append(f"--time={a.time}")
    if a.exclusive:
        lines.append("--exclusive")
    lines += [f"--output={log_dir}/%x-%j.out", "--open-mode=append", "--requeue",
              f"--signal=B:USR1@{a.signal_seconds}"]
    lines += list(a.sbatch_arg)
    return [f"#SBATCH {x}" for x in lines]


def _env_lines(a: argparse.Namespace, procs: int, log_dir: Path) -> list[str]:
    threads = max(1, (a.cpus_per_node or procs) // procs)
    out = [f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}",
           "# named by the report of a failed run (a dead or stuck rank) as the command that resumes it",
           "JOB_SCRIPT=$(scontrol show job -o \"$SLURM_JOB_ID\" 2>/dev/null | sed -n 's/.* Command=\\([^ ]*\\).*/\\1/p')",
           'export LONGTRAIN_RESUME_COMMAND=${LONGTRAIN_RESUME_COMMAND:-"sbatch ${JOB_SCRIPT:-THIS_JOB_SCRIPT}"}']
    if a.gpus_per_node:
        out += ["export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
                "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}",
                "# NCCL flight recorder: a collective stuck past training.collective_timeout_s dumps each rank's",
                "# last collectives here before the run ends; read them with",
                "#   python -m torch.distributed.flight_recorder.fr_trace LOGDIR --prefix nccl-trace-JOBID-rank-",
                "export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}",
                "export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}",
                f"export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${{TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-{log_dir}/nccl-trace-"
                "${SLURM_JOB_ID}-rank-}",
                "# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5 GLOO_SOCKET_IFNAME=ib0   # site network settings"]
    for kv in a.env:
        if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
            raise ConfigError(f"--env {kv!r} must look like NAME=VALUE")
        k, v = kv.split("=", 1)
        out.append(f"export {k}={shlex.quote(v)}")
    return out


def render(a: argparse.Namespace) -> tuple[str, Path, str]:
    """Validate and fill the template; returns (script, log_dir, job_name)."""
    from longtrain.launcher.config import load_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    if a.nodes <= 0:
        raise LaunchError(f"--nodes must be > 0, got {a.nodes}")
    if a.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {a.gpus_per_node}")
    procs = a.procs_per_node if a.procs_per_node is not None else a.gpus_per_node
    if procs <= 0:
        raise LaunchError("a CPU job (--gpus-per-node 0) needs --procs-per-node N")
    if a.gpus_per_node and procs > a.gpus_per_node:
        raise LaunchError(f"--procs-per-node {procs} is more than --gpus-per-node {a.gpus_per_node}: one process per GPU")
    if a.gpus_per_node == 0 and recipe.training.device == "cuda":
        raise LaunchError("training.device = 'cuda' but --gpus-per-node is 0")
    world = a.nodes * procs
    sp = recipe.parallel.sp
    if world % sp:
        raise LaunchError(f"{a.nodes} node(s) x {procs} processes = {world} is not divisible by parallel.sp = {sp}")
    if a.mode == "srun" and a.mpi != "none" and not a.mpi.replace("_", "").isalnum():
        raise LaunchError(f"--mpi {a.mpi!r} is not an srun MPI type")
    workdir = Path(a.workdir).resolve()
    recipe_path = Path(recipe.source_path).resolve()
    out_dir = recipe.output_dir if recipe.output_dir.is_absolute() else workdir / recipe.output_dir
    log_dir = Path(a.log_dir).resolve() if a.log_dir else out_dir / "logs"
    job_name = "_".join((a.job_name or recipe.run.name).split())
    if any(ch.isspace() for ch in str(log_dir)):
        raise LaunchError(f"the log folder {str(log_dir)!r} contains white space, which #SBATCH lines cannot carry: "
                          "pass --log-dir")
    from longtrain.shipped import shipped_dir

    text = (shipped_dir("slurm") / f"{a.mode}.sbatch").read_text()
    overrides = " ".join(f"--set {shlex.quote(o)}" for o in a.overrides)
    fills = {
        "@SBATCH@": "\n".join(_sbatch_lines(a, job_name, procs, log_dir)),
        "@PYTHON@": shlex.quote(a.python),
        "@WORKDIR@": shlex.quote(str(workdir)),
        "@PROCS_PER_NODE@": str(procs),
        "@NODES@": str(a.nodes),
        "@MPI@": a.mpi,
        "@ENV@": "\n".join(_env_lines(a, procs, log_dir)),
        "@SETUP@": "\n".join(a.setup) if a.setup else "# (no site setup lines: --setup 'module load ...')",
        "@RECIPE@": shlex.quote(str(recipe_path)),
        "@OVERRIDES@": overrides,
    }
    for k, v in fills.items():
        text = text.replace(k, v)
    header = (f"# generated by: longtrain slurm {' '.join(shlex.quote(x) for x in a.argv)}\n"
              f"# world {world} = {a.nodes} node(s) x {procs} processes; dp {world // sp} x sp {sp}\n")
    first, rest = text.split("\n", 1)
    return f"{first}\n{header}{rest}", log_dir, job_name


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    a.argv = argv
    script, log_dir, job_name = render(a)
    if not a.submit:
        if a.output:
            Path(a.output).write_text(script)
            log_dir.mkdir(parents=True, exist_ok=True)
            print(f"wrote {a.output} (logs go to {log_dir}); submit with: sbatch {a.output}")
        else:
            sys.stdout.write(script)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("--submit needs sbatch on PATH (this machine is not a Slurm login node?)")
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = Path(a.output) if a.output else log_dir / f"{job_name}-{stamp}.sbatch"
    path.write_text(script)
    proc = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        raise LaunchError(f"sbatch refused {path}: {msg}")
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted batch job {job_id}: script {path}, log {log_dir / f'{job_name}-{job_id}.out'}")
    return 0
