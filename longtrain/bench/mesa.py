"""`longtrain bench mesa`: memory and time of 8-bit saved activations (Mesa) vs exact.

For each preset x sequence length x compute setting (fp32, pure bf16, autocast bf16
with fp32 weights) and mode (exact, mesa), one fresh child process measures:
  rss_growth   process RSS after the forward (loss computed, graph alive) minus before
  saved_blocks bytes saved for backward inside the transformer blocks (counted)
  saved_all    the same over the whole forward (embedding, LM head and loss included)
  step_s       median fwd+bwd seconds (a separate child alternates exact and Mesa steps so
               that both see the same machine load)
Ratios mesa/exact are reported per (preset, seq, setting). With --loss-steps N, the
tiny-cpu recipe is also trained N steps with and without Mesa (the launcher's trainer)
and the final losses are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

_CHILD_FLAG = "--_child"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch
    import torch.nn.functional as F

    from longtrain.bench.common import timeit
    from longtrain.kernels.mesa import MesaConfig, enable_mesa, saved_bytes_counter
    from longtrain.models import Transformer, model_config

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = model_config(spec["preset"], max_seq_len=max(spec["seq"], 16))
    model = Transformer(cfg)
    setting = spec["setting"]
    if setting == "bf16":
        model = model.to(torch.bfloat16)
    if spec["mode"] == "mesa":
        enable_mesa(model, MesaConfig(stochastic=True))
    tok = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast-bf16"):
            logits = model(tok)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tok[:, 1:].flatten())

    gc.collect()
    r0 = _rss_bytes()
    t0 = time.perf_counter()
    loss = forward()
    fwd_s = time.perf_counter() - t0
    r1 = _rss_bytes()
    loss.backward()
    del loss
    model.zero_grad(set_to_none=True)

    def step():
        forward().backward()
        model.zero_grad(set_to_none=True)

    step_s = timeit(step, warmup=0, repeat=1)
    with saved_bytes_counter(model.layers) as blocks, saved_bytes_counter() as whole:
        loss = forward()
    del loss
    return {"rss_growth": r1 - r0, "first_fwd_s": fwd_s, "step_s": step_s,
            "saved_blocks": blocks.activation_bytes, "saved_all": whole.activation_bytes,
            "quantized_bytes": blocks.quantized_bytes, "param_bytes": whole.param_bytes}


def _time_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Median fwd+bwd seconds of the exact and the Mesa model, steps interleaved (fair under load)."""
    import copy

    import torch
    import torch.nn.functional as F

    from longtrain.kernels.mesa import MesaConfig, enable_mesa
    from longtrain.models import Transformer, model_config

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = model_config(spec["preset"], max_seq_len=max(spec["seq"], 16))
    exact = Transformer(cfg)
    if spec["setting"] == "bf16":
        exact = exact.to(torch.bfloat16)
    mesa = copy.deepcopy(exact)
    enable_mesa(mesa, MesaConfig(stochastic=True))
    tok = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"]))
    times: dict[str, list[float]] = {"exact": [], "mesa": []}
    for i in range(spec["repeat"] + 1):
        for name, model in (("exact", exact), ("mesa", mesa)):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["setting"] == "autocast-bf16"):
                logits = model(tok)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tok[:, 1:].flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"step_s": med["exact"], "mesa_step_s": med["mesa"], "time_ratio": med["mesa"] / med["exact"]}


def _run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    # a fixed mmap threshold makes glibc hand large freed blocks back to the OS at once, so RSS
    # follows live memory instead of the allocator's high-water mark (same for both modes)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-m", "longtrain.bench.mesa", _CHILD_FLAG, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loss_run(steps: int, mesa: bool, out_dir: str, timeout: float) -> dict[str, Any]:
    """Train the tiny-cpu recipe for `steps` steps in one process; returns its losses."""
    code = (
        "import json, sys\n"
        "from longtrain.launcher.config import load_recipe\n"
        "from longtrain.launcher.trainer import train\n"
        "from importlib.resources import files\n"
        "import pathlib\n"
        "p = pathlib.Path('recipes/tiny-cpu.toml')\n"
        "r = load_recipe(p, sys.argv[1:])\n"
        "res = train(r)\n"
        "print('LOSSES ' + json.dumps(res['losses']))\n")
    sets = [f"training.steps={steps}", f"mesa.enabled={'true' if mesa else 'false'}",
            f"run.output_dir={os.path.join(out_dir, 'mesa' if mesa else 'exact')}", "checkpoint.resume=none", f"run.name=mesa-{int(mesa)}"]
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code, *sets], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSES ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training run failed (mesa={mesa}):\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    losses = json.loads(lines[-1][len("LOSSES "):])
    tail, tail30 = losses[-10:], losses[-30:]
    return {"steps": len(losses), "first": losses[0], "last": losses[-1], "last10_mean": sum(tail) / len(tail),
            "last30_mean": sum(tail30) / len(tail30), "losses": losses}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [_CHILD_FLAG]:
        spec = json.loads(argv[1])
        print(json.dumps(_time_child(spec) if spec["mode"] == "time" else _child(spec)))
        return 0
    ap = argparse.ArgumentParser(prog="longtrain bench mesa", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["tiny:4096", "tiny:8192", "small:4096"],
                    help="preset:seq pairs (small:8192 takes ~1 min per setting on 2 cores)")
    ap.add_argument("--settings", nargs="+", default=["fp32", "bf16", "autocast-bf16"],
                    choices=["fp32", "bf16", "autocast-bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="timed fwd+bwd steps per model (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    ap.add_argument("--loss-steps", type=int, default=0,
                    help="also train recipes/tiny-cpu.toml this many steps with and without Mesa")
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/mesa.json)")
    args = ap.parse_args(argv)

    from longtrain.bench.common import print_table, write_json

    rows, raw = [], []
    for case in args.cases:
        preset, seq = case.split(":")
        for setting in args.settings:
            res = {}
            for mode in ("exact", "mesa"):
                spec = dict(preset=preset, seq=int(seq), batch=args.batch, setting=setting, mode=mode,
                            repeat=args.repeat, threads=args.threads)
                res[mode] = _run_child(spec, args.timeout)
                raw.append({**spec, **res[mode]})
            tspec = dict(preset=preset, seq=int(seq), batch=args.batch, setting=setting, mode="time",
                         repeat=args.repeat, threads=args.threads)
            tm = _run_child(tspec, args.timeout)
            raw.append({**tspec, **tm})
            e, m = res["exact"], res["mesa"]
            rows.append({
                "preset": preset, "seq": int(seq), "setting": setting,
                "saved_blocks_MB": e["saved_blocks"] / 2**20,
                "mesa_blocks_MB": m["saved_blocks"] / 2**20,
                "blocks_ratio": m["saved_blocks"] / e["saved_blocks"],
                "all_ratio": m["saved_all"] / e["saved_all"],
                "rss_MB": e["rss_growth"] / 2**20, "mesa_rss_MB": m["rss_growth"] / 2**20,
                "rss_ratio": m["rss_growth"] / max(e["rss_growth"], 1),
                "step_s": tm["step_s"], "mesa_step_s": tm["mesa_step_s"], "time_ratio": tm["time_ratio"],
            })
            print_table(rows[-1:])
    print()
    print_table(rows)
    payload: dict[str, Any] = {"args": vars(args), "rows": rows, "raw": raw}
    if args.loss_steps:
        out_dir = os.path.join("bench-results", "mesa-loss-runs")
        exact = _loss_run(args.loss_steps, False, out_dir, args.timeout)
        mesa = _loss_run(args.loss_steps, True, out_dir, args.timeout)
        rel = (mesa["last10_mean"] - exact["last10_mean"]) / exact["last10_mean"]
        rel30 = (mesa["last30_mean"] - exact["last30_mean"]) / exact["last30_mean"]
        payload["loss"] = {"exact": exact, "mesa": mesa, "rel_diff_last10": rel, "rel_diff_last30": rel30}
        print(f"loss after {args.loss_steps} steps: mean of last 10 exact {exact['last10_mean']:.4f}, "
              f"mesa {mesa['last10_mean']:.4f} ({rel:+.2%}); mean of last 30 exact {exact['last30_mean']:.4f}, "
              f"mesa {mesa['last30_mean']:.4f} ({rel30:+.2%}); final step exact {exact['last']:.4f}, "
              f"mesa {mesa['last']:.4f}")
    write_json("mesa", payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
