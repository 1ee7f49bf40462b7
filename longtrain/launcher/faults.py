"""Faults the training loop turns into one clear line: a lost peer, a data error on one rank, and
the test hooks that inject faults (LONGTRAIN_FAULT)."""

from __future__ import annotations

import os
import re
import time

import torch.distributed as dist

from longtrain.errors import PeerLost

_LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL error",
                    "Timed out", "timed out", "Connection refused", "remote process exited")


def first_error(error: str | None) -> str | None:
    """Every rank's data-preparation error (or None), gathered: the first one, the same on all ranks."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another process is gone or stuck (gloo / NCCL messages)."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _LOST_PEER_SIGNS)


def peer_lost_error(e: BaseException, step: int) -> PeerLost:
    """The one-line PeerLost for a failed collective during `step` (1-based)."""
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0]  # gloo's source location
    return PeerLost(f"lost contact with another process during step {step} ({first[:160]})")


def fault_slow() -> None:
    """Test hook LONGTRAIN_FAULT='slow_steps:SECONDS': sleep that long in every step."""
    spec = os.environ.get("LONGTRAIN_FAULT", "")
    if spec.startswith("slow_steps:"):
        time.sleep(float(spec.split(":", 1)[1]))


def fault_nan(step: int) -> bool:
    """Test hook LONGTRAIN_FAULT='nan_loss:A-B': the loss of steps A..B (1-based) becomes NaN."""
    spec = os.environ.get("LONGTRAIN_FAULT", "")
    if not spec.startswith("nan_loss:"):
        return False
    a, _, b = spec.split(":", 1)[1].partition("-")
    return int(a) <= step <= int(b or a)
