"""`longtrain bench models`: MHA, MoH, mixed spans and lightning trained side by side.

Every arm is the tiny model (dim 128, 4 layers, 4 heads, MHA: 4 kv heads) trained from the same
seed on the same stdlib samples for the same number of steps with the trainer's own step
(`Trainer.train_step`, world size 1), each in a fresh process:
  mha        all layers full softmax attention
  moh        Mixture-of-Head, 1 shared + 2 of 3 routed heads = 75% of heads (learned router)
  mixed      1 full layer in 4, the others a sliding window of seq_len/8 keys (MASFormer)
  lightning  lightning attention in every layer (TNL decay)
Reported per arm: final loss (mean of the last 10 steps), tokens/s from the median step wall
time and from the median step CPU time (process time: other jobs on a shared machine inflate
wall time, not the CPU time this process spends), and the attention-FLOPs fraction of the plan.
After the training round (arms in order) a timing round runs the arms again in reverse order
for `--timing-steps` steps; the tokens/s columns are medians over both rounds' steps, so a
slow minute on the machine does not land on one arm only.

Then the attention time of MoH vs dense: `longtrain.bench.moh.bench` (attention core alone and
the whole attention layer, forward + backward, 75% heads) in a fresh process, at the training
length and at `--attn-seqs`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from longtrain.bench.common import print_table, write_json

ARMS = ("mha", "moh", "mixed", "lightning")


def arm_overrides(arm: str, seq_len: int, window: int) -> list[str]:
    """Recipe overrides (on recipes/tiny-cpu.toml) that make one arm."""
    base = ["model.preset=tiny", "model.n_kv_heads=4"]
    if arm == "mha":
        return base
    if arm == "moh":
        return base + ["model.moh={ shared_heads = 1, routed_heads = 2, router = \"learned\" }"]
    if arm == "mixed":
        w = f'"window:{window}"'
        return base + [f'model.attention=["full", {w}, {w}, {w}]']
    if arm == "lightning":
        return base + ['model.attention=["lightning"]']
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def _train_arm(rank: int, world: int, sets: list[str], steps: int, warmup: int) -> dict[str, Any]:
    """Runs in a fresh process: `steps` trainer steps; per-step loss, wall and CPU seconds."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer
    from longtrain.models.spans import attention_flops_fraction

    recipe = load_recipe("tiny-cpu", sets)
    trainer = Trainer(recipe)
    losses, wall, cpu = [], [], []
    tokens = 0.0
    for i in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        res = trainer.train_step()
        w1, c1 = time.perf_counter(), time.process_time()
        losses.append(res["loss"])
        tokens = res["tokens"]
        if i >= warmup:
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
    return {"losses": losses, "wall": wall, "cpu": cpu, "tokens_per_step": tokens,
            "n_params": trainer.model.cfg.n_params,
            "attention_flops": attention_flops_fraction(trainer.model.spans, recipe.data.seq_len)}


def _attention_rows(rank: int, world: int, seqs: list[int], routers: list[str], repeat: int) -> list[dict]:
    from longtrain.bench.moh import bench

    return bench(["tiny"], seqs, routers, repeat, torch.device("cpu"), torch.float32)


def run_arm(arm: str, common: list[str], steps: int, warmup: int, threads: int, seq_len: int,
            window: int) -> dict[str, Any]:
    from longtrain.testing import run_distributed

    sets = common + arm_overrides(arm, seq_len, window)
    (res,) = run_distributed(_train_arm, 1, sets, steps, warmup, threads=threads, timeout=3600)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench models", description=__doc__.splitlines()[0])
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--steps", type=int, default=200, help="training steps per arm")
    ap.add_argument("--timing-steps", type=int, default=30, help="steps of the reverse-order timing round (0: none)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the timings")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=0, help="window of the mixed arm (default seq_len/8)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-documents", type=int, default=600, help="stdlib files to read (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    ap.add_argument("--attn-seqs", default="2048,8192", help="extra lengths for MoH vs dense attention ('' for none)")
    ap.add_argument("--attn-routers", default="learned,query_norm")
    ap.add_argument("--attn-repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/models.json)")
    a = ap.parse_args(argv)
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    for x in arms:
        arm_overrides(x, a.seq_len, 1)  # unknown names fail before anything runs
    window = a.window or max(1, a.seq_len // 8)
    tmp = tempfile.mkdtemp(prefix="longtrain-bench-models-")
    common = [f"run.output_dir={tmp}", "checkpoint.resume=none", "training.device=cpu", "parallel.sp=1",
              "parallel.dp_engine=fsdp2", "training.dtype=fp32", f"data.seq_len={a.seq_len}",
              f"data.max_documents={a.max_documents}", f"training.micro_batch={a.micro_batch}",
              "training.grad_accum=1", f"training.steps={a.steps}", f"training.lr={a.lr}",
              "metrics.tensorboard=false", "training.activation_checkpointing=false", "mesa.enabled=false"]
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:  # training round: full steps, arms in order
        print(f"[bench models] training {arm} ({a.steps} steps) ...", flush=True)
        results[arm] = run_arm(arm, common, a.steps, a.warmup, a.threads, a.seq_len, window)
        results[arm]["timing_wall"] = list(results[arm]["wall"])
        results[arm]["timing_cpu"] = list(results[arm]["cpu"])
    if a.timing_steps > a.warmup:
        for arm in reversed(arms):  # timing round: reverse order
            print(f"[bench models] timing {arm} ({a.timing_steps} steps) ...", flush=True)
            t = run_arm(arm, common, a.timing_steps, a.warmup, a.threads, a.seq_len, window)
            results[arm]["timing_wall"] += t["wall"]
            results[arm]["timing_cpu"] += t["cpu"]
    rows = []
    base = results.get("mha")
    for arm in arms:
        r = results[arm]
        tail = r["losses"][-10:]
        wall, cpu = statistics.median(r["timing_wall"]), statistics.median(r["timing_cpu"])
        row = {"arm": arm, "final_loss": sum(tail) / len(tail), "first_loss": r["losses"][0],
               "tok_s_wall": r["tokens_per_step"] / wall, "tok_s_cpu": r["tokens_per_step"] / cpu,
               "step_wall_s": wall, "step_cpu_s": cpu, "attention_flops": r["attention_flops"],
               "n_params": r["n_params"]}
        if base is not None:
            row["cpu_time_vs_mha"] = cpu / statistics.median(base["timing_cpu"])
        rows.append(row)
    print()
    print(f"tiny models, seq_len {a.seq_len}, micro_batch {a.micro_batch}, {a.steps} steps, lr {a.lr}, "
          f"{a.threads} thread(s), mixed window {window}")
    print_table(rows, ["arm", "first_loss", "final_loss", "tok_s_wall", "tok_s_cpu", "step_cpu_s", "cpu_time_vs_mha",
                       "attention_flops", "n_params"])
    attn_rows: list[dict] = []
    seqs = sorted({a.seq_len} | {int(s) for s in a.attn_seqs.split(",") if s.strip()})
    if seqs and a.attn_routers:
        from longtrain.bench.moh import SHOW
        from longtrain.testing import run_distributed

        print(f"\n[bench models] MoH vs dense attention time at {seqs} ...", flush=True)
        (attn_rows,) = run_distributed(_attention_rows, 1, seqs, a.attn_routers.split(","), a.attn_repeat,
                                       threads=a.threads, timeout=3600)
        print_table(attn_rows, SHOW)
    write_json("models", {
        "settings": {**vars(a), "window": window, "preset": "tiny", "n_kv_heads": 4, "moh": "1 shared + 2 of 3 routed",
                     "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
                     "wall_s": time.perf_counter() - t_start},
        "rows": rows, "attention": attn_rows,
        "curves": {arm: results[arm]["losses"] for arm in arms}}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
