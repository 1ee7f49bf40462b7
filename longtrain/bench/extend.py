"""Context extension, end to end: base at 128 tokens -> continue-tuned to 1024 with three RoPE choices and a MASFormer-style span plan, each evaluated by passkey accuracy and perplexity by position.

    longtrain bench extend [--base RUN] [--variants theta,pi,none,masformer] [--steps N]
                           [--samples 40] [--ppl-samples 16] [--out DIR] [--reuse]

1. base: `recipes/passkey-cpu.toml` (2 processes, sp = 2), unless --base names a finished run.
2. each variant: `recipes/passkey-extend-cpu.toml` with `model.init_from` = the base run and
       theta      model.rope_theta = 100000, rope_scaling = {} (raise θ, EasyContext; no scaling)
       pi         rope_theta 10000, model.rope_scaling = {type = "linear", factor = 8} (the recipe as shipped)
       none       rope_theta 10000, rope_scaling = {} (RoPE unchanged)
       masformer  as pi, model.attention = ["full", "window:128"] (only layer 1 sees the whole context)
   all with the same step budget.
3. every model: `longtrain eval passkey` and `longtrain eval ppl` at 128, 256, 512, 1024 tokens.

Writes DIR/extend.json (everything), DIR/extend.md (the comparison table), DIR/passkey.png (one heat map
per model, side by side) and DIR/ppl.png (perplexity by position at 1024, one line per model), plus each
run folder and its eval JSON/PNG. --reuse keeps runs whose last checkpoint exists and evals already written.
See docs/context-extension.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BASE_RECIPE = "passkey-cpu.toml"
EXTEND_RECIPE = "passkey-extend-cpu.toml"
LENGTHS = (128, 256, 512, 1024)

VARIANTS: dict[str, list[str]] = {
    "theta": ["model.rope_theta=100000.0", "model.rope_scaling={}"],  # {}: explicitly no scaling
    "pi": ["model.rope_theta=10000.0", 'model.rope_scaling={type="linear", factor=8.0}'],  # the recipe as shipped
    "none": ["model.rope_theta=10000.0", "model.rope_scaling={}"],
    "masformer": ["model.rope_theta=10000.0", 'model.rope_scaling={type="linear", factor=8.0}',
                  'model.attention=["full", "window:128"]'],
}
LABELS = {"base": "base (128)", "theta": "θ 10k→100k", "pi": "linear PI ×8", "none": "RoPE unchanged",
          "masformer": "MASFormer (full, window:128), PI ×8"}


def _recipe(name: str) -> Path:
    local = REPO / "recipes" / name
    if local.is_file():
        return local
    from longtrain.shipped import shipped_recipe

    return Path(shipped_recipe(name.removesuffix(".toml")))


def _cli(*args: str, log: Path) -> float:
    """Run `longtrain ARGS` (output to `log`); wall seconds. Raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", *args], stdout=f,
                              stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"longtrain {' '.join(args[:2])} failed ({proc.returncode}); see {log}:\n"
                         + "".join(open(log).readlines()[-15:]))
    return wall


def _final(run: Path) -> Path | None:
    from longtrain.launcher.loading import resolve_checkpoint

    try:
        return resolve_checkpoint(run)[1]
    except Exception:  # noqa: BLE001  (no checkpoint yet)
        return None


def train(recipe: Path, run: Path, sets: list[str], *, nproc: int, reuse: bool, steps: int | None) -> dict[str, Any]:
    from longtrain.launcher.config import load_recipe

    want = steps or load_recipe(recipe, sets).training.steps
    ck = _final(run)
    timing = run / "bench-wall.json"
    if reuse and ck is not None and ck.name == f"step_{want:08d}":
        info = json.loads(timing.read_text()) if timing.is_file() else {"wall_s": None}
        return {**info, "steps": want, "checkpoint": str(ck), "reused": True}
    args = ["train", str(recipe), "--nproc", str(nproc), "--set", f"run.output_dir={run}",
            "--set", "checkpoint.resume=none"]
    if steps:
        args += ["--set", f"training.steps={steps}"]
    for s in sets:
        args += ["--set", s]
    run.mkdir(parents=True, exist_ok=True)
    print(f"train {run.name}: {' '.join(sets) or '(recipe as shipped)'}", flush=True)
    wall = _cli(*args, log=run.parent / f"{run.name}.train.log")
    (run / "bench-wall.json").write_text(json.dumps({"wall_s": round(wall, 1), "sets": sets}))
    return {"wall_s": round(wall, 1), "sets": sets, "steps": want, "checkpoint": str(_final(run)), "reused": False}


def evaluate(ckpt: str, out: Path, *, samples: int, ppl_samples: int, reuse: bool) -> tuple[dict, dict]:
    lengths = ",".join(map(str, LENGTHS))
    res = {}
    for metric, extra in (("passkey", ["--samples", str(samples), "--batch", "8"]),
                          ("ppl", ["--samples", str(ppl_samples), "--buckets", "8"])):
        f = out / f"{metric}.json"
        if not (reuse and f.is_file()):
            _cli("eval", metric, ckpt, "--lengths", lengths, "--out", str(out), *extra,
                 log=out.parent / f"{out.name}.{metric}.log")
        res[metric] = json.loads(f.read_text())
    return res["passkey"], res["ppl"]


def summarize(name: str, run: dict[str, Any], pk: dict[str, Any], ppl: dict[str, Any]) -> dict[str, Any]:
    from longtrain.launcher.eval.report import ppl_between

    acc = np.asarray(pk["accuracy"])
    row: dict[str, Any] = {"model": name, "steps": run.get("steps"), "wall_s": run.get("wall_s")}
    for li, L in enumerate(pk["lengths"]):
        row[f"passkey@{L}"] = round(float(acc[li].mean()), 1)
        row[f"min_depth@{L}"] = round(float(acc[li].min()), 1)
    L = max(ppl["lengths"])
    row["ppl@1024 0-128"] = round(ppl_between(ppl, L, 0, 128), 3)
    row["ppl@1024 512-1024"] = round(ppl_between(ppl, L, 512, 1024), 3)
    row["ppl@128"] = round(ppl["ppl"][ppl["lengths"].index(128)], 3)
    row["ppl@1024"] = round(ppl["ppl"][ppl["lengths"].index(L)], 3)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["model", "steps", "wall"] + [f"{L}" for L in LENGTHS] + ["min depth @1024", "ppl 0–128 @1024",
                                                                      "ppl 512–1024 @1024", "ppl @128"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        wall = f"{r['wall_s'] / 60:.1f} min" if r.get("wall_s") else "–"
        cells = [LABELS.get(r["model"], r["model"]), str(r["steps"]), wall]
        cells += [f"{r[f'passkey@{L}']:.1f}" for L in LENGTHS]
        cells += [f"{r['min_depth@1024']:.1f}", f"{r['ppl@1024 0-128']:.3g}", f"{r['ppl@1024 512-1024']:.3g}",
                  f"{r['ppl@128']:.3g}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench extend", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="a finished passkey-cpu run folder (default: train one)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="extension steps (default: the recipe's)")
    ap.add_argument("--samples", type=int, default=40, help="passkey prompts per (length, depth)")
    ap.add_argument("--ppl-samples", type=int, default=16, help="held-out documents per length")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="extra override for every extension run")
    ap.add_argument("--out", default="bench-results/extend", help="folder for runs, evals, table and plots")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs and evals found in --out")
    a = ap.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    if a.base:
        ck = _final(Path(a.base))
        if ck is None:
            ap.error(f"--base {a.base}: no checkpoint there")
        timing = Path(a.base) / "bench-wall.json"
        wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
        runs["base"] = {"wall_s": wall, "steps": json.loads((ck / "meta.json").read_text())["step"],
                        "checkpoint": str(ck), "run": str(Path(a.base).resolve())}
    else:
        runs["base"] = train(_recipe(BASE_RECIPE), out / "base", [], nproc=a.nproc, reuse=a.reuse, steps=None)
        runs["base"]["run"] = str(out / "base")
    for v in variants:
        sets = [f"model.init_from={runs['base']['run']}", *VARIANTS[v], *a.sets]
        runs[v] = train(_recipe(EXTEND_RECIPE), out / v, sets, nproc=a.nproc, reuse=a.reuse, steps=a.steps)
    rows, pks, ppls = [], {}, {}
    for name, run in runs.items():
        pk, ppl = evaluate(run["checkpoint"], out / f"eval-{name}", samples=a.samples, ppl_samples=a.ppl_samples,
                           reuse=a.reuse)
        pks[LABELS.get(name, name)], ppls[LABELS.get(name, name)] = pk, ppl
        rows.append(summarize(name, run, pk, ppl))
        print(f"{name}: passkey by length {[rows[-1][f'passkey@{L}'] for L in LENGTHS]}", flush=True)
    from longtrain.bench.common import print_table, write_json
    from longtrain.launcher.eval.report import plot_passkey_compare, plot_ppl_compare

    print_table(rows)
    table = markdown(rows)
    (out / "extend.md").write_text(table + "\n")
    plot_passkey_compare(pks, out / "passkey.png", "Passkey accuracy: base vs context-extended models")
    plot_ppl_compare(ppls, out / "ppl.png", max(LENGTHS),
                     "Held-out perplexity by position at 1024 tokens (stdlib documents never trained on)")
    write_json("extend", {"runs": runs, "rows": rows, "passkey": pks, "ppl": ppls,
                          "samples": a.samples, "ppl_samples": a.ppl_samples}, str(out / "extend.json"))
    print(table)
    print(f"wrote {out / 'extend.md'}, {out / 'passkey.png'}, {out / 'ppl.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
