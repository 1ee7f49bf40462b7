"""Faults the training loop turns into one clear report: a dead or stuck peer, a data error on one
rank, and the test hooks that inject faults (LONGTRAIN_FAULT).

A dead or stuck rank: every survivor's next collective fails (at once, on the connections to a peer
that died; after training.collective_timeout_s when a peer stopped answering). The survivors then
ask the rendezvous store (`_probe`): the first to ask reports (the others stay quiet), and the ranks
missing from the answers are named. For a stuck peer the answers are the survivors whose collective
failed too; for a dead one, every process still running, answered by a responder thread (a survivor
can be blocked on another survivor: gloo notices a dead peer only on the connections to it). Every
rank knows where the others run (node, pid, process table: env.peers(), gathered once at start).
Under torchrun a survivor sharing a process table with a stuck rank ends it with SIGKILL (a stopped
process, or one stuck in a kernel, would outlive the agent's SIGTERM by its 30 s grace period);
srun and mpirun end the other tasks themselves once one exits non-zero (SIGCONT and SIGTERM at once;
SIGKILL after Slurm's KillWait, after 0.5 s under Open MPI).

A heartbeat thread ticks once a second; a gap in its ticks means this process was frozen (SIGSTOP,
a frozen cgroup, a paused VM). A rank that was frozen and then let go (srun's SIGCONT) finds its
peers gone, but it is the stuck one, not a witness: it stops without a report.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from longtrain.errors import PeerLost

_LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL error",
                    "Timed out", "timed out", "Connection refused", "remote process exited")
FIRST_KEY, FAILED_KEY = "longtrain/first", "longtrain/failed"  # survivors that saw their collective fail
ASK_KEY, RUNNING_KEY = "longtrain/ask", "longtrain/running"  # "who is still running?" and the answers
FROZEN_S = 10.0  # a gap this long between heartbeat ticks: this process was stopped
_beat = {"last": 0.0, "frozen": False}


def _heartbeat() -> None:
    while True:
        now = time.monotonic()
        if now - _beat["last"] > FROZEN_S:
            _beat["frozen"] = True
        _beat["last"] = now
        time.sleep(1.0)


def frozen() -> bool:
    """Whether this process was stopped for FROZEN_S seconds or more since training began."""
    last = _beat["last"]
    return bool(last) and (_beat["frozen"] or time.monotonic() - last > FROZEN_S)


class PeerGone(PeerLost):
    """PeerLost with the survivors' diagnosis: `line` names the rank(s) that died or hang (None when
    the probe could not tell), `reporter` is True on the one survivor that reports (the first to ask)."""

    def __init__(self, msg: str, *, line: str | None = None, hung: bool = False, reporter: bool = True,
                 frozen: bool = False) -> None:
        super().__init__(msg)
        self.line, self.hung, self.reporter, self.frozen = line, hung, reporter, frozen


def first_error(error: str | None) -> str | None:
    """Every rank's data-preparation error (or None), gathered: the first one, the same on all ranks."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another process is gone or stuck (gloo / NCCL messages)."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _LOST_PEER_SIGNS)


@contextlib.contextmanager
def _no_cpp_traces():
    """fd 2 to /dev/null while the store is asked: a store whose host just died answers with a C++
    stack trace on stderr before the Python exception that the probe expects (and handles)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _agent_store() -> bool:
    """Whether torchrun's agent serves the store (it outlives every worker); else rank 0 does."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"


def _responder(rank: int) -> None:
    """Under torchrun: waits (on a store connection of its own) for a survivor's question "who is still
    running?" and answers for this process, even while its main thread is blocked in a collective on
    another survivor (gloo notices a dead peer only on the connections to it). Not where rank 0 serves
    the store (srun, mpirun): a client blocked on a store whose host exits prints a C++ stack trace."""
    try:
        store = dist.distributed_c10d._get_default_store().clone()
        store.wait([ASK_KEY], timedelta(days=30))
        store.append(RUNNING_KEY, f"{rank},")
    except Exception:  # noqa: BLE001 - the store went away with its host: nothing to answer
        return


def _probe(rank: int, world: int, hung: bool) -> tuple[set[int], bool] | None:
    """(the ranks that answer, whether this rank is the first survivor to ask). A stuck peer: the ranks
    whose main thread reached this point too (each survivor's collective times out at about the same
    time), within 5 s. A dead peer: under torchrun the processes still running (answered by their
    responder threads), else those that reached this point, within 1 s. Either ends early once all but
    one rank have answered. None when the store does not
    answer within 2 s: under srun/mpirun rank 0 serves it and may be the stuck one, and a client of a
    stopped store blocks without end, so the probe runs in a thread that is left behind."""
    result: list[tuple[set[int], bool]] = []
    answered = threading.Event()

    def run() -> None:
        try:
            store = dist.distributed_c10d._get_default_store()
            first = store.add(FIRST_KEY, 1) == 1  # (add waits for the store's answer; append does not)
            answered.set()
            ask = not hung and _agent_store()
            key = RUNNING_KEY if ask else FAILED_KEY
            store.append(key, f"{rank},")
            if ask:
                store.set(ASK_KEY, "1")
            deadline = time.monotonic() + (5.0 if hung else 1.0)
            while True:
                seen = {int(x) for x in store.get(key).decode().split(",") if x}
                if len(seen) >= world - 1 or time.monotonic() > deadline:
                    result.append((seen, first))
                    return
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store is gone: no answer
            return

    t = threading.Thread(target=run, daemon=True, name="longtrain-probe")
    with _no_cpp_traces():
        t.start()
        if answered.wait(2.0):
            t.join(7.0)
    return result[0] if result else None


REPORTED_KEY = "longtrain/reported"


def reported(wait_s: float = 0.0) -> None:
    """The reporting survivor (wait_s = 0): say that the report is out. Another survivor: wait up to
    wait_s seconds for that (srun and mpirun end every task once one exits non-zero; mpirun within
    0.5 s, which could cut the report short)."""
    def run() -> None:
        try:
            store = dist.distributed_c10d._get_default_store()
            if wait_s:
                store.wait([REPORTED_KEY], timedelta(seconds=wait_s))
            else:
                store.set(REPORTED_KEY, "1")
        except Exception:  # noqa: BLE001 - no store, or no report in time: go on
            return

    t = threading.Thread(target=run, daemon=True, name="longtrain-reported")
    with _no_cpp_traces():
        t.start()
        t.join(wait_s + 1.0)


def _kill(peer: tuple | None) -> bool:
    """SIGKILL a stuck rank when it lives in this process table (same boot, same pid namespace).
    Only under torchrun: srun and mpirun end every task themselves when one exits non-zero (and a
    task killed by a signal would turn the job's exit status into 137)."""
    from longtrain.launcher.env import discover, process_space

    if not peer or peer[2] != process_space() or discover().source != "torchrun":
        return False
    try:
        os.kill(int(peer[1]), signal.SIGKILL)
        return True
    except OSError:
        return False


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, read from /proc (torchrun's workers run in sessions of
    their own, so a process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _running_here(peer: tuple | None) -> bool:
    """Whether a rank that did not answer is a live process of this process table (a survivor blocked
    on another survivor), not a dead one."""
    from longtrain.launcher.env import process_space

    if not peer or peer[2] != process_space():
        return False
    try:
        return Path(f"/proc/{int(peer[1])}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError, ValueError):
        return False


def _store_host_gone() -> bool:
    """Under srun/mpirun rank 0 serves the store: a refused connection means it is gone (its clients
    would only fail with a C++ stack trace)."""
    try:
        socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=2).close()
        return False
    except (OSError, KeyError, ValueError):
        return True


def peer_lost_error(e: BaseException, step: int, timeout_s: float = 0) -> PeerGone:
    """The PeerLost for a failed collective during `step` (1-based), with the survivors' diagnosis
    (a collective that timed out after `timeout_s` means a stuck peer, anything else a dead one)."""
    from longtrain.launcher.env import peers

    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0]  # gloo's source location
    msg = f"lost contact with another process during step {step} ({first[:160]})"
    hung = "timed out" in str(e).lower() or "timeout" in str(e).lower()
    if frozen():  # this is the stuck rank, let go to be ended: the survivors report
        return PeerGone(msg, hung=hung, reporter=False, frozen=True)
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return PeerGone(msg, hung=hung)
    rank, world = dist.get_rank(), dist.get_world_size()
    agent_store = _agent_store()
    probed = None if rank and not agent_store and _store_host_gone() else _probe(rank, world, hung)
    if probed is None:  # the store does not answer: it lives in rank 0 unless torchrun's agent serves it
        missing = [] if agent_store or rank == 0 else [0]
        reporter = rank == min(r for r in range(world) if r not in missing)  # the lowest survivor
    else:
        missing = sorted(set(range(world)) - probed[0] - {rank})
        reporter = probed[1]  # the first survivor to ask
    roster = peers()
    peer = {r: roster[r] if r < len(roster) else None for r in range(world)}
    if not hung:  # a survivor that did not answer because it is blocked on another one is not dead
        missing = [r for r in missing if not _running_here(peer[r])]
    if not missing:
        return PeerGone(msg, hung=hung, reporter=reporter)
    who = ", ".join(f"rank {r} on {peer[r][0] if peer[r] else '?'}" for r in missing)
    if hung:
        killed = [_kill(peer[r]) for r in missing]
        line = (f"{who} stopped making progress during step {step}: no answer for {timeout_s:g} s "
                f"(training.collective_timeout_s){'; killed (SIGKILL)' if all(killed) else ''}.")
    else:
        line = f"{who} died during step {step} ({first[:120]})."
    return PeerGone(msg, line=line, hung=hung, reporter=reporter)


def step_begins(step: int) -> None:
    """At the start of each step (1-based): starts the heartbeat and responder threads once; test
    hooks, set by LONGTRAIN_FAULT:
    'slow_steps:SECONDS'  sleep that long in every step;
    'hang:STEP:RANK'      rank RANK stops itself (SIGSTOP) at step STEP: a stuck peer;
    'die:STEP:RANK'       rank RANK kills itself (SIGKILL) at step STEP: a dead peer."""
    if not _beat["last"]:
        _beat["last"] = time.monotonic()
        threading.Thread(target=_heartbeat, daemon=True, name="longtrain-heartbeat").start()
        if dist.is_initialized() and dist.get_world_size() > 1 and _agent_store():
            threading.Thread(target=_responder, args=(dist.get_rank(),), daemon=True, name="longtrain-responder").start()
    spec = os.environ.get("LONGTRAIN_FAULT", "")
    if spec.startswith("slow_steps:"):
        time.sleep(float(spec.split(":", 1)[1]))
    elif spec.startswith(("hang:", "die:")):
        kind, at, who = (spec.split(":") + ["0"])[:3]
        if int(at) == step and dist.is_initialized() and dist.get_rank() == int(who):
            os.kill(os.getpid(), signal.SIGSTOP if kind == "hang" else signal.SIGKILL)


def fault_nan(step: int) -> bool:
    """Test hook LONGTRAIN_FAULT='nan_loss:A-B': the loss of steps A..B (1-based) becomes NaN."""
    spec = os.environ.get("LONGTRAIN_FAULT", "")
    if not spec.startswith("nan_loss:"):
        return False
    a, _, b = spec.split(":", 1)[1].partition("-")
    return int(a) <= step <= int(b or a)
