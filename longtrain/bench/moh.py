"""`longtrain bench moh`: MoH attention layer vs dense attention layer, forward + backward.

Each row, at a model size and sequence length (batch 1, fp32 on CPU, bf16 on
CUDA, forward + backward), times
  core   the attention computation alone on the same q/k/v: dense GQA attention
         (LocalAttention) vs MoH with 75% of heads active computing only the used
         (token, head) pairs (routing fixed beforehand);
  layer  the whole attention layer (projections, router, attention): dense vs MoH
         sparse vs MoH "masked" (every head computed then masked, as the
         reference code does).
Variants run in rotation; each reports its median wall time and process CPU
time. On a shared machine use --threads 1 and read the CPU-time ratios: other
jobs inflate wall time, not the CPU time this process spends.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from longtrain.bench.common import print_table, write_json
from longtrain.models.config import MoHConfig, model_config
from longtrain.models.layers import rope_cos_sin, rope_inv_freq
from longtrain.models.llama import Attention
from longtrain.models.moh import MoHAttention
from longtrain.models.moh_sparse import auto_block_size
from longtrain.models.ops import LocalAttention
from longtrain.models.spans import Span

# 75% of heads: shared + routed = 3/4 of n_heads
MOH_75 = {4: (1, 2), 8: (2, 4), 16: (4, 8), 32: (16, 8)}


def _layers(size: str, router: str, device: torch.device, dtype: torch.dtype):
    cfg = model_config(size)
    hs, k = MOH_75[cfg.n_heads]
    mcfg = model_config(size, moh=MoHConfig(shared_heads=hs, routed_heads=k, router=router))
    torch.manual_seed(0)
    dense = Attention(cfg, 0, Span("full")).to(device, dtype)
    moh = MoHAttention(mcfg, 0, Span("full")).to(device, dtype)
    with torch.no_grad():  # same q/k/v/o weights in both
        for n in ("wq", "wk", "wv", "wo"):
            getattr(moh, n).weight.copy_(getattr(dense, n).weight)
    return cfg, dense, moh, (hs + k) / cfg.n_heads


def _step(layer, x, rope, g, cu=None):
    layer.zero_grad(set_to_none=True)
    xx = x.detach().requires_grad_(True)
    out = layer(xx, rope, LocalAttention(cu))
    out.backward(g)


def _rotate(variants: dict[str, Any], repeat: int, cuda: bool) -> dict[str, tuple[float, float]]:
    """Median (wall s, process CPU s) of each variant, run in rotation after one warm-up each."""
    for fn in variants.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            if cuda:
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {k: (med(wall[k]), med(cpu[k])) for k in variants}


def bench(sizes: list[str], seqs: list[int], routers: list[str], repeat: int,
          device: torch.device, dtype: torch.dtype, doc_len: int = 0) -> list[dict[str, Any]]:
    rows = []
    cuda = device.type == "cuda"
    for size in sizes:
        for S in seqs:
            for router in routers:
                cfg, dense, moh, frac = _layers(size, router, device, dtype)
                x = torch.randn(1, S, cfg.dim, device=device, dtype=dtype)
                g = torch.randn(1, S, cfg.dim, device=device, dtype=dtype)
                rope = rope_cos_sin(torch.arange(S, device=device),
                                    rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device))
                # attention core alone: the same q/k/v, routing fixed from one forward
                H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
                q = torch.randn(1, S, H, D, device=device, dtype=dtype, requires_grad=True)
                k = torch.randn(1, S, Hkv, D, device=device, dtype=dtype, requires_grad=True)
                v = torch.randn(1, S, Hkv, D, device=device, dtype=dtype, requires_grad=True)
                go = torch.randn(1, S, H, D, device=device, dtype=dtype)
                with torch.no_grad():
                    gates, sel = moh.route(x, q)
                cu = torch.tensor(list(range(0, S, doc_len)) + [S], device=device) if doc_len else None
                ops = LocalAttention(cu)

                def core_dense():
                    q.grad = k.grad = v.grad = None
                    ops.softmax(q, k, v).backward(go)

                def core_moh():
                    q.grad = k.grad = v.grad = None
                    moh._sparse_attention(q, k, v, gates, sel, ops).backward(go)

                def layer_dense():
                    _step(dense, x, rope, g, cu)

                def layer_sparse():
                    moh.sparse, moh.sparse_min_seq = True, 0
                    _step(moh, x, rope, g, cu)

                def layer_masked():
                    moh.sparse = False
                    _step(moh, x, rope, g, cu)

                t = _rotate({"core_dense": core_dense, "core_moh": core_moh, "layer_dense": layer_dense,
                             "layer_moh": layer_sparse, "layer_moh_masked": layer_masked}, repeat, cuda)
                usage = moh.last_head_usage[moh.shared_heads:]
                row: dict[str, Any] = {"size": size, "seq": S, "router": router, "heads_used": frac,
                                       "doc_len": doc_len or None,
                                       "block": moh.block_size or (min(512, auto_block_size(S)) if not doc_len
                                                                   else auto_block_size(S))}
                for name, (w, c) in t.items():
                    row[f"{name}_s"] = w
                    row[f"{name}_cpu_s"] = c
                for kind in ("wall", "cpu"):
                    i = 0 if kind == "wall" else 1
                    row[f"core_ratio_{kind}"] = t["core_moh"][i] / t["core_dense"][i]
                    row[f"layer_ratio_{kind}"] = t["layer_moh"][i] / t["layer_dense"][i]
                    row[f"masked_ratio_{kind}"] = t["layer_moh_masked"][i] / t["layer_dense"][i]
                row["usage_max_over_mean"] = float(usage.max() / usage.mean())
                rows.append(row)
    return rows


SHOW = ["size", "seq", "router", "doc_len", "block", "core_dense_cpu_s", "core_moh_cpu_s", "core_ratio_cpu", "core_ratio_wall",
        "layer_dense_cpu_s", "layer_moh_cpu_s", "layer_ratio_cpu", "layer_ratio_wall", "masked_ratio_cpu",
        "usage_max_over_mean"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench moh", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,small", help="model presets (comma-separated)")
    ap.add_argument("--seqs", default="2048,4096,8192", help="sequence lengths (comma-separated)")
    ap.add_argument("--routers", default="learned,query_norm")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--doc-len", type=int, default=0, help="pack documents of this many tokens (0: one document)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/moh.json)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = bench(a.sizes.split(","), [int(s) for s in a.seqs.split(",")], a.routers.split(","),
                 a.repeat, device, dtype, a.doc_len)
    print_table(rows, SHOW)
    write_json("moh", {"rows": rows, "dtype": str(dtype), "repeat": a.repeat}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
