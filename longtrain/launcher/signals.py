"""Save on signal: SIGTERM / SIGUSR1 (checkpoint.save_on_signal) only set a flag here; the trainer
checks it at each step boundary (all ranks agree with one tiny all-reduce), writes a checkpoint for
that step and exits with PREEMPTED_EXIT, which the sbatch templates treat as "requeue and resume".

`supervise.run_mpirun` runs mpirun so that a SIGTERM can be saved: Open MPI ends its ranks 0.5 s after a
SIGTERM to mpirun itself, but passes SIGUSR1 on and keeps running (`longtrain train --mpirun`).
"""

from __future__ import annotations

import signal
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
