"""`longtrain bench peer`: longtrain and torchtitan side by side, the same LLaMA on the same data.

Method. One recipe (default: the shipped tiny-cpu, a few steps) fixes the model shape, sequence
length, micro-batch (so tokens per step), optimizer, LR schedule, seed and data. `titan_settings`
translates it into torchtitan's terms; both trainers then run as torchrun jobs of `--nproc` gloo
ranks on the CPU (`longtrain.bench.peer_worker`), one after the other, `--repeat` times alternating:

- longtrain: its own CLI, `longtrain train RECIPE --set ...` joining the torchrun job (FSDP2 over
  all ranks; with `--cp`, parallel.sp = nproc instead: longtrain's sequence parallelism);
- torchtitan 0.3.0: its own `Trainer` (FSDP2 through `parallelize_llama`, fused wqkv, its chunked
  loss, its AdamW container and warmup/decay schedule; with `--cp`, its context parallelism), fed
  longtrain's samples in longtrain's order and started from longtrain's initial weights, so the first
  losses agree and the curves can be compared. Four run-time patches let it run on a CPU-only torch
  2.13 with gloo, and its attention is causal SDPA (FlexAttention, its default, has no CPU backward);
  peer_worker.py and docs/peer.md say where and why.

Each rank times its trainer's own `train_step` (tokens/s = tokens per step / median step time of
rank 0 after `--warmup` steps; the median over repeats is reported, and with `--repeat` > 1 the
ratio of each back-to-back pair of runs, the figure that drift in a shared machine's load disturbs
least) and reads its peak resident memory (VmHWM, reset just before the first step and read after
every step, the largest kept: the training steps' peak; `setup` is the peak before the reset).
torchtitan is looked for in `--peer-site` (default $LONGTRAIN_PEER_SITE or .peer-site): `make
peer-setup` installs it there without touching the venv's torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from longtrain.bench.common import print_table, write_json

DEFAULT_SITE = ".peer-site"
SITE_ENV = "LONGTRAIN_PEER_SITE"
INSTALL_HINT = ("torchtitan is not installed in {site}: run `make peer-setup` (or `pip install --target {site} "
                "--no-deps torchtitan==0.3.0` plus its missing dependencies, see docs/peer.md), "
                "or point --peer-site / $LONGTRAIN_PEER_SITE at such a folder")


def peer_site(arg: str | None) -> Path:
    """The folder torchtitan is installed in: --peer-site, else $LONGTRAIN_PEER_SITE, else .peer-site."""
    return Path(arg or os.environ.get(SITE_ENV) or DEFAULT_SITE).resolve()


def has_torchtitan(site: Path) -> bool:
    return (site / "torchtitan" / "trainer.py").is_file()


def bench_sets(steps: int, out: Path, cp: bool, nproc: int, extra: list[str]) -> list[str]:
    """longtrain overrides of a bench run: its own folder, no resume, no TensorBoard, `steps` steps."""
    sets = [f"training.steps={steps}", "checkpoint.resume=none", f"checkpoint.interval={steps}",
            "metrics.tensorboard=false", f"run.output_dir={out / 'longtrain-run'}"]
    if cp:
        sets.append(f"parallel.sp={nproc}")
    return sets + list(extra)


def titan_settings(recipe: Any, nproc: int, cp: bool) -> dict[str, Any]:
    """torchtitan's values for a longtrain recipe: model shape, batch, optimizer, schedule (pure)."""
    m, t = recipe.model_config(), recipe.training
    dp = 1 if cp else nproc
    model = {k: getattr(m, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                        "norm_eps", "rope_theta")}
    model["max_seq_len"] = recipe.data.seq_len
    if m.head_dim != m.dim // m.n_heads or m.tie_embeddings or m.rope_scaling or m.moh or m.attention != ["full"]:
        raise ValueError("bench peer compares plain LLaMA: head_dim = dim / n_heads, untied embeddings, "
                         "no rope_scaling, MoH or non-full attention")
    if t.schedule == "constant":
        sched = {"warmup_steps": t.warmup, "decay_ratio": 0.0, "decay_type": "linear", "min_lr_factor": 1.0}
    else:
        sched = {"warmup_steps": t.warmup, "decay_ratio": None, "decay_type": t.schedule,
                 "min_lr_factor": t.min_lr_ratio}
    global_batch = dp * t.micro_batch * t.grad_accum
    return {"model": model,
            "training": {"local_batch_size": t.micro_batch, "global_batch_size": global_batch,
                         "seq_len": recipe.data.seq_len, "steps": t.steps, "max_norm": t.grad_clip},
            "optimizer": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay},
            "lr_scheduler": sched, "cp": nproc if cp else 1, "dp": dp}


def tokens_per_step(settings: dict[str, Any]) -> int:
    """Tokens one torchtitan optimizer step trains on (all ranks)."""
    t = settings["training"]
    return t["global_batch_size"] * t["seq_len"]


def titan_state_dict(ours: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """longtrain parameters under torchtitan's names; wq/wk/wv fused into its wqkv layout
    [n_kv_heads, heads_per_kv + 2, head_dim, dim] (q heads of a kv group, then its k, then its v)."""
    names = ((".attn_norm.", ".attention_norm."), (".mlp_norm.", ".ffn_norm."), (".mlp.", ".feed_forward."),
             (".attn.wo.", ".attention.wo."))
    out = {}
    for k, v in ours.items():
        if ".attn.wk." in k or ".attn.wv." in k:
            continue
        if ".attn.wq." in k:
            q, kk, vv = v, ours[k.replace(".wq.", ".wk.")], ours[k.replace(".wq.", ".wv.")]
            hd, dim = q.shape[0] // n_heads, q.shape[1]
            v = torch.cat([q.view(n_kv_heads, n_heads // n_kv_heads, hd, dim), kk.view(n_kv_heads, 1, hd, dim),
                           vv.view(n_kv_heads, 1, hd, dim)], dim=1).reshape(-1, dim)
            k = k.replace(".attn.wq.", ".attention.qkv_linear.wqkv.")
        k = "lm_head.weight" if k == "output.weight" else k
        for a, b in names:
            k = k.replace(a, b)
        out[k] = v
    return out


def _worker_env(site: Path | None, nproc: int) -> dict[str, str]:
    """The workers' environment: the threads `longtrain train --nproc` would give each process; the
    peer site on the path of the torchtitan run only (the longtrain run sees the venv alone)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    repo = str(Path(__file__).resolve().parents[2])
    paths = ([str(site)] if site else []) + [repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _last_error(log: Path) -> str:
    """The last line of a failed run's log that names an exception."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()]
    named = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (named or lines or ["(no output)"])[-1][:400]


def _run_one(which: str, spec: dict[str, Any], site: Path, nproc: int, timeout: int) -> list[dict[str, Any]]:
    """One torchrun job of `which`; its ranks' records (rank 0 first). RuntimeError naming the failure."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "longtrain.bench.peer_worker", which, str(out / "spec.json")]
    log = out / f"{which}.log"
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env=_worker_env(site if which == "torchtitan" else None, nproc)).returncode
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{which} did not finish in {timeout}s (log: {log})") from None
    if rc:
        raise RuntimeError(f"{which} failed (exit {rc}): {_last_error(log)} (log: {log})")
    return [json.loads((out / f"{which}.rank{r}.json").read_text()) for r in range(nproc)]


def summarize(ranks: list[dict[str, Any]], tokens: int, warmup: int) -> dict[str, Any]:
    """tokens/s from rank 0's median step time after `warmup` steps; the ranks' peak RSS; the losses."""
    times = sorted(ranks[0]["step_times_s"][warmup:] or ranks[0]["step_times_s"])
    step = times[len(times) // 2]
    losses = ranks[0]["losses"]
    return {"tokens_per_s": tokens / step, "step_ms": 1000 * step,
            "peak_rss_mb": max(r["train_hwm_mb"] for r in ranks),
            "setup_rss_mb": max(r["setup_hwm_mb"] for r in ranks),
            "rss_per_rank_mb": [r["train_hwm_mb"] for r in ranks],
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median tokens/s (its own memory and losses)."""
    runs = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**runs[len(runs) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="longtrain bench peer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny-cpu", help="longtrain recipe both trainers follow (default tiny-cpu)")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="recipe overrides, e.g. data.seq_len=1024 training.micro_batch=2")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the median step time")
    ap.add_argument("--nproc", type=int, default=2, help="gloo ranks per run (default 2)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each trainer, alternating (median reported)")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "flex", "varlen"),
                    help="torchtitan's attention: sdpa (causal SDPA; the only one that trains on CPU), "
                         "flex (its default: no CPU backward) or varlen (CUDA only)")
    ap.add_argument("--cp", action="store_true",
                    help="sequence split over the ranks: longtrain parallel.sp = nproc vs torchtitan "
                         "context_parallel_degree = nproc (torchtitan's CP has no CPU path, docs/peer.md)")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="torch.profiler key_averages from this step to the last, rank 0 of each trainer, "
                         "in ms per step by kind of op (0 = off; those steps are slower)")
    ap.add_argument("--peer-site", default=None,
                    help=f"folder torchtitan is installed in (default ${SITE_ENV} or {DEFAULT_SITE})")
    ap.add_argument("--keep-runs", action="store_true", help="keep the runs' folders (logs, per-rank records)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one run may take")
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/peer.json)")
    return ap


def _specs(args: argparse.Namespace, runs: Path) -> tuple[dict[str, Any], int] | str:
    """The shared spec of both trainers and tokens per step, or an error line."""
    from longtrain.errors import LongtrainError
    from longtrain.launcher.config import load_recipe

    try:
        sets = bench_sets(args.steps, runs, args.cp, args.nproc, args.overrides)
        recipe = load_recipe(args.recipe, sets)
        if recipe.training.warmup >= args.steps:  # torchtitan would shorten its warmup to the run
            sets.append(f"training.warmup={max(1, args.steps // 4)}")
            recipe = load_recipe(args.recipe, sets)
        settings = titan_settings(recipe, args.nproc, args.cp)
    except (LongtrainError, ValueError) as e:
        return str(e)
    settings["attn"] = args.attn
    spec = {"recipe": args.recipe, "longtrain_sets": sets, "steps": args.steps, "titan": settings,
            "profile_step": args.profile_step}
    return spec, tokens_per_step(settings)


def _prepare_data(spec: dict[str, Any]) -> None:
    """Prepare the recipe's raw data into the cache once, here, before two ranks would race for it."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.data.corpus import build_corpus, corpus_tokenizer

    r = load_recipe(spec["recipe"], spec["longtrain_sets"])
    tok = corpus_tokenizer(r.data, "bytes" if r.data.tokenizer == "auto" else r.data.tokenizer,
                           explicit=r.data.tokenizer != "auto")
    build_corpus(r.data, seq_len=r.data.seq_len, seed=r.run.seed, tokenizer=tok, local_main=True)


def _rows(res: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    cols = ("tokens_per_s", "step_ms", "peak_rss_mb", "setup_rss_mb", "first_loss", "last_loss")
    rows = [{"trainer": k, **{c: v[c] for c in cols}} for k, v in res.items()]
    if len(res) == 2:
        a, b = res["longtrain"], res["torchtitan"]
        rows.append({"trainer": "longtrain/torchtitan", "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                     "step_ms": a["step_ms"] / b["step_ms"], "peak_rss_mb": a["peak_rss_mb"] / b["peak_rss_mb"],
                     "setup_rss_mb": a["setup_rss_mb"] / b["setup_rss_mb"],
                     "first_loss": a["first_loss"] - b["first_loss"], "last_loss": a["last_loss"] - b["last_loss"]})
    return rows


def _profiles(runs: Path, repeats: int) -> list[dict[str, Any]]:
    """Rows of ms per step by kind of op, each trainer's last repeat, and their difference."""
    got = {}
    for which in ("longtrain", "torchtitan"):
        path = runs / f"{which}-{repeats - 1}" / f"{which}.profile.json"
        if path.is_file():
            got[which] = json.loads(path.read_text())["ms_per_step"]
    kinds = sorted({k for v in got.values() for k in v}, key=lambda k: -max(v.get(k, 0.0) for v in got.values()))
    rows = [{"kind": k, **{w: v.get(k, 0.0) for w, v in got.items()}} for k in kinds]
    rows.append({"kind": "total", **{w: sum(v.values()) for w, v in got.items()}})
    if len(got) == 2:
        for r in rows:
            r["longtrain - torchtitan"] = r["longtrain"] - r["torchtitan"]
    return rows


def _run_all(args: argparse.Namespace, spec: dict[str, Any], runs: Path, site: Path,
             tokens: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """`--repeat` runs of each trainer, alternating which goes first; a trainer that fails once is not
    run again (its error line is kept, the other trainer's runs go on)."""
    found: dict[str, list[dict[str, Any]]] = {"longtrain": [], "torchtitan": []}
    errors: dict[str, str] = {}
    for rep in range(args.repeat):
        for which in (("longtrain", "torchtitan") if rep % 2 == 0 else ("torchtitan", "longtrain")):
            if which in errors:
                continue
            try:
                ranks = _run_one(which, {**spec, "out": str(runs / f"{which}-{rep}")}, site, args.nproc,
                                 args.timeout)
            except RuntimeError as e:
                errors[which] = str(e)
                continue
            found[which].append(summarize(ranks, tokens, args.warmup))
    return found, errors


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    site = peer_site(args.peer_site)
    if not has_torchtitan(site):
        print("longtrain: error: " + INSTALL_HINT.format(site=site), file=sys.stderr, flush=True)
        return 2
    runs = Path(tempfile.mkdtemp(prefix="longtrain-peer-"))
    made = _specs(args, runs)
    if isinstance(made, str):
        print(f"longtrain: error: {made}", file=sys.stderr, flush=True)
        return 2
    spec, tokens = made
    _prepare_data(spec)
    found, errors = _run_all(args, spec, runs, site, tokens)
    res = {k: _median_run(v) for k, v in found.items() if v}
    pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(found["longtrain"], found["torchtitan"])]
    keep = args.keep_runs or args.profile_step > 0
    print(f"{args.recipe} {' '.join(args.overrides)} | {tokens} tokens/step, {args.steps} steps, {args.nproc} gloo "
          f"ranks ({'sp/cp' if args.cp else 'FSDP2'}), torchtitan attention {args.attn}"
          + (f" | runs in {runs}" if keep else ""))
    print_table(_rows(res))
    if len(pairs) > 1:
        print("tokens/s ratio of each pair of runs: " + ", ".join(f"{p:.3f}" for p in pairs)
              + f" (median {sorted(pairs)[len(pairs) // 2]:.3f})")
    profile = _profiles(runs, args.repeat) if args.profile_step else None
    if profile:
        print(f"rank 0, self CPU ms per step (torch.profiler, steps {args.profile_step}-{args.steps}):")
        print_table(profile)
    write_json("peer", {"recipe": args.recipe, "overrides": args.overrides, "tokens_per_step": tokens,
                        "steps": args.steps, "warmup": args.warmup, "nproc": args.nproc, "cp": args.cp,
                        "attn": args.attn, "settings": spec["titan"], "results": res, "errors": errors,
                        "rows": _rows(res), "pair_ratios": pairs, "profile": profile,
                        "runs": str(runs) if keep else None}, args.out)
    for which, e in errors.items():
        print(f"longtrain: error: {e}", file=sys.stderr, flush=True)
    if not keep and not errors:
        shutil.rmtree(runs, ignore_errors=True)
    return 1 if errors else 0
