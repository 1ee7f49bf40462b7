"""`longtrain train|plan|slurm|eval|generate|convert|bench|recipes`.

Bad input exits with status 2 and one line `longtrain: error: ...` (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from longtrain.errors import LongtrainError

BENCHES = ("step", "sp", "lightning", "mesa", "memory", "models", "moh", "data", "gpu-check", "extend", "attention", "kernels")


def _error(msg: str) -> int:
    print(f"longtrain: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train from a recipe (starts torchrun itself with --nproc)")
    p.add_argument("recipe", help="TOML recipe file, or the name of a shipped one (longtrain recipes)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe values, e.g. --set training.lr=1e-3 training.steps=500 (repeatable)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to start on this machine when not already under torchrun/Slurm/MPI")
    p.add_argument("--dry-run", action="store_true", help="validate recipe, mesh, data and model; do not train")
    p.add_argument("--torchrun", dest="torchrun_args", default=None, metavar="ARGS",
                   help="torchrun arguments for a multi-node rendezvous instead of --standalone, e.g. "
                        "'--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT' (slurm/torchrun.sbatch)")
    p.add_argument("--mpirun", dest="mpirun_args", default=None, metavar="ARGS",
                   help="start the ranks with `mpirun ARGS` (e.g. '-n 8 --hostfile hosts'); a SIGTERM then saves "
                        "a checkpoint (sent on to mpirun as SIGUSR1: mpirun ends its ranks 0.5 s after a SIGTERM)")


def _spawn_torchrun(args: argparse.Namespace, recipe=None) -> int:
    n = args.nproc
    rdzv = shlex.split(args.torchrun_args) if args.torchrun_args else ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc-per-node={n}",
           "--module", "longtrain.launcher.cli", "train", args.recipe]
    for o in args.overrides:
        cmd += ["--set", o]
    if args.dry_run:
        cmd.append("--dry-run")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env.setdefault("TORCHELASTIC_ERROR_FILE", "")
    run = None
    if recipe is not None:
        run = RunInfo(Path(recipe.output_dir), Path(recipe.checkpoint_dir), _resume_command())
    nodes = re.search(r"--nnodes[= ](\d+)", args.torchrun_args or "")
    with tempfile.TemporaryDirectory(prefix="longtrain-errors-") as errdir:
        env[ERROR_DIR_ENV] = errdir
        return _run_reporting(cmd, env, Path(errdir), run, multi_node=bool(nodes and int(nodes.group(1)) > 1))


MPIRUN_WRAPPER_ENV = "LONGTRAIN_MPIRUN_WRAPPER"


def _spawn_mpirun(args: argparse.Namespace, recipe) -> int:
    """`longtrain train RECIPE --mpirun ARGS`: `mpirun ARGS python -m longtrain.launcher.cli train RECIPE
    ...`, run by signals.run_mpirun (a SIGTERM saves a checkpoint; mpirun's own notices are dropped). A
    stuck rank is reported by the first survivor; a dead one here, from mpirun's notice (mpirun ends the
    survivors 0.5 s after a death, which can be before they know who died)."""
    import shutil

    from longtrain.launcher.signals import run_mpirun

    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun") or "mpirun"
    cmd = [mpirun, *shlex.split(args.mpirun_args), sys.executable, "-m", "longtrain.launcher.cli", "train", args.recipe]
    for o in args.overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    env.setdefault("LONGTRAIN_RESUME_COMMAND", _resume_command())
    env[MPIRUN_WRAPPER_ENV] = "1"  # the ranks leave the report of a dead rank to this process
    rc, deaths = run_mpirun(cmd, env)
    if rc != 0 and deaths:
        run = RunInfo.of(recipe)
        rank, node, how = deaths[0]
        print("\n".join([f"longtrain: rank {rank} on {node} died ({how}) during step {run.step_in_flight()}.",
                         *run.footer()]), file=sys.stderr, flush=True)
        return 1
    return rc


def _resume_command(source: str = "") -> str:
    """The command that resumes this run: LONGTRAIN_RESUME_COMMAND (the sbatch templates set it to
    `sbatch SCRIPT`), else this process's command line (behind `mpirun -n N` / `srun -n N`)."""
    if os.environ.get("LONGTRAIN_RESUME_COMMAND"):
        return os.environ["LONGTRAIN_RESUME_COMMAND"]
    cmd = shlex.join(["longtrain", *sys.argv[1:]]) if sys.argv[1:] else "longtrain train ..."
    world = os.environ.get("WORLD_SIZE", "?")
    return {"mpi": f"mpirun -n {world} {cmd}", "slurm": f"srun -n {world} {cmd}"}.get(source, cmd)


ERROR_DIR_ENV = "LONGTRAIN_ERROR_DIR"


_TORCHRUN_LOG = re.compile(r"^[EWI]\d{4} \S+ \d+ \S*torch/distributed/")  # torchrun's own log lines


def death_report(torchrun_stderr: list[str], lost: list[str], run: "RunInfo | None",
                 diagnosis: str | None = None) -> str | None:
    """The short block printed when a training process died or hung: which rank, on which host, how,
    at which step, the newest usable checkpoint and the command that resumes. `diagnosis` is the
    survivors' line naming the rank they lost (faults.peer_lost_error): a hang is that line alone, a
    death takes the signal from torchrun's report when the dead rank was one of its workers. None when
    torchrun's report names no process killed by a signal and no survivor reported a lost peer."""
    failures, cur = [], None
    for line in torchrun_stderr:
        m = re.match(r"\s*(time|host|rank|exitcode)\s*:\s*(.*)", line)
        if re.match(r"\s*\[\d+\]:\s*$", line):
            cur = {}
            failures.append(cur)
        elif m and cur is not None:
            cur[m.group(1)] = m.group(2).strip()
    dead = None
    for f in failures:
        code = re.match(r"(-?\d+)", f.get("exitcode", ""))
        sig = re.search(r"\((SIG\w+)\)", f.get("exitcode", ""))
        if code and int(code.group(1)) < 0 and not (sig and sig.group(1) == "SIGTERM"):
            dead = f
            break
    if dead is None and not lost and not diagnosis:
        return None
    lines = []
    if diagnosis and (dead is None or "stopped making progress" in diagnosis):
        lines.append(f"longtrain: {diagnosis}")
        if "stopped making progress" in diagnosis:
            lost = []
    elif dead is not None:
        rank = dead.get("rank", "?").split()[0]
        how = re.search(r"\((SIG\w+)\)", dead.get("exitcode", ""))
        lines.append(f"longtrain: rank {rank} on {dead.get('host', '?')} died "
                     f"({how.group(1) if how else 'exit code ' + dead.get('exitcode', '?').split()[0]})"
                     + (f" during step {run.step_in_flight()}" if run else "") + ".")
    if lost:
        lines.append(f"longtrain: the other processes stopped: {lost[0]}")
    if run:
        lines += run.footer()
    return "\n".join(lines)


class RunInfo:
    """What the launcher knows about the run it started (for the death report)."""

    def __init__(self, output_dir: Path, checkpoint_dir: Path, command: str) -> None:
        self.output_dir, self.checkpoint_dir, self.command = output_dir, checkpoint_dir, command

    @classmethod
    def of(cls, recipe, source: str = "") -> "RunInfo":
        return cls(Path(recipe.output_dir), Path(recipe.checkpoint_dir), _resume_command(source))

    def footer(self) -> list[str]:
        """The last lines of a failure report: where to resume from, and how."""
        ck = self.newest_checkpoint()
        return [f"longtrain: newest usable checkpoint: {ck}" if ck else
                "longtrain: no checkpoint was written yet: the run restarts from step 0",
                f"longtrain: resume with the same command: {self.command}"]

    def step_in_flight(self) -> int:
        last = 0
        try:
            for line in (self.output_dir / "metrics.jsonl").read_text().splitlines():
                if '"step"' in line:
                    last = max(last, int(json.loads(line)["step"]))
        except (OSError, ValueError, KeyError):
            pass
        return last + 1

    def newest_checkpoint(self) -> str | None:
        """Checkpointer.latest() without importing torch (which the launcher never loads; importing
        it here cost ~6 s at the end of a failed job on a busy machine): the folder that `latest`
        names if it is complete (.metadata and meta.json), else the newest complete step_N."""
        root = self.checkpoint_dir
        done = lambda p: (p / ".metadata").is_file() and (p / "meta.json").is_file()  # noqa: E731
        try:
            p = root / (root / "latest").read_text().strip()
        except OSError:
            p = root
        if p == root or not done(p):
            steps = sorted((q for q in root.glob("step_*") if re.fullmatch(r"step_\d+", q.name) and done(q)),
                           key=lambda q: int(q.name[5:])) if root.is_dir() else []
            p = steps[-1] if steps else None
        return f"{p} (step {int(p.name.split('_')[1])})" if p else None


def _run_reporting(cmd: list[str], env: dict[str, str], errdir: Path, run: RunInfo | None = None,
                   multi_node: bool = False) -> int:
    """Run torchrun; a user error raised in the workers is reported once, exit 2.

    Workers write their `longtrain: error` line to errdir instead of printing it. From the
    moment one exists, the rest of stderr (torchrun's ChildFailedError report, the other
    ranks' broken-connection tracebacks) is held back and dropped if the job then fails;
    a crash without such a file keeps all of its output. `multi_node`: one such launcher runs on
    each node (slurm/torchrun.sbatch); a failed job is reported by the one whose worker reported
    (faults.peer_lost_error: the first survivor to ask), the others stay quiet.
    """
    import signal
    import threading

    # torchrun runs in a session of its own, so a signal to our process group (a terminal, a container
    # stop, Slurm) reaches it once, through us: SIGUSR1, which torchrun does not handle, goes on as
    # SIGTERM, which torchrun passes to the workers (they save a checkpoint and exit 75)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    forwarded = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM,
                 signal.SIGUSR1: signal.SIGTERM}
    stopping = []  # from a forwarded signal on, torchrun's shutdown chatter is held back too

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        proc.send_signal(forwarded[signum])

    previous = {s: signal.signal(s, forward) for s in forwarded}
    held: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if held or stopping or any(errdir.iterdir()) or _TORCHRUN_LOG.match(line):
                held.append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    t.join(timeout=10)
    preempted = errdir / "preempted.txt"
    if preempted.is_file() or (multi_node and any(errdir.glob("preempted-rank*.txt"))):
        if preempted.is_file():
            print(preempted.read_text().strip(), file=sys.stderr, flush=True)
        from longtrain.launcher.signals import PREEMPTED_EXIT

        return PREEMPTED_EXIT
    errors = sorted(errdir.glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
    if rc != 0 and errors:
        print(errors[0].read_text().strip(), file=sys.stderr, flush=True)
        return 2
    if rc != 0:
        diagnosis = next((p.read_text().strip() for p in sorted(errdir.glob("peer-rank*.txt"))), None)
        lost = [p.read_text().strip() for p in sorted(errdir.glob("lost-rank*.txt"))]
        if multi_node and not (diagnosis or lost):
            return 1  # the launcher on the node of the reporting survivor reports
        report = death_report(held, lost, run, diagnosis)
        if report:
            print(report, file=sys.stderr, flush=True)
            return 1
    sys.stderr.writelines(held)
    return 0 if rc == 0 else (2 if rc == 2 else rc)


def _report_worker_error(msg: str, name: str = "") -> bool:
    """In a worker started by `longtrain train --nproc`: hand the error line (or, with name
    "preempted", the preemption line; "lost-rankR"/"peer-rankR", a survivor's report) to the launcher
    instead of printing it."""
    errdir = os.environ.get(ERROR_DIR_ENV)
    rank = os.environ.get("RANK")
    if not errdir or rank is None or not os.path.isdir(errdir):
        return False
    final = Path(errdir, f"{name}.txt" if name else f"rank{rank}.txt")
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_text(f"{msg}\n" if name.startswith(("lost", "peer")) else f"longtrain: {msg}\n" if name
                   else f"longtrain: error: {msg}\n")
    os.replace(tmp, final)
    return True


def cmd_train(args: argparse.Namespace) -> int:
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.env import under_launcher

    recipe = load_recipe(args.recipe, args.overrides)
    if args.nproc is not None and args.nproc <= 0:
        raise LongtrainError(f"--nproc must be > 0, got {args.nproc}")
    if recipe.checkpoint.resume not in ("auto", "none"):
        from longtrain.launcher.checkpoint import read_meta

        read_meta(recipe.checkpoint.resume)
    if args.mpirun_args is not None:
        return _spawn_mpirun(args, recipe)
    if args.torchrun_args is not None or (not under_launcher() and args.nproc and args.nproc > 1):
        if args.nproc is None:
            raise LongtrainError("--torchrun needs --nproc (training processes on this node)")
        if args.torchrun_args is None and args.nproc % recipe.parallel.sp:
            raise LongtrainError(f"--nproc {args.nproc} is not divisible by parallel.sp = {recipe.parallel.sp}")
        from longtrain.launcher.devices import check_gpus

        check_gpus(args.nproc, recipe.training.device)
        return _spawn_torchrun(args, recipe)
    from longtrain.errors import PeerLost
    from longtrain.launcher.trainer import train

    try:
        train(recipe, dry_run=args.dry_run)
    except PeerLost as e:
        from longtrain.launcher.env import discover

        e.run = RunInfo.of(recipe, discover().source)  # for the report of the reporting survivor
        raise
    return 0


_PEER_LOST: list[bool] = []  # set when this process stops over a lost peer: no MPI_Finalize then


def _peer_lost(e: LongtrainError) -> int:
    """A survivor of a dead or stuck rank. One survivor reports (faults.peer_lost_error): to the launcher
    of `longtrain train --nproc` / slurm/torchrun.sbatch, which prints the block, else (srun, mpirun) the
    block itself. The others stop quietly once the report is out (srun and mpirun end every task when
    one exits non-zero; Open MPI within 0.5 s). Under `--mpirun` a dead rank is reported by longtrain's
    mpirun parent, from mpirun's notice."""
    import time

    from longtrain.launcher.faults import reported

    _PEER_LOST.append(True)  # MPI_Finalize would wait for the stuck (or dead) rank forever
    rank, errdir = os.environ.get("RANK", "0"), os.environ.get(ERROR_DIR_ENV)
    line, hung, frozen = getattr(e, "line", None), getattr(e, "hung", False), getattr(e, "frozen", False)
    parent_reports = bool(os.environ.get(MPIRUN_WRAPPER_ENV)) and not hung
    if parent_reports or not getattr(e, "reporter", True):
        deadline = time.monotonic() + (0 if frozen else 8)  # (the stuck rank itself: nothing to wait for)
        while errdir and time.monotonic() < deadline and not any(Path(errdir).glob("lost-rank*.txt")):
            time.sleep(0.1)
        if not (errdir or parent_reports or frozen):
            reported(wait_s=8.0)
        return 1
    if line:
        _report_worker_error(line, name=f"peer-rank{rank}")
    if _report_worker_error(str(e), name=f"lost-rank{rank}"):
        return 1
    run = getattr(e, "run", None)
    print("\n".join([f"longtrain: {line or e}", *(run.footer() if run else [])]), file=sys.stderr, flush=True)
    reported()  # the other survivors may go now
    return 1


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: longtrain bench {{{','.join(BENCHES)}}} [options]\n"
              "Each bench prints a table and writes JSON (bench-results/NAME.json by default).")
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHES:
        return _error(f"unknown bench {name!r}; choose one of: {', '.join(BENCHES)}")
    try:
        mod = importlib.import_module(f"longtrain.bench.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        return _error(f"bench {name!r} is not available ({e})")
    return int(mod.main(argv[1:]) or 0)


def cmd_recipes(argv: list[str]) -> int:
    """`longtrain recipes` lists the shipped recipes; `longtrain recipes show NAME` prints one."""
    from longtrain.shipped import closest_recipes, recipe_description, recipe_names, shipped_dir, shipped_recipe

    if argv and argv[0] in ("-h", "--help"):
        print("usage: longtrain recipes [show NAME]\n\nList the recipes that ship with longtrain, or print one "
              "(redirect it to a file to copy and edit it).")
        return 0
    if not argv:
        names = recipe_names()
        width = max(map(len, names), default=0)
        for n in names:
            print(f"{n.ljust(width)}  {recipe_description(shipped_dir('recipes') / f'{n}.toml')}")
        print(f"\n{len(names)} recipes in {shipped_dir('recipes')}; "
              "'longtrain recipes show NAME > my.toml' to copy one, 'longtrain train NAME' to run it")
        return 0
    if argv[0] != "show" or len(argv) != 2:
        return _error("usage: longtrain recipes [show NAME]")
    path = shipped_recipe(argv[1])
    if path is None:
        close = closest_recipes(argv[1])
        return _error(f"no shipped recipe {argv[1]!r}" + (f"; closest: {', '.join(close)}" if close else "")
                      + " ('longtrain recipes' lists them)")
    sys.stdout.write(path.read_text())
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("longtrain")
    except Exception:  # noqa: BLE001 - a checkout on PYTHONPATH has no distribution metadata
        from longtrain import __version__

        return __version__


def _sub_main(module: str, argv: list[str]) -> int:
    mod = importlib.import_module(module)
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a program: `kill -USR2 PID` prints each thread's stack, the run goes on
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR2, all_threads=True)  # where a hung run waits
    argv = list(sys.argv[1:] if argv is None else argv)
    # sub-tools with their own argument parsers
    passthrough = {"bench": None, "prepare": "longtrain.launcher.data.prepare", "plan": "longtrain.launcher.plan", "slurm": "longtrain.launcher.slurm",
                   "eval": "longtrain.launcher.eval.cli", "convert": "longtrain.launcher.convert",
                   "generate": "longtrain.launcher.eval.generate"}
    try:
        if argv and argv[0] == "--version":
            print(f"longtrain {_version()}")
            return 0
        if argv and argv[0] == "recipes":
            return cmd_recipes(argv[1:])
        if argv and argv[0] in passthrough:
            if argv[0] == "bench":
                return cmd_bench(argv[1:])
            try:
                return _sub_main(passthrough[argv[0]], argv[1:])
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("longtrain"):
                    return _error(f"'longtrain {argv[0]}' is not available in this build ({e.name} missing)")
                raise
        parser = argparse.ArgumentParser(prog="longtrain", description=__doc__)
        parser.add_argument("--version", action="version", version=f"longtrain {_version()}")
        sub = parser.add_subparsers(dest="command", required=True)
        _train_parser(sub)
        for name, helptext in (("prepare", "tokenize a corpus once into memory-mapped token files"),
                               ("plan", "size a job: memory per GPU and step time"),
                               ("slurm", "print or submit an sbatch script for a recipe"),
                               ("eval", "passkey retrieval, perplexity by position, RULER tasks"),
                               ("generate", "continue a prompt with a trained model (KV cache)"),
                               ("convert", "export a training checkpoint to a Hugging Face folder"),
                               ("bench", "benchmarks: " + ", ".join(BENCHES)),
                               ("recipes", "list the shipped recipes, or 'recipes show NAME' to print one")):
            sub.add_parser(name, help=helptext, add_help=False)
        args = parser.parse_args(argv)
        if args.command == "train":
            return cmd_train(args)
        return 2
    except LongtrainError as e:
        from longtrain.errors import PeerLost

        if isinstance(e, PeerLost):  # one survivor reports which process died or hangs; the others stop
            return _peer_lost(e)
        if _report_worker_error(str(e)):
            return 2
        return _error(str(e))
    except Exception as e:  # noqa: BLE001 - only Preempted is handled; the rest keeps its traceback
        from longtrain.launcher.signals import PREEMPTED_EXIT, Preempted

        if not isinstance(e, Preempted):
            raise
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            if not _report_worker_error(str(e), name="preempted"):
                print(f"longtrain: {e}", file=sys.stderr, flush=True)
        else:  # for the launcher of another node (slurm/torchrun.sbatch): this one stopped on the signal too
            _report_worker_error(str(e), name=f"preempted-rank{rank}")
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        return 130


def _worker_exit(rc: int) -> None:
    """End a torchrun worker without the interpreter's teardown.

    Now and then (about 1 run in 20 here) a worker that finished cleanly aborted in that teardown
    ("terminate called without an active exception", SIGABRT from a C++ thread of torch's), which
    turns a finished run into a failed job. Everything of ours is closed by now (metrics, process
    group), so flush and leave.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    code = main()
    # torchrun workers, srun tasks (a teardown abort failed a 2-node job) unless MPI (MPI_Finalize)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None or (
            "SLURM_STEP_ID" in os.environ and "mpi4py.MPI" not in sys.modules) or _PEER_LOST:
        _worker_exit(code)
    sys.exit(code)
