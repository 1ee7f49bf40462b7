"""`longtrain bench memory`: where a training step's memory goes per token, and how long a sequence
one process trains within a memory cap; the planner's memory model against measured peaks.

Three parts (each a table, all in one JSON):
  components  the planner's bytes per token by component (logits, MLP intermediates, saved
              activations, checkpointed inputs on device / host) for a LLaMA-3-shaped small model
              (vocabulary 128,256), today's path (loss_chunk=0, mlp_chunk=0, checkpointing none)
              beside the defaults and the long-sequence settings;
  longest     the longest sequence (a multiple of 1,024) that one process trains within --cap-gib,
              from the planner, and the planner checked by a measured step at that length (or at
              --verify-max tokens when longer: attention on CPU is quadratic);
  grid        planner vs measured peak on S x V x ffn x checkpointing x Mesa (--grid full: the
              48 points of issue 21; default: a quick subset);
  inputs      (--inputs) checkpointed layer inputs exact vs Mesa 8-bit, 'full' and 'offload':
              measured peak growth per token beside the planner's, and the offload store's bytes.
  heads       (--heads) attention in head groups (training.attn_head_chunk) on vs off, with
              checkpointing none and full + Mesa: how much less a token costs, measured beside
              the planner's figure.

Measuring a peak (`measure_peak`): a fresh single-threaded process with
MALLOC_MMAP_THRESHOLD_=65536 (every tensor buffer is its own mmap, so freed memory leaves the
resident set at once); a warm-up step pages in the kernels; VmRSS before the model is built is the
baseline; a short first step creates the AdamW state; /proc/self/clear_refs resets VmHWM, and
VmHWM - baseline after one full step is the peak of a steady-state step (weights, AdamW state,
gradients, activations, logits, host copies of offloaded inputs: on CPU host and device are one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MiB, GiB = 2**20, 2**30

# LLaMA-3 shaped, small: GQA 4:1, ffn 3.5 x dim, the 128,256-token vocabulary
LLAMA3_SMALL = dict(vocab_size=128256, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=896)

MEASURE = r"""
import gc, json, sys
import torch
torch.set_num_threads(1)
from longtrain.models import Transformer, model_config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

a = json.loads(sys.argv[1])

def run(seq, measure):
    base = status("VmRSS")  # before the weights exist
    cfg = model_config(a.get("preset"), max_seq_len=max(seq, 64), **a["model"])
    model = Transformer(cfg)
    model.activation_checkpointing = a["checkpointing"]
    model.set_mlp_chunk(a["mlp_chunk"])
    model.set_attn_head_chunk(a.get("attn_head_chunk", 0))
    if a["mesa"]:
        from longtrain.kernels.mesa import MesaConfig, attach_mesa
        attach_mesa(model, MesaConfig(enabled=True), inputs=a["checkpointing"] not in ("none", False))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(0)
    for i, ss in enumerate((64, seq)):  # a short step creates the AdamW state
        if i == 1 and measure:
            gc.collect()
            open("/proc/self/clear_refs", "w").write("5")
        tok = torch.randint(0, cfg.vocab_size, (a["batch"], ss), generator=g)
        lab = torch.randint(0, cfg.vocab_size, (a["batch"], ss), generator=g)
        model(tok, labels=lab, loss_chunk=a["loss_chunk"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    store = model.offload_store  # host bytes held for offloaded inputs, read from the store
    return status("VmHWM") - base, store.host_bytes if store is not None else 0

run(64, False)  # warm-up: page in the kernels this variant uses
gc.collect()
peak, host = run(a["seq"], True)
print(json.dumps({"peak": peak, "host_store": host}))
"""


def point(model: dict[str, Any], seq: int, *, checkpointing: str = "none", mesa: bool = False,
          loss_chunk: int | str = "auto", mlp_chunk: int | str = "auto", batch: int = 1,
          preset: str | None = "tiny", attn_head_chunk: int | str = 0) -> dict[str, Any]:
    """One measurement's settings (JSON-able)."""
    return {"preset": preset, "model": dict(model), "seq": seq, "batch": batch, "checkpointing": checkpointing,
            "mesa": mesa, "loss_chunk": loss_chunk, "mlp_chunk": mlp_chunk, "attn_head_chunk": attn_head_chunk}


def measure(p: dict[str, Any], timeout: int = 900) -> dict[str, int]:
    """One steady-state training step for point `p` (see module doc): {"peak": bytes, "host_store":
    bytes the offload store holds after it}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(p)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed for {p}: {proc.stderr[-2000:]}")
    return {k: int(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def measure_peak(p: dict[str, Any], timeout: int = 900) -> int:
    """Measured peak bytes of one steady-state training step for point `p`."""
    return measure(p, timeout)["peak"]


# Mesa on the checkpointed path: more layers than LLAMA3_SMALL so the stored inputs are a real share
LLAMA3_DEEP = dict(LLAMA3_SMALL, n_layers=16)
INPUT_VARIANTS = [("full", False), ("full", True), ("offload", False), ("offload", True)]


def _growth_points(model: dict[str, Any], seq: int, variants: list[tuple], jobs: int) -> dict[tuple, tuple]:
    """Measured and planned totals for each (ckpt, mesa, heads, batch) in `variants`, at length `seq`."""
    def one(key):
        ck, m, h, b = key
        p = point(model, seq, preset=None, checkpointing=ck, mesa=m, loss_chunk="auto", mlp_chunk=MLP_TILE,
                  attn_head_chunk=h, batch=b)
        return key, measure(p, timeout=3600), predicted_total(p)

    tag = (json.dumps(model, sort_keys=True), seq)
    todo = [v for v in variants if (tag, v) not in _MEASURED]  # --inputs and --heads share their points
    with ThreadPoolExecutor(jobs) as pool:
        _MEASURED.update({(tag, k): (r, pred) for k, r, pred in pool.map(one, todo)})
    return {v: _MEASURED[(tag, v)] for v in variants}


# growth per token is measured between micro-batches b and 2b of one length (attention stays the same
# per token) above where activations pass the step's other moment, the optimizer's (the 128k vocabulary's
# foreach AdamW temporaries, ~260 MiB here): 16 and 32 sequences of 2,048 tokens for the checkpointed
# variants, 2 and 4 for 'none' (16 layers' activations pass it at once)
MLP_TILE = 256
BATCH = {"none": 2, "full": 16, "offload": 16}


def stored_inputs(model: dict[str, Any], seq: int, jobs: int = 2) -> list[dict[str, Any]]:
    """Checkpointed inputs exact vs 8-bit (Mesa): measured peak growth per token between micro-batches
    b and 2b, beside the planner's, and the host bytes the offload store holds at 2b."""
    pts = [(ck, m, 0, k * BATCH[ck]) for ck, m in INPUT_VARIANTS for k in (1, 2)]
    got = _growth_points(model, seq, pts, jobs)
    rows = []
    for ck, m in INPUT_VARIANTS:
        b = BATCH[ck]
        (r0, p0), (r1, p1) = got[(ck, m, 0, b)], got[(ck, m, 0, 2 * b)]
        dt = b * seq
        rows.append({"ckpt": ck, "mesa": m, "tokens": f"{dt:,} -> {2 * dt:,}",
                     "measured KiB/tok": round((r1["peak"] - r0["peak"]) / dt / 1024, 2),
                     "planner KiB/tok": round((p1 - p0) / dt / 1024, 2),
                     "host store MiB": round(r1["host_store"] / MiB, 2)})
    for ck in ("full", "offload"):
        exact, q = (next(r for r in rows if r["ckpt"] == ck and r["mesa"] == m) for m in (False, True))
        q["vs exact"] = round(q["measured KiB/tok"] / exact["measured KiB/tok"], 3) if exact["measured KiB/tok"] else None
        if exact["host store MiB"]:
            q["host vs exact"] = round(q["host store MiB"] / exact["host store MiB"], 3)
    return rows


HEAD_VARIANTS = [("none", False), ("full", True)]
_MEASURED: dict[tuple, tuple] = {}  # (model, seq, ckpt, mesa, heads, batch) -> (measured, planned), per run


def head_groups(model: dict[str, Any], seq: int, heads: int, jobs: int = 2) -> list[dict[str, Any]]:
    """Attention in groups of `heads` query heads vs all at once: measured peak growth per token between
    micro-batches b and 2b with and without, and the drop beside the planner's."""
    pts = [(ck, m, h, k * BATCH[ck]) for ck, m in HEAD_VARIANTS for h in (0, heads) for k in (1, 2)]
    got = _growth_points(model, seq, pts, jobs)
    rows = []
    for ck, m in HEAD_VARIANTS:
        b = BATCH[ck]
        dt = b * seq

        def growth(h: int, planned: bool) -> float:  # KiB per token from b to 2b sequences
            lo, hi = got[(ck, m, h, b)], got[(ck, m, h, 2 * b)]
            return ((hi[1] - lo[1]) if planned else (hi[0]["peak"] - lo[0]["peak"])) / dt / 1024

        off, on, p_off, p_on = growth(0, False), growth(heads, False), growth(0, True), growth(heads, True)
        rows.append({"ckpt": ck, "mesa": m, "tokens": f"{dt:,} -> {2 * dt:,}", "KiB/tok whole": round(off, 2),
                     f"KiB/tok groups of {heads}": round(on, 2), "measured drop": round(off - on, 2),
                     "planner drop": round(p_off - p_on, 2),
                     "drop / planned": round((off - on) / (p_off - p_on), 3) if p_off != p_on else None})
    return rows


def predict(p: dict[str, Any]):
    """The planner's Memory for point `p` on one CPU process (host copies count: one memory)."""
    from longtrain.launcher.sizing import memory_per_gpu
    from longtrain.models import model_config

    cfg = model_config(p.get("preset"), max_seq_len=max(p["seq"], 64), **p["model"])
    return memory_per_gpu(cfg, world=1, sp=1, micro_batch=p["batch"], seq_len=p["seq"], dtype="fp32",
                          engine="ddp", zero_stage=0, checkpointing=p["checkpointing"], mesa=p["mesa"],
                          loss_chunk=p["loss_chunk"], mlp_chunk=p["mlp_chunk"],
                          attn_head_chunk=p.get("attn_head_chunk", 0))


def predicted_total(p: dict[str, Any]) -> float:
    m = predict(p)
    return m.total + m.host_offload


def grid_points(full: bool) -> list[dict[str, Any]]:
    """Issue 21's grid: S in {2k, 8k}, V in {320, 128256}, ffn in {384, 1536}, checkpointing
    none/full/offload, Mesa off/on (48 points), plus issue 34's Mesa off/on x full/offload with attention
    in head groups (attn_head_chunk 2 of the tiny model's 4 heads) at 8k; the quick subset keeps 9."""
    pts = []
    for seq in (2048, 8192):
        for vocab in (320, 128256):
            for ffn in (384, 1536):
                for ck in ("none", "full", "offload"):
                    for mesa in (False, True):
                        pts.append(point({"vocab_size": vocab, "ffn_dim": ffn}, seq, checkpointing=ck, mesa=mesa))
    heads = [point({"vocab_size": 128256, "ffn_dim": 1536}, 8192, checkpointing=ck, mesa=mesa, attn_head_chunk=2)
             for ck in ("full", "offload") for mesa in (False, True)]
    if full:
        return pts + heads
    keep = {(2048, 128256, 384, "none", False), (2048, 320, 1536, "full", False), (2048, 128256, 1536, "offload", False),
            (2048, 320, 384, "none", True), (8192, 320, 384, "none", False), (8192, 128256, 1536, "full", True),
            (8192, 320, 1536, "offload", True), (8192, 128256, 384, "none", True)}
    return [p for p in pts if (p["seq"], p["model"]["vocab_size"], p["model"]["ffn_dim"], p["checkpointing"],
                               p["mesa"]) in keep] + heads[3:]


SETTINGS = {
    "today (loss_chunk=0, mlp_chunk=0, none)": dict(loss_chunk=0, mlp_chunk=0, checkpointing="none"),
    "defaults": dict(loss_chunk="auto", mlp_chunk="auto", checkpointing="none"),
    "defaults + offload": dict(loss_chunk="auto", mlp_chunk="auto", checkpointing="offload"),
    "defaults + offload + mlp_chunk=1024": dict(loss_chunk="auto", mlp_chunk=1024, checkpointing="offload"),
}


def components(model: dict[str, Any], seq: int) -> list[dict[str, Any]]:
    rows = []
    for name, kw in SETTINGS.items():
        m = predict(point(model, seq, preset=None, **kw))
        per = {k: v / 1024 for k, v in m.per_token.items()}
        rows.append({"setting": name, **{f"{k} KiB/tok": round(v, 2) for k, v in per.items()},
                     "fixed MiB": round(m.fixed / MiB, 1)})
    return rows


def longest(model: dict[str, Any], cap: float, verify_max: int) -> list[dict[str, Any]]:
    rows = []
    for name, kw in SETTINGS.items():
        s = 1024
        while predicted_total(point(model, s * 2, preset=None, **kw)) <= cap and s < 2**22:
            s *= 2
        lo, hi = s, s * 2  # refine to a multiple of 1024
        while hi - lo > 1024:
            mid = (lo + hi) // 2 // 1024 * 1024
            if predicted_total(point(model, mid, preset=None, **kw)) <= cap:
                lo = mid
            else:
                hi = mid
        if predicted_total(point(model, lo, preset=None, **kw)) > cap:
            lo = 0
        row = {"setting": name, "longest seq (planner)": lo,
               "predicted GiB": round(predicted_total(point(model, max(lo, 1024), preset=None, **kw)) / GiB, 3)}
        at = min(lo, verify_max // 1024 * 1024)
        if at:  # the planner's figure checked by one measured step (at the longest, or at verify_max)
            p = point(model, at, preset=None, **kw)
            got = measure_peak(p, timeout=3600)
            row.update({"measured at": at, "planner GiB there": round(predicted_total(p) / GiB, 3),
                        "measured GiB there": round(got / GiB, 3), "ratio": round(predicted_total(p) / got, 3)})
        rows.append(row)
    return rows


def run_grid(points: list[dict[str, Any]], jobs: int = 2) -> list[dict[str, Any]]:
    def one(p):
        got = measure_peak(p)
        pred = predicted_total(p)
        return {"seq": p["seq"], "vocab": p["model"]["vocab_size"], "ffn": p["model"]["ffn_dim"],
                "ckpt": p["checkpointing"], "mesa": p["mesa"], "heads": p["attn_head_chunk"] or "all",
                "predicted MiB": round(pred / MiB, 1),
                "measured MiB": round(got / MiB, 1), "ratio": round(pred / got, 3)}

    with ThreadPoolExecutor(jobs) as pool:  # single-threaded processes; resident sets are per process
        return list(pool.map(one, points))


def main(argv: list[str]) -> int:
    from longtrain.bench.common import print_table, write_json

    ap = argparse.ArgumentParser(prog="longtrain bench memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384, help="sequence length of the component table")
    ap.add_argument("--cap-gib", type=float, default=4.0, help="memory cap for the longest-sequence search")
    ap.add_argument("--grid", choices=("quick", "full", "none"), default="quick")
    ap.add_argument("--verify-max", type=int, default=16384,
                    help="measure at the longest length, or at this many tokens if that is longer (CPU "
                         "attention is quadratic)")
    ap.add_argument("--jobs", type=int, default=2, help="measurements at once (each one thread)")
    ap.add_argument("--inputs", action="store_true",
                    help="also measure checkpointed inputs exact vs Mesa 8-bit (full / offload)")
    ap.add_argument("--inputs-seq", type=int, default=2048,
                    help="sequence length of --inputs / --heads (growth measured between micro-batches b and 2b)")
    ap.add_argument("--heads", type=int, default=0, metavar="N",
                    help="also measure attention in groups of N query heads vs all at once (e.g. 2)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.seq <= 0 or a.cap_gib <= 0 or a.jobs <= 0 or a.heads < 0:
        print("longtrain: error: --seq, --cap-gib and --jobs must be > 0 (--heads >= 0)", file=sys.stderr)
        return 2
    model = dict(LLAMA3_SMALL)
    print(f"model: LLaMA-3-shaped small {LLAMA3_SMALL}, fp32, micro_batch 1, one process\n")
    comp = components(model, a.seq)
    print(f"bytes per token by component at S = {a.seq:,} (planner; fixed = weights, grads, AdamW, temporaries)")
    print_table(comp)
    print()
    lng = longest(model, a.cap_gib * GiB, a.verify_max)
    print(f"longest sequence within {a.cap_gib:g} GiB (planner), and one measured step at that length "
          f"(or at --verify-max {a.verify_max:,} when longer)")
    print_table(lng)
    inputs = []
    if a.inputs:
        print()
        inputs = stored_inputs(dict(LLAMA3_DEEP), a.inputs_seq, a.jobs)
        print(f"checkpointed inputs exact vs Mesa 8-bit: {LLAMA3_DEEP['n_layers']} layers, mlp_chunk {MLP_TILE}, "
              f"S = {a.inputs_seq:,}, growth per token between micro-batches")
        print_table(inputs)
    heads = []
    if a.heads:
        print()
        heads = head_groups(dict(LLAMA3_DEEP), a.inputs_seq, a.heads, a.jobs)
        print(f"attention in groups of {a.heads} of {LLAMA3_DEEP['n_heads']} query heads vs all at once: "
              f"{LLAMA3_DEEP['n_layers']} layers, S = {a.inputs_seq:,}, growth per token between micro-batches")
        print_table(heads)
    grid = []
    if a.grid != "none":
        print()
        grid = run_grid(grid_points(a.grid == "full"), a.jobs)
        print(f"planner vs measured peak, tiny model (dim 128, 4 layers) with V and ffn varied ({a.grid} grid)")
        print_table(grid)
        worst = max(abs(r["ratio"] - 1) for r in grid)
        print(f"worst |predicted/measured - 1| = {worst:.3f}")
    write_json("memory", {"model": LLAMA3_SMALL, "components": comp, "longest": lng, "cap_gib": a.cap_gib,
                          "grid": grid, "stored_inputs": inputs, "head_groups": heads}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
