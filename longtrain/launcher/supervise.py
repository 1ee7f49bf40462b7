"""Supervising the training processes `longtrain train` starts: torchrun (--nproc, --torchrun) or
mpirun (--mpirun) as a child in a session of its own, signals passed on so the ranks can save
(`run_child`), the child's stderr filtered, and what the run ends with: a worker's one-line error
(exit 2), a preemption (PREEMPTED_EXIT), or the short report of a dead or stuck rank with the
newest usable checkpoint and the command that resumes (`death_report`).

The worker -> launcher protocol: a worker writes its line into the folder named by ERROR_DIR_ENV
instead of printing it (`report_worker_error`): rank<R>.txt an error, preempted.txt /
preempted-rank<R>.txt a save on signal, lost-rank<R>.txt / peer-rank<R>.txt a survivor's report.
No torch import here: the launcher never loads it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from longtrain.errors import LongtrainError
from longtrain.launcher.ckpt_layout import newest_complete, step_of

ERROR_DIR_ENV = "LONGTRAIN_ERROR_DIR"
MPIRUN_WRAPPER_ENV = "LONGTRAIN_MPIRUN_WRAPPER"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def run_child(cmd: list[str], env: dict[str, str], *, forward: Callable[[int, int], int],
              on_line: Callable[[str], None], on_end: Callable[[], None] | None = None) -> int:
    """Run `cmd` in a session of its own and wait for it; returns its exit status. A SIGTERM, SIGINT,
    SIGHUP or SIGUSR1 to this process goes on to the child as `forward(signum, how many so far)`;
    each line of the child's stderr goes to `on_line`, then `on_end()` at its end."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    received: list[int] = []

    def handler(signum, _frame) -> None:
        received.append(signum)
        proc.send_signal(forward(signum, len(received)))

    previous = {s: signal.signal(s, handler) for s in FORWARDED_SIGNALS}

    def pump() -> None:
        assert proc.stderr is not None
        for text in proc.stderr:
            on_line(text)
        if on_end is not None:
            on_end()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    t.join(timeout=10)
    return rc


def spawn_torchrun(args: argparse.Namespace, recipe=None) -> int:
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
        run = RunInfo(Path(recipe.output_dir), Path(recipe.checkpoint_dir), resume_command())
    nodes = re.search(r"--nnodes[= ](\d+)", args.torchrun_args or "")
    with tempfile.TemporaryDirectory(prefix="longtrain-errors-") as errdir:
        env[ERROR_DIR_ENV] = errdir
        return run_reporting(cmd, env, Path(errdir), run, multi_node=bool(nodes and int(nodes.group(1)) > 1))


def spawn_mpirun(args: argparse.Namespace, recipe) -> int:
    """`longtrain train RECIPE --mpirun ARGS`: `mpirun ARGS python -m longtrain.launcher.cli train RECIPE
    ...`, run by run_mpirun (a SIGTERM saves a checkpoint; mpirun's own notices are dropped). A
    stuck rank is reported by the first survivor; a dead one here, from mpirun's notice (mpirun ends the
    survivors 0.5 s after a death, which can be before they know who died)."""
    import shutil

    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun") or "mpirun"
    cmd = [mpirun, *shlex.split(args.mpirun_args), sys.executable, "-m", "longtrain.launcher.cli", "train", args.recipe]
    for o in args.overrides:
        cmd += ["--set", o]
    env = dict(os.environ)
    env.setdefault("LONGTRAIN_RESUME_COMMAND", resume_command())
    env[MPIRUN_WRAPPER_ENV] = "1"  # the ranks leave the report of a dead rank to this process
    rc, deaths = run_mpirun(cmd, env)
    if rc != 0 and deaths:
        run = RunInfo.of(recipe)
        rank, node, how = deaths[0]
        print("\n".join([f"longtrain: rank {rank} on {node} died ({how}) during step {run.step_in_flight()}.",
                         *run.footer()]), file=sys.stderr, flush=True)
        return 1
    return rc


def resume_command(source: str = "") -> str:
    """The command that resumes this run: LONGTRAIN_RESUME_COMMAND (the sbatch templates set it to
    `sbatch SCRIPT`), else this process's command line (behind `mpirun -n N` / `srun -n N`)."""
    if os.environ.get("LONGTRAIN_RESUME_COMMAND"):
        return os.environ["LONGTRAIN_RESUME_COMMAND"]
    cmd = shlex.join(["longtrain", *sys.argv[1:]]) if sys.argv[1:] else "longtrain train ..."
    world = os.environ.get("WORLD_SIZE", "?")
    return {"mpi": f"mpirun -n {world} {cmd}", "slurm": f"srun -n {world} {cmd}"}.get(source, cmd)


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
        return cls(Path(recipe.output_dir), Path(recipe.checkpoint_dir), resume_command(source))

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
        it here cost ~6 s at the end of a failed job on a busy machine), with its step."""
        p = newest_complete(self.checkpoint_dir)
        return f"{p} (step {step_of(p)})" if p else None


def run_reporting(cmd: list[str], env: dict[str, str], errdir: Path, run: RunInfo | None = None,
                   multi_node: bool = False) -> int:
    """Run torchrun; a user error raised in the workers is reported once, exit 2.

    Workers write their `longtrain: error` line to errdir instead of printing it. From the
    moment one exists, the rest of stderr (torchrun's ChildFailedError report, the other
    ranks' broken-connection tracebacks) is held back and dropped if the job then fails;
    a crash without such a file keeps all of its output. `multi_node`: one such launcher runs on
    each node (slurm/torchrun.sbatch); a failed job is reported by the one whose worker reported
    (faults.peer_lost_error: the first survivor to ask), the others stay quiet.
    """
    # torchrun runs in a session of its own, so a signal to our process group (a terminal, a container
    # stop, Slurm) reaches it once, through us: SIGUSR1, which torchrun does not handle, goes on as
    # SIGTERM, which torchrun passes to the workers (they save a checkpoint and exit 75)
    forwarded = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM,
                 signal.SIGUSR1: signal.SIGTERM}
    stopping: list[int] = []  # from a forwarded signal on, torchrun's shutdown chatter is held back too
    held: list[str] = []

    def forward(signum: int, _count: int) -> int:
        stopping.append(signum)
        return forwarded[signum]

    def line(text: str) -> None:
        if held or stopping or any(errdir.iterdir()) or _TORCHRUN_LOG.match(text):
            held.append(text)
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    rc = run_child(cmd, env, forward=forward, on_line=line)
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


def report_worker_error(msg: str, name: str = "") -> bool:
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


PEER_LOST: list[bool] = []  # set when this process stops over a lost peer: no MPI_Finalize then


def peer_lost(e: LongtrainError) -> int:
    """A survivor of a dead or stuck rank. One survivor reports (faults.peer_lost_error): to the launcher
    of `longtrain train --nproc` / slurm/torchrun.sbatch, which prints the block, else (srun, mpirun) the
    block itself. The others stop quietly once the report is out (srun and mpirun end every task when
    one exits non-zero; Open MPI within 0.5 s). Under `--mpirun` a dead rank is reported by longtrain's
    mpirun parent, from mpirun's notice."""
    import time

    from longtrain.launcher.faults import reported

    PEER_LOST.append(True)  # MPI_Finalize would wait for the stuck (or dead) rank forever
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
        report_worker_error(line, name=f"peer-rank{rank}")
    if report_worker_error(str(e), name=f"lost-rank{rank}"):
        return 1
    run = getattr(e, "run", None)
    print("\n".join([f"longtrain: {line or e}", *(run.footer() if run else [])]), file=sys.stderr, flush=True)
    reported()  # the other survivors may go now
    return 1


def worker_exit(rc: int) -> None:
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




_MPIRUN_BOX = re.compile(r"^-{40,}\s*$")
_MPIRUN_NOISE = ("exited with non-zero status", "noticed that process rank", "exited on signal")
_MPIRUN_DEATH = re.compile(r"process rank (\d+) with PID \d+ on node (\S+) exited on\s+signal (\d+)")


def run_mpirun(cmd: list[str], env: dict[str, str]) -> tuple[int, list[tuple[str, str, str]]]:
    """Run `cmd` (mpirun ...) in a session of its own and wait for it: (its exit status, the ranks mpirun
    saw killed by a signal, as (rank, node, signal name)).

    SIGTERM, SIGINT and SIGHUP go on to mpirun as SIGUSR1, which it passes to the ranks (they save and
    exit 75); mpirun's own SIGTERM would end them within 0.5 s (SIGCONT at once, SIGTERM 0.25 s later,
    SIGKILL 0.25 s after that: measured with Open MPI 5.0), too soon to save. A second signal goes on
    as SIGTERM. mpirun's boxes about a rank that exited non-zero or was killed are dropped: the ranks
    report (or, for a rank killed by a signal, the caller, from the returned list)."""
    deaths: list[tuple[str, str, str]] = []
    box: list[str] = []

    def forward(_signum: int, count: int) -> int:
        return signal.SIGUSR1 if count == 1 else signal.SIGTERM

    def line(text: str) -> None:
        if box or _MPIRUN_BOX.match(text):
            box.append(text)
            if len(box) > 1 and _MPIRUN_BOX.match(text):
                joined = " ".join(x.strip() for x in box)
                if not any(n in joined for n in _MPIRUN_NOISE):
                    sys.stderr.writelines(box)
                m = _MPIRUN_DEATH.search(joined)
                if m:
                    num = int(m.group(3))
                    name = signal.Signals(num).name if num in signal.valid_signals() else f"signal {num}"
                    deaths.append((m.group(1), m.group(2), name))
                box.clear()
            return
        sys.stderr.write(text)
        sys.stderr.flush()

    rc = run_child(cmd, env, forward=forward, on_line=line, on_end=lambda: sys.stderr.writelines(box))
    return rc, deaths
