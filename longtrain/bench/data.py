"""Data at scale: prepare throughput, time from launch to the first step, RSS per rank, data wait.

  longtrain bench data [--large-mb 1000] [--small-mb 20] [--work DIR] [--quick]

1. Generates two JSONL corpora (stdlib text cut into documents of 200..20,000 characters):
   a small one and a large one (--large-mb, default 1000 = ~1 GB).
2. `longtrain prepare` throughput on the small corpus: byte tokenizer, and an 8k BPE
   tokenizer.json with --num-proc 1 and 2 (tokens/s, and per process); the large corpus is
   prepared with the byte tokenizer.
3. `longtrain train tiny-cpu --nproc 2` on each prepared folder: seconds from launch to the
   first step's progress line, and the peak anonymous RSS (RssAnon: not the page cache that
   the memory map fills) of each training process; once more on the large one with
   data.prefetch = false, for the data wait as a share of the step with and without prefetch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from longtrain.bench.common import print_table, write_json


def make_jsonl(path: Path, megabytes: float, seed: int = 0) -> dict[str, Any]:
    """A JSONL file of ~megabytes MB: documents cut from the standard library's source."""
    from longtrain.launcher.data.sources import load_documents

    if path.exists() and path.stat().st_size >= megabytes * 1e6 * 0.98:
        return {"path": str(path), "bytes": path.stat().st_size}
    text = "".join(load_documents("stdlib", max_documents=400))
    rng = np.random.default_rng(seed)
    target, written, docs = megabytes * 1e6, 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while written < target:
            lens = rng.integers(200, 20_000, size=64)
            starts = rng.integers(0, len(text) - 20_000, size=64)
            chunk = "".join(json.dumps({"text": text[a:a + n]}) + "\n" for a, n in zip(starts, lens))
            f.write(chunk)
            written += len(chunk)
            docs += 64
    os.replace(tmp, path)
    return {"path": str(path), "bytes": path.stat().st_size, "documents": docs}


def _rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _workers(root: int) -> list[int]:
    """Descendant processes of `root` that are training ranks (RANK in their environment)."""
    from longtrain.launcher.faults import process_tree

    out = []
    for c in process_tree(root)[1:]:
        try:
            if b"\0RANK=" in b"\0" + Path(f"/proc/{c}/environ").read_bytes():
                out.append(c)
        except OSError:
            pass
    return out


def launch(folder: Path, run_dir: Path, steps: int, extra: list[str]) -> dict[str, Any]:
    """Train tiny-cpu on `folder` with 2 processes: launch -> first step seconds, peak RssAnon per rank."""
    cmd = [sys.executable, "-m", "longtrain.launcher.cli", "train", "tiny-cpu", "--nproc", "2",
           "--set", f"data.source={folder}", f"run.output_dir={run_dir}", f"training.steps={steps}",
           "checkpoint.resume=none", "checkpoint.interval=100000", "metrics.log_every=1", *extra]
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak: dict[int, int] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            for pid in _workers(proc.pid):
                peak[pid] = max(peak.get(pid, 0), _rss_anon_kb(pid))
            stop.wait(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and line.lstrip().startswith("step") and "/" in line.split("|")[0]:
            first = time.perf_counter() - t0
    rc = proc.wait()
    stop.set()
    th.join()
    if rc != 0:
        raise RuntimeError(f"training failed ({rc}):\n{''.join(lines[-30:])}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps_ = [r for r in recs if "loss" in r][1:]  # the first step pays one-off costs
    wait = float(np.mean([r["data_wait_s"] for r in steps_])) if steps_ else float("nan")
    step_t = float(np.mean([r["step_time_s"] for r in steps_])) if steps_ else float("nan")
    ranks = sorted(peak.values())
    return {"launch_to_step1_s": first, "rss_anon_mb_per_rank": [round(k / 1024, 1) for k in ranks],
            "rss_anon_mb_max": round(max(ranks) / 1024, 1) if ranks else float("nan"),
            "data_wait_s": wait, "step_time_s": step_t, "data_wait_share": wait / step_t if step_t else float("nan")}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-mb", type=float, default=20.0)
    ap.add_argument("--large-mb", type=float, default=1000.0)
    ap.add_argument("--steps", type=int, default=20, help="training steps per launch")
    ap.add_argument("--work", default=None, help="folder for corpora and prepared folders (kept; default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="2 MB / 10 MB corpora, 5 steps (a smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.small_mb, args.large_mb, args.steps = 2.0, 10.0, 5
    from longtrain.launcher.data.prepare import prepare
    from longtrain.launcher.data.prepared import PreparedFolder
    from longtrain.testing import train_bpe_tokenizer

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="longtrain-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    small = make_jsonl(work / f"small-{args.small_mb:g}mb.jsonl", args.small_mb)
    large = make_jsonl(work / f"large-{args.large_mb:g}mb.jsonl", args.large_mb, seed=1)
    print(f"corpora: {small['bytes'] / 1e6:.0f} MB and {large['bytes'] / 1e6:.0f} MB of JSONL "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    bpe = train_bpe_tokenizer(work / "bpe8k", vocab_size=8192,
                              files=[str(p) for p in sorted(root.glob("*.py"))[:60]])
    prep_rows = []
    for label, corpus, tok, nproc in (("small", small, "bytes", 1), ("small", small, bpe, 1),
                                      ("small", small, bpe, 2), ("large", large, "bytes", 2)):
        out = work / f"prep-{label}-{'bytes' if tok == 'bytes' else 'bpe'}-np{nproc}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        meta = prepare([corpus["path"]], out, tok, num_proc=nproc, progress_every=30.0, stream=sys.stdout)
        dt = time.perf_counter() - t
        prep_rows.append({"corpus": label, "MB": round(corpus["bytes"] / 1e6), "tokenizer": "bytes" if tok == "bytes"
                          else "bpe-8k", "num_proc": nproc, "tokens": meta["n_tokens"], "seconds": dt,
                          "Mtok_per_s": meta["n_tokens"] / dt / 1e6,
                          "Mtok_per_s_per_proc": meta["n_tokens"] / dt / 1e6 / nproc,
                          "tokenize_s": meta["tokenize_seconds"], "folder": str(out)})
        print_table(prep_rows[-1:], ["corpus", "MB", "tokenizer", "num_proc", "tokens", "seconds", "Mtok_per_s"])
    bpe_rows = [r for r in prep_rows if r["tokenizer"] == "bpe-8k"]
    scaling = bpe_rows[1]["Mtok_per_s"] / bpe_rows[0]["Mtok_per_s"]
    print()
    print_table(prep_rows, ["corpus", "MB", "tokenizer", "num_proc", "tokens", "seconds", "Mtok_per_s",
                            "Mtok_per_s_per_proc"])
    print(f"BPE prepare speed-up from --num-proc 1 to 2: {scaling:.2f}x")

    small_dir = work / "prep-small-bytes-np1"
    large_dir = work / "prep-large-bytes-np2"
    run_rows = []
    for label, folder, extra in (("small", small_dir, []), ("large", large_dir, []),
                                 ("large, no prefetch", large_dir, ["data.prefetch=false"])):
        r = launch(folder, work / "run", args.steps, extra)
        run_rows.append({"corpus": label, "tokens": PreparedFolder(folder).meta["n_tokens"], **r})
        print_table(run_rows[-1:], ["corpus", "tokens", "launch_to_step1_s", "rss_anon_mb_max", "data_wait_share"])
    print()
    print_table(run_rows, ["corpus", "tokens", "launch_to_step1_s", "rss_anon_mb_max", "rss_anon_mb_per_rank",
                           "data_wait_s", "step_time_s", "data_wait_share"])
    d_t = run_rows[1]["launch_to_step1_s"] - run_rows[0]["launch_to_step1_s"]
    d_rss = run_rows[1]["rss_anon_mb_max"] - run_rows[0]["rss_anon_mb_max"]
    print(f"large vs small ({run_rows[1]['tokens'] / run_rows[0]['tokens']:.0f}x the tokens): launch to step 1 "
          f"{d_t:+.1f}s, peak RssAnon per rank {d_rss:+.0f} MB")
    write_json("data", {"work": str(work), "prepare": prep_rows, "bpe_num_proc_speedup": scaling, "runs": run_rows,
                        "large_minus_small": {"launch_to_step1_s": d_t, "rss_anon_mb": d_rss}}, args.out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0
