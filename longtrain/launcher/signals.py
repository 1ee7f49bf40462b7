"""Save on signal: SIGTERM / SIGUSR1 (checkpoint.save_on_signal) only set a flag here; the trainer
checks it at each step boundary (all ranks agree with one tiny all-reduce), writes a checkpoint for
that step and exits with PREEMPTED_EXIT, which the sbatch templates treat as "requeue and resume".

`run_mpirun` runs mpirun so that a SIGTERM can be saved: Open MPI ends its ranks 0.5 s after a
SIGTERM to mpirun itself, but passes SIGUSR1 on and keeps running (`longtrain train --mpirun`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from typing import Sequence

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: try again later (requeue and resume)

requested: str | None = None  # name of the first save-on-signal signal received


class Preempted(Exception):
    """Raised after the checkpoint for a received signal is written; the CLI exits PREEMPTED_EXIT."""


def check_names(names: Sequence[str]) -> None:
    for n in names:
        if not (isinstance(n, str) and n.startswith("SIG") and hasattr(signal, n)):
            raise ValueError(f"unknown signal {n!r} (use names like 'SIGTERM', 'SIGUSR1')")
        if n in ("SIGKILL", "SIGSTOP"):
            raise ValueError(f"{n} cannot be caught")


def install(names: Sequence[str]) -> None:
    """Handle `names` in this process: remember the first one; the step loop does the rest."""
    global requested
    requested = None

    def handler(signum, _frame) -> None:
        global requested
        if requested is None:
            requested = signal.Signals(signum).name

    for n in names:
        signal.signal(getattr(signal, n), handler)


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
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    received: list[int] = []
    deaths: list[tuple[str, str, str]] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        proc.send_signal(signal.SIGUSR1 if len(received) == 1 else signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)}

    def pump() -> None:
        assert proc.stderr is not None
        box: list[str] = []
        for line in proc.stderr:
            if box or _MPIRUN_BOX.match(line):
                box.append(line)
                if len(box) > 1 and _MPIRUN_BOX.match(line):
                    text = " ".join(x.strip() for x in box)
                    if not any(n in text for n in _MPIRUN_NOISE):
                        sys.stderr.writelines(box)
                    m = _MPIRUN_DEATH.search(text)
                    if m:
                        num = int(m.group(3))
                        name = signal.Signals(num).name if num in signal.valid_signals() else f"signal {num}"
                        deaths.append((m.group(1), m.group(2), name))
                    box = []
                continue
            sys.stderr.write(line)
            sys.stderr.flush()
        sys.stderr.writelines(box)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    t.join(timeout=10)
    return rc, deaths
