"""gpu-check section e: real training runs (one subprocess per arm) with tokens/s, MFU and peak memory,
plus the host-sync count of a step. Also runs on CPU as a dry run (`--cpu`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from longtrain.bench.gpu_table import ROWS, add_row


def flops_per_token(cfg, seq_len: int) -> float:
    from longtrain.launcher.metrics import train_flops_per_token

    return train_flops_per_token(cfg, seq_len)


TRAIN_SETS = ["model.preset=tiny", "model.dim=768", "model.n_layers=16", "model.n_heads=12", "model.n_kv_heads=4",
              "model.head_dim=64", "model.ffn_dim=2048", "model.vocab_size=512", "model.max_seq_len=8192",
              "data.seq_len=8192", "data.max_documents=3000", "training.micro_batch=1", "training.grad_accum=1",
              "training.dtype=bf16", "training.device=cuda", "training.warmup=5", "metrics.log_every=10",
              "checkpoint.interval=100000", "checkpoint.resume=none", "eval.every=0", "metrics.tensorboard=false"]


# the CPU dry run of section e (`--cpu`): the same arms on the tiny model, to prove the plumbing in CI
CPU_TRAIN_SETS = ["data.max_documents=60", "data.seq_len=256", "training.micro_batch=2", "training.warmup=2",
                  "training.device=cpu", "metrics.log_every=1", "checkpoint.interval=100000",
                  "checkpoint.resume=none", "eval.every=0", "metrics.tensorboard=false"]


def train_arms(steps: int, root: Path, window: int, cpu: bool) -> list[tuple[str, list[str], str]]:
    """Section e's arms: (name, recipe overrides, what it shows). `async-save` saves at steps/2 and at the
    end in the background; `resume` restarts from its steps/2 checkpoint and must repeat its losses."""
    half = max(1, steps // 2)
    arms = [
        ("eager", [], "the baseline"),
        ("mesa", ["mesa.enabled=true"], "8-bit saved activations: peak memory"),
        ("compiled", ["training.compile=true"], "torch.compile per block"),
        ("documents", ["data.document_mask=true"], "packed-document masks (no host sync per layer)"),
        ("window", [f"model.attention=['full','window:{window}','window:{window}','window:{window}']"],
         "MASFormer-style spans: 1 full layer in 4, sliding windows elsewhere"),
        ("checkpointing", ["training.activation_checkpointing=full"], "recompute every block: peak memory"),
        ("ddp", ["parallel.dp_engine=ddp"], "DDP instead of FSDP2"),
        ("async-save", [f"checkpoint.interval={half}", "checkpoint.async=true", "checkpoint.keep_last=3"],
         "DCP async_save every steps/2"),
        ("resume", [f"checkpoint.resume={root / 'train-async-save' / 'checkpoints' / f'step_{half:08d}'}"],
         "restart from async-save's middle checkpoint: the same losses"),
    ]
    return [a for a in arms if not (cpu and a[0] == "compiled")]  # inductor on 2 CPU cores: minutes


def _arm_env(cpu: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu:  # the dry run shares a small CI machine: one thread per process
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_arm(arm: str, sets: list[str], root: Path, cpu: bool = False) -> tuple[list[dict], float, str]:
    """One `longtrain train` process; (metrics records, wall seconds, log text)."""
    out_dir = root / f"train-{arm}"
    cmd = [sys.executable, "-m", "longtrain.launcher.cli", "train", _tiny_recipe()]
    for s in [*sets, f"run.output_dir={out_dir}", f"run.name=train-{arm}"]:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=_arm_env(cpu), timeout=420)
    wall = time.perf_counter() - t0
    log = p.stdout + p.stderr
    (root / f"train-{arm}.log").write_text(log)
    mfile = out_dir / "metrics.jsonl"
    if p.returncode != 0 or not mfile.exists():
        return [], wall, log
    recs = [json.loads(line) for line in mfile.read_text().splitlines() if line.strip()]
    return [r for r in recs if "loss" in r], wall, log


def section_e(dev: torch.device, steps: int, root: Path) -> None:
    from longtrain.launcher.metrics import PEAK_FLOPS

    cpu = dev.type != "cuda"
    base = CPU_TRAIN_SETS if cpu else TRAIN_SETS
    name = "CPU" if cpu else torch.cuda.get_device_name(dev)
    peak = None if cpu else next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    seq = 256 if cpu else 8192
    results: dict[str, dict[str, Any]] = {}
    arms = train_arms(steps, root, seq // 8, cpu)
    runs: dict[str, tuple[list[dict], float, str]] = {}
    # the GPU runs one arm at a time (fair timings); the CPU dry run uses both CI cores (resume waits
    # for the checkpoint of async-save)
    with ThreadPoolExecutor(max_workers=2 if cpu else 1) as pool:
        first = {arm: pool.submit(_run_arm, arm, base + [f"training.steps={steps}"] + extra, root, cpu)
                 for arm, extra, _ in arms if arm != "resume"}
        runs.update({arm: f.result() for arm, f in first.items()})
    for arm, extra, _ in arms:
        if arm == "resume":
            runs[arm] = _run_arm(arm, base + [f"training.steps={steps}"] + extra, root, cpu)
    for arm, extra, what in arms:
        sets = base + [f"training.steps={steps}"] + extra
        recs, wall, log = runs[arm]
        if not recs:
            tail = log.strip().splitlines()[-3:]
            add_row("e", f"train {arm}", "error", ok=False, note=" | ".join(tail)[:300])
            continue
        skip = min(max(5, len(recs) // 3), len(recs) - 1)
        tail_recs = recs[skip:]
        tok_s = sorted(r.get("tokens_per_s", 0.0) for r in tail_recs)[len(tail_recs) // 2]
        mem = max(r.get("memory_mb", 0.0) for r in recs) / 1024
        fpt = _train_fpt(sets)
        mfu = fpt * tok_s / peak if (peak and fpt) else None
        results[arm] = {"tokens_per_s": tok_s, "peak_gib": mem, "mfu": mfu, "wall_s": wall, "steps": len(recs),
                        "losses": {r["step"]: r["loss"] for r in recs}, "what": what}
        finite = all(math.isfinite(r.get("loss", float("nan"))) for r in recs)
        falls = recs[-1]["loss"] < recs[0]["loss"] or arm == "resume"  # resume: the second half only
        resumed = arm != "resume" or f"at step {max(1, steps // 2)}" in log
        mfu_s = f"MFU {mfu:.1%} | " if mfu is not None else ""
        add_row("e", f"train {arm} ({len(recs)} steps, {seq} tokens, {'fp32 CPU' if cpu else 'bf16'})", tok_s,
                unit="tokens/s", ok=finite and falls and resumed,
                note=f"{mfu_s}peak {mem:.2f} GiB | loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f} | "
                  f"{wall:.0f}s wall | {what}")
    eager = results.get("eager")
    if eager and "mesa" in results:
        add_row("e", "Mesa peak memory / eager", results["mesa"]["peak_gib"] / max(eager["peak_gib"], 1e-9), unit="x")
    if eager and "compiled" in results:
        add_row("e", "compiled tokens/s / eager", results["compiled"]["tokens_per_s"] / max(eager["tokens_per_s"], 1e-9),
                unit="x")
    if eager and "checkpointing" in results and not cpu:  # CPU: memory_mb is the process RSS, not activations
        r = results["checkpointing"]["peak_gib"] / max(eager["peak_gib"], 1e-9)
        add_row("e", "activation checkpointing peak memory / eager", r, 1.0, "x", ok=r < 1.0)
    for arm in ("documents", "window", "ddp", "async-save"):
        if eager and arm in results:
            add_row("e", f"{arm} tokens/s / eager", results[arm]["tokens_per_s"] / max(eager["tokens_per_s"], 1e-9),
                    unit="x")
    if "async-save" in results and "resume" in results:
        a, b = results["async-save"]["losses"], results["resume"]["losses"]
        common = sorted(set(a) & set(b))
        diff = max((abs(a[s] - b[s]) / abs(a[s]) for s in common), default=float("inf"))
        tol = 1e-5 if cpu else 1e-2  # bf16 with non-deterministic fused backward kernels on CUDA
        add_row("e", f"resume from the async checkpoint: steps {common[0] if common else '?'}-"
                  f"{common[-1] if common else '?'} vs the uninterrupted run", diff, tol, "max rel loss diff",
                ok=bool(common) and len(common) == steps - max(1, steps // 2) and diff <= tol)
        ck = root / "train-async-save" / "checkpoints"
        latest = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else "none"
        add_row("e", "async-save published its last checkpoint", latest, f"step_{steps:08d}",
                ok=latest == f"step_{steps:08d}")
    _syncs_row(base, root, cpu)
    ROWS.append({"section": "e", "check": "training summary", "value": results, "status": "-"})


def _syncs_row(base: list[str], root: Path, cpu: bool) -> None:
    """Document masks must add no host sync inside the model (at most one per micro-batch in all)."""
    seq = 256 if cpu else 2048
    sets = [s for s in base if not s.startswith("data.seq_len")]
    sets += [f"data.seq_len={seq}", f"run.output_dir={root / 'syncs'}",
             f"model.attention=['full','window:{seq // 8}','lightning','full']"]
    cmd = [sys.executable, "-m", "longtrain.bench.syncs", _tiny_recipe()]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_arm_env(cpu))
    line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("{")), None)
    if p.returncode != 0 or line is None:
        add_row("e", "documents: host syncs per step", "error", ok=False,
                note=" | ".join((p.stdout + p.stderr).strip().splitlines()[-3:])[:300])
        return
    res = json.loads(line)
    added = max(res["added_per_step"], res["cuda_added_per_step"])
    add_row("e", "documents: host syncs added per step (full + window + lightning layers)", added, 2.0, "syncs",
            ok=added <= 2.0, note=f"plain step {res['plain']['per_step']:.0f} scalar reads"
                              f"{'' if cpu else ', %.0f CUDA syncs' % res['plain']['cuda_per_step']}")


def _tiny_recipe() -> str:
    from longtrain.shipped import shipped_dir

    return str(shipped_dir("recipes") / "tiny-cpu.toml")


def _train_fpt(sets: list[str]) -> float | None:
    try:
        from longtrain.launcher.config import load_recipe

        rec = load_recipe(_tiny_recipe(), sets)
        return flops_per_token(rec.model_config(), rec.data.seq_len)
    except Exception:  # noqa: BLE001
        return None
