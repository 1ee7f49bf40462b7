"""Named ranges in profiler traces (docs/profiling.md): `longtrain/<name>` spans around our phases.

`scope(name)` is a shared no-op context unless a profiled step is running (launcher/profile.py turns
`ACTIVE` on for exactly those steps), so code that marks its phases costs one global read per range
when profiling is off and no profiler object is ever created. While active, each range is a
torch.profiler.record_function (what TensorBoard's profiler plugin and Perfetto show) and, when a
listener is set (the CPU memory timeline), its start and end times are also handed to it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

ACTIVE = False
PREFIX = "longtrain/"
_NULL = contextlib.nullcontext()
listener: Callable[[str, str, float], None] | None = None  # (name, "B" | "E", time.perf_counter())


class _Range:
    __slots__ = ("name", "record")

    def __init__(self, name: str) -> None:
        import torch.profiler

        self.name = PREFIX + name
        self.record = torch.profiler.record_function(self.name)

    def __enter__(self) -> None:
        if listener is not None:
            listener(self.name, "B", time.perf_counter())
        self.record.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.record.__exit__(*exc)
        if listener is not None:
            listener(self.name, "E", time.perf_counter())


def scope(name: str) -> Any:
    """A context manager marking `name` (shown as `longtrain/<name>`) in a profiled step, else a no-op."""
    return _Range(name) if ACTIVE else _NULL
