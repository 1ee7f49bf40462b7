"""The gpu-check result table: rows, their printing, and the timing and error helpers the sections share
(bench/gpu_check.py, gpu_train.py, multi_check.py)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch

ROWS: list[dict[str, Any]] = []
T0 = time.perf_counter()


def add_row(section: str, check: str, value: Any, limit: Any = None, unit: str = "", ok: bool | None = None,
            note: str = "") -> None:
    status = "-" if ok is None else ("ok" if ok else "FAIL")
    ROWS.append({"section": section, "check": check, "value": value, "limit": limit, "unit": unit,
                 "status": status, "note": note})
    v = f"{value:.3g}" if isinstance(value, float) else str(value)
    lim = "" if limit is None else f" (limit {limit:.3g})" if isinstance(limit, float) else f" (limit {limit})"
    print(f"[{time.perf_counter() - T0:6.1f}s] {section} {status:4s} {check}: {v} {unit}{lim} {note}", flush=True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| over finite reference entries (both compared in fp64)."""
    g, r = got.double(), ref.double()
    fin = torch.isfinite(r)
    if not bool(fin.all()):
        if not bool((torch.isinf(g) == torch.isinf(r)).all()):
            return float("inf")
        g, r = g[fin], r[fin]
    if r.numel() == 0:
        return 0.0
    return ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def check_close(section: str, name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    e = rel_err(got, ref)
    add_row(section, name, e, tol, "rel err", ok=e <= tol and math.isfinite(e))


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn: Callable[[], Any], warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of fn() with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def print_table() -> None:
    print()
    print(f"{'sec':3s}  {'status':6s}  {'value':>10s}  {'limit':>8s}  check")
    for r in ROWS:
        if r["check"] == "training summary":
            continue
        v = r["value"]
        vs = f"{v:.3g}" if isinstance(v, float) else str(v)
        lim = r.get("limit")
        ls = "" if lim is None else (f"{lim:.3g}" if isinstance(lim, float) else str(lim))
        note = f"  [{r['note']}]" if r.get("note") else ""
        print(f"{r['section']:3s}  {r['status']:6s}  {vs:>10s}  {ls:>8s}  {r['check']} {r.get('unit', '')}{note}")
