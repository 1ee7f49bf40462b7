"""`longtrain bench lightning`: forward+backward tokens/s of lightning attention
(torch path; Triton too on CUDA) and torch SDPA causal, side by side in one run.

Lightning is timed in interleaved rounds over all sequence lengths (the median
per length is kept), so that a change in machine load hits every length alike;
SDPA gets one timed run at >= 16k (about 20 s per forward+backward at 32k on a
2-core CPU) and three below.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from longtrain.bench.common import print_table, write_json
from longtrain.kernels import lightning_attention, tnl_decay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _lightning_step(B, S, H, D, dtype, device, backend, block_size):
    q, k, v = (torch.randn(B, S, H, D, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))
    do = torch.randn(B, S, H, D, dtype=dtype, device=device)
    decay = tnl_decay(H, 0, 2).to(device)

    def step():
        out = lightning_attention(q, k, v, decay, backend=backend, block_size=block_size)
        out.backward(do)
        q.grad = k.grad = v.grad = None     # in a model q, k, v are activations: no accumulation
    return step


def _sdpa_step(B, S, H, D, dtype, device):
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))
    do = torch.randn(B, H, S, D, dtype=dtype, device=device)

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)
        q.grad = k.grad = v.grad = None
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="longtrain bench lightning", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="2048,4096,8192,16384,32768",
                   help="comma-separated sequence lengths (tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=None, help="lightning block (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of lightning per length")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baseline")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="JSON path (default bench-results/lightning.json)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype)
    seqs = [int(s) for s in a.seq.split(",") if s]
    B, H, D = a.batch, a.heads, a.head_dim
    impls = ["lightning-torch"] + (["lightning-triton"] if device.type == "cuda" else [])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    times: dict[tuple[str, int], list[float]] = {}
    steps = {}
    for impl in impls:
        backend = "triton" if impl.endswith("triton") else "torch"
        for S in seqs:
            steps[impl, S] = _lightning_step(B, S, H, D, dtype, device, backend, a.block_size)
            steps[impl, S]()                                          # warm-up
    for _ in range(a.rounds):
        for key, step in steps.items():
            times.setdefault(key, []).append(_time_once(step, device))
    steps.clear()
    if not a.no_sdpa:
        for S in seqs:
            step = _sdpa_step(B, S, H, D, dtype, device)
            big = device.type == "cpu" and S >= 16384
            if not big:
                step()
            times["sdpa-causal", S] = [_time_once(step, device) for _ in range(1 if big else 3)]

    rows = []
    for (impl, S), ts in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        sec = statistics.median(ts)
        rows.append({"impl": impl, "seq": S, "sec": sec, "min_sec": min(ts), "runs": len(ts),
                     "tokens_per_s": B * S / sec})
    by = {(r["impl"], r["seq"]): r for r in rows}
    for r in rows:
        base = by.get(("sdpa-causal", r["seq"]))
        r["x_vs_sdpa"] = base["sec"] / r["sec"] if base else None
    print_table(rows, ["impl", "seq", "sec", "min_sec", "runs", "tokens_per_s", "x_vs_sdpa"])
    summary = {}
    lo, hi = min(seqs), max(seqs)
    for impl in impls:
        if (impl, lo) in by and (impl, hi) in by:
            summary[f"{impl}: tokens/s {hi} / {lo}"] = by[impl, hi]["tokens_per_s"] / by[impl, lo]["tokens_per_s"]
            if by[impl, hi]["x_vs_sdpa"] is not None:
                summary[f"{impl}: x faster than sdpa at {hi}"] = by[impl, hi]["x_vs_sdpa"]
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    # a shared machine distorts everything: OpenMP regions wait for descheduled threads
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"load average (1 min) before/after: {load_before} / {load_after}")
    write_json("lightning", {"config": {"batch": B, "heads": H, "head_dim": D, "dtype": a.dtype,
                                        "device": str(device), "block_size": a.block_size,
                                        "rounds": a.rounds, "seqs": seqs,
                                        "threads": torch.get_num_threads(),
                                        "loadavg_before_after": [load_before, load_after]},
                             "rows": rows, "summary": summary}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
