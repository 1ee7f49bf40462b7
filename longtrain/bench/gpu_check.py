"""`make gpu-check` / `longtrain bench gpu-check`: everything a CPU suite cannot show, on one CUDA GPU.

Sections (each row: what, measured value, limit, ok/FAIL/skip):
  a  Triton kernels compiled (not interpreted), fp32 and bf16, against fp64 references:
     lightning forward/backward with initial state, final state and documents at head_dim 64
     and 128 (and configs the autotune pruning dropped); Mesa
     quantize/dequantize against the torch twin; registers and spills per kernel.
  b  attention_block on every CUDA backend (torch SDPA flash / memory-efficient internals,
     FlexAttention, flash-attn when installed) against the math reference, every block kind,
     forward (out, lse) and backward for a merged lse; peak memory of a 32k-token block.
  c  ring and TokenRing schedules, W = 2/3/4 ranks simulated as threads on the GPU, causal /
     window / documents, forward and backward, against full-sequence math attention.
  d  the NCCL path at world 1: P2P self exchange, all_reduce, all_to_all, sub-groups.
  e  bf16 training of a ~100M-parameter model at 8k tokens, each arm a fresh `longtrain train`:
     eager, Mesa, compiled, packed documents, window spans, activation checkpointing, DDP, async
     save, and a resume from that save (must repeat its losses); tokens/s, MFU (causal attention
     counted once), peak memory per arm; host syncs that document masks add (torch's CUDA
     sync-debug mode and scalar reads, bench/syncs.py).
  f  lightning vs softmax attention time at 8k and 32k tokens, head_dim 64 and 128 (ours vs torch SDPA).
Writes bench-results/gpu-check.json; exit status 1 when a check fails. Without CUDA it says
what it skipped and exits 0 (`--cpu` runs sections c and e on CPU as a dry run, as CI does).
`--multi` runs the check for >= 2 GPUs instead (bench/multi_check.py, `make gpu-check-multi`).
Installs nothing and imports only torch, triton, numpy (+ tensorboard for section e).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from longtrain.bench.gpu_table import ROWS, T0, add_row, check_close, cuda_sync, cuda_time, print_table, rel_err  # noqa: F401 (ROWS: tests)
from longtrain.bench.gpu_train import section_e


# ----------------------------------------------------------------------------- a: Triton kernels


def _kernel_resources() -> list[dict[str, Any]]:
    """Registers / spills / shared memory of every compiled Triton kernel of ours (best effort)."""
    out = []
    mods = []
    try:
        from longtrain.kernels.lightning import triton as lt
        mods.append(("lightning", lt))
    except Exception:  # noqa: BLE001
        pass
    try:
        from longtrain.kernels.mesa import triton as mt
        mods.append(("mesa", mt))
    except Exception:  # noqa: BLE001
        pass
    seen = set()
    for label, mod in mods:
        fns = [getattr(mod, n) for n in dir(mod)]
        if label == "mesa" and mod._kernels.cache_info().currsize:
            _, qk, dk = mod._kernels()[:3]
            fns += [qk, dk]
        for fn in fns:
            jit = getattr(fn, "fn", fn)  # Autotuner -> JITFunction
            caches = getattr(jit, "device_caches", None)
            if not isinstance(caches, dict) or id(jit) in seen:
                continue
            seen.add(id(jit))
            for dev_cache in caches.values():
                kc = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for kern in (kc.values() if isinstance(kc, dict) else []):
                    meta = getattr(kern, "metadata", None)
                    out.append({"kernel": f"{label}.{getattr(jit, '__name__', '?')}",
                                "n_regs": getattr(kern, "n_regs", None), "n_spills": getattr(kern, "n_spills", None),
                                "shared_bytes": getattr(meta, "shared", None),
                                "num_warps": getattr(meta, "num_warps", None),
                                "num_stages": getattr(meta, "num_stages", None)})
    return out


def section_a(dev: torch.device) -> None:
    from longtrain.kernels.lightning import lightning_attention, resolve_backend, tnl_decay
    from longtrain.kernels.lightning import triton as lt
    from longtrain.kernels.lightning.naive import naive_lightning_attention

    torch.manual_seed(0)
    cases = [("docs+state S=1000", 1000, [0, 300, 301, 777, 1000], True),
             ("plain S=2048", 2048, None, False)]
    B, H = 2, 4
    decay = tnl_decay(H, 1, 4).to(dev)
    # head_dim 128 (tnl-lightning-1b): the tiled backward; `auto` must pick Triton there
    auto = resolve_backend("auto", dev, 128, 128)
    add_row("a", "lightning backend='auto' at head_dim 128", auto, "triton", ok=auto == "triton")
    for D, (name, S, cu, state) in ((D, c) for D in (64, 128) for c in cases):
        name = f"D={D} {name}"
        base = [torch.randn(B, S, H, D, device=dev) * 0.5 for _ in range(3)]
        s0 = torch.randn(B, H, D, D, device=dev) * 0.5 if state else None
        g_out = torch.randn(B, S, H, D, device=dev)
        g_st = torch.randn(B, H, D, D, device=dev)
        cu_t = torch.tensor(cu, device=dev) if cu else None
        for dt, tol_o, tol_g in ((torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 3e-2)):
            xs = [t.to(dt).requires_grad_() for t in base]
            st = s0.clone().requires_grad_() if state else None
            t0 = time.perf_counter()
            out, fin = lightning_attention(*xs, decay, initial_state=st, return_state=True, cu_seqlens=cu_t,
                                           backend="triton")
            loss = (out.float() * g_out).sum() + (fin * g_st).sum()
            grads = torch.autograd.grad(loss, xs + ([st] if state else []))
            cuda_sync()
            first = time.perf_counter() - t0
            rx = [t.detach().to(dt).double().requires_grad_() for t in base]
            rst = s0.double().requires_grad_() if state else None
            rout, rfin = naive_lightning_attention(*rx, decay.double(), initial_state=rst, return_state=True,
                                                   cu_seqlens=cu_t)
            rloss = (rout * g_out.double()).sum() + (rfin * g_st.double()).sum()
            rgrads = torch.autograd.grad(rloss, rx + ([rst] if state else []))
            tag = f"lightning {name} {str(dt)[6:]}"
            check_close("a", f"{tag} out", out, rout, tol_o)
            check_close("a", f"{tag} final state", fin, rfin, tol_o)
            for gname, g, r in zip(("dq", "dk", "dv", "dstate"), grads, rgrads):
                check_close("a", f"{tag} {gname}", g, r, tol_g)
            add_row("a", f"{tag} first call (compile + autotune)", first, unit="s")
    # configs the first call's autotune pruning dropped on this GPU (`bench kernels` predicts none)
    for p in lt.PRUNED:
        add_row("a", f"autotune pruned lightning.{p['kernel']} {p['config']}", "pruned",
                note="; ".join(p["problems"]))
    # Mesa: Triton vs its torch twin, same noise; head-wise groups of [B, S, H, D]
    from longtrain.kernels.mesa import dequantize, quantize
    from longtrain.kernels.mesa.quant import unpack_bits

    for dt in (torch.float32, torch.bfloat16):
        x = (torch.randn(4, 2048, 8, 64, device=dev) * torch.linspace(0.1, 4, 8, device=dev)[:, None]).to(dt)
        noise = torch.rand(x.shape, device=dev)
        for stochastic in (False, True):
            kw = dict(dim=2, stochastic=stochastic, noise=noise if stochastic else None)
            qt = quantize(x, 8, backend="triton", **kw)
            qr = quantize(x, 8, backend="torch", **kw)
            ct, cr = unpack_bits(qt.codes, 8, qt.numel).int(), unpack_bits(qr.codes, 8, qr.numel).int()
            diff = (ct - cr).abs()
            frac = (diff > 0).float().mean().item()
            tag = f"mesa quantize {str(dt)[6:]} {'stochastic' if stochastic else 'nearest'}"
            add_row("a", f"{tag}: codes differing (FMA at rounding boundaries)", frac, 1e-4, "fraction",
                    ok=frac <= 1e-4 and int(diff.max()) <= 1, note=f"max diff {int(diff.max())} code")
            yt = dequantize(qt, backend="triton")
            yr = dequantize(qt, backend="torch")
            check_close("a", f"mesa dequantize {str(dt)[6:]} vs torch twin", yt, yr, 1e-6 if dt == torch.float32 else 4e-3)
    res = _kernel_resources()
    for r in res:
        add_row("a", f"{r['kernel']} warps={r['num_warps']} stages={r['num_stages']}", r["n_regs"], unit="regs",
                ok=(r["n_spills"] or 0) == 0, note=f"spills {r['n_spills']}, shared {r['shared_bytes']} B")
    if not res:
        add_row("a", "kernel registers/spills", "n/a", note="this triton exposes no compiled-kernel metadata")


# ----------------------------------------------------------------------------- b: attention_block backends


def _force(name: str | None):
    class _Ctx:
        def __enter__(self):
            self.old = os.environ.get("LONGTRAIN_ATTENTION_BACKEND")
            if name is None:
                os.environ.pop("LONGTRAIN_ATTENTION_BACKEND", None)
            else:
                os.environ["LONGTRAIN_ATTENTION_BACKEND"] = name

        def __exit__(self, *a):
            if self.old is None:
                os.environ.pop("LONGTRAIN_ATTENTION_BACKEND", None)
            else:
                os.environ["LONGTRAIN_ATTENTION_BACKEND"] = self.old
    return _Ctx()


def section_b(dev: torch.device) -> None:
    from longtrain.kernels.attention import backend_for, block_backward, block_forward, flash_interface, make_spec

    torch.manual_seed(0)
    B, HQ, HKV, D = 1, 8, 2, 128
    blocks = [  # name, sq, sk, causal, window, q_offset, k_offset, bounds
        ("full", 1024, 1024, False, None, 0, 0, None),
        ("causal", 1024, 1024, True, None, 0, 0, None),
        ("causal at offset", 1024, 1024, True, None, 512, 0, None),
        ("causal bottom-right", 512, 1024, True, None, 512, 0, None),
        ("window 256", 1024, 1024, True, 256, 0, 0, None),
        ("window 300 at offset", 1024, 1024, True, 300, 700, 0, None),
        ("documents", 1024, 1024, True, None, 0, 0, (0, 100, 101, 600)),
        ("documents+window", 1024, 1024, True, 200, 0, 0, (0, 100, 101, 600)),
        ("non-causal window 200", 1024, 1024, False, 200, 0, 0, None),
    ]
    flash = flash_interface() is not None
    add_row("b", "flash-attn installed", str(flash), note="" if flash else "torch's fused kernels used instead")
    for dt in (torch.bfloat16, torch.float32):
        tol_o, tol_g = (2e-2, 5e-2) if dt == torch.bfloat16 else (2e-3, 5e-3)
        for name, sq, sk, causal, window, qo, ko, bounds in blocks:
            q = torch.randn(B, sq, HQ, D, device=dev).to(dt)
            k = torch.randn(B, sk, HKV, D, device=dev).to(dt)
            v = torch.randn(B, sk, HKV, D, device=dev).to(dt)
            spec = make_spec(q, k, causal=causal, softmax_scale=None, window=window, q_offset=qo, k_offset=ko,
                             bounds=bounds)
            with _force(None):
                auto = backend_for(q, spec)
            cands = [auto]
            if spec.kind in ("full", "causal"):
                cands += [c for c in ("sdpa_flash", "sdpa_efficient", "flex") if c != auto
                          and not (c == "sdpa_flash" and dt == torch.float32)]
            with _force("math"):
                ro, rl = block_forward(q, k, v, spec)
            # a merged row state as in a ring: other blocks added mass, some rows saw nothing at all
            extra = torch.randn_like(rl)
            final_lse = torch.logaddexp(rl, extra)
            final_out = torch.randn(B, sq, HQ, D, device=dev).to(dt)
            dout = torch.randn(B, sq, HQ, D, device=dev).to(dt)
            with _force("math"):
                rg = block_backward(dout, q, k, v, final_out, final_lse, spec)
            for be in cands:
                tag = f"{name} {str(dt)[6:]} [{spec.kind}] {be}{' (auto)' if be == auto else ''}"
                try:
                    with _force(be):
                        o, l = block_forward(q, k, v, spec)
                        g = block_backward(dout, q, k, v, final_out, final_lse, spec)
                    cuda_sync()
                except Exception as e:  # noqa: BLE001
                    add_row("b", tag, "error", ok=False, note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                eo, el = rel_err(o, ro), rel_err(l, rl)
                eg = max(rel_err(a, b) for a, b in zip(g, rg))
                ok = eo <= tol_o and el <= tol_o and eg <= tol_g
                add_row("b", tag, max(eo, el), tol_o, "rel err out/lse", ok=ok,
                        note=f"grads {eg:.2g} (limit {tol_g:g})")
    # a 32k-token block never materialises S x S scores (math would need 32 GiB of fp32 scores a layer)
    S, H = 32768, 8
    for name, bounds, window in (("causal", None, None), ("documents", (0, 5000, 20000), None),
                                 ("window 4096", None, 4096)):
        q, k, v = (torch.randn(1, S, H, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        spec = make_spec(q, k, causal=True, softmax_scale=None, window=window, q_offset=0, k_offset=0, bounds=bounds)
        try:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            with _force(None):
                be = backend_for(q, spec)

                def step():
                    o, l = block_forward(q, k, v, spec)
                    block_backward(o, q, k, v, o, l, spec)
                step()  # compiles, builds the block mask (cached)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t = cuda_time(step, warmup=0, repeat=3)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            add_row("b", f"32k-token {name} block bf16 fwd+bwd peak extra memory [{be}]", peak, 4.0, "GiB",
                    ok=peak <= 4.0, note=f"{t * 1e3:.1f} ms")
        except Exception as e:  # noqa: BLE001
            add_row("b", f"32k-token {name} block", "error", ok=False, note=f"{type(e).__name__}: {str(e)[:160]}")


# ----------------------------------------------------------------------------- c: simulated rings


def section_c(dev: torch.device, quick: bool = False) -> None:
    from longtrain.kernels.attention import make_spec, block_forward, block_backward
    from longtrain.parallel.simulate import simulate_ring

    torch.manual_seed(0)
    on_gpu = dev.type == "cuda"
    S = 3072 if on_gpu else 96
    B, HQ, HKV, D = 1, 8, 2, (128 if on_gpu else 16)
    dt = torch.bfloat16 if on_gpu else torch.float32
    tol_o, tol_g = (2e-2, 5e-2) if dt == torch.bfloat16 else (1e-5, 1e-4)
    q = torch.randn(B, S, HQ, D, device=dev).to(dt)
    k = torch.randn(B, S, HKV, D, device=dev).to(dt)
    v = torch.randn(B, S, HKV, D, device=dev).to(dt)
    dout = torch.randn(B, S, HQ, D, device=dev).to(dt)
    docs = [0, S // 7, S // 3, S // 3 + 1, (4 * S) // 5]
    masks = [("causal", {}), ("window", {"window": S // 5}), ("documents", {"cu_seqlens": docs})]
    refs = {}
    for mname, kw in masks:
        spec = make_spec(q, k, causal=True, softmax_scale=None, window=kw.get("window"), q_offset=0, k_offset=0,
                         bounds=tuple(kw["cu_seqlens"]) if "cu_seqlens" in kw else None)
        with _force("math"):
            o, l = block_forward(q, k, v, spec)
            refs[mname] = (o, *block_backward(dout, q, k, v, o, l, spec))
    worlds = (2, 4) if quick else (2, 3, 4)
    for impl in ("ring", "tokenring"):
        for w in worlds:
            for mname, kw in masks:
                t0 = time.perf_counter()
                try:
                    got = simulate_ring(q, k, v, dout, w, impl=impl, **kw)
                except Exception as e:  # noqa: BLE001
                    add_row("c", f"{impl} W={w} {mname}", "error", ok=False, note=f"{type(e).__name__}: {str(e)[:160]}")
                    continue
                eo = rel_err(got[0], refs[mname][0])
                eg = max(rel_err(a, b) for a, b in zip(got[1:], refs[mname][1:]))
                add_row("c", f"{impl} W={w} {mname} {str(dt)[6:]} S={S}", eo, tol_o, "rel err out",
                        ok=eo <= tol_o and eg <= tol_g,
                        note=f"grads {eg:.2g} (limit {tol_g:g}); {time.perf_counter() - t0:.1f}s")


# ----------------------------------------------------------------------------- d: NCCL at world 1


def section_d(dev: torch.device) -> None:
    import torch.distributed as dist

    from longtrain.parallel.comm import P2P, twin_group
    from longtrain.testing import free_port

    if not dist.is_nccl_available():
        add_row("d", "NCCL available", "no", ok=False)
        return
    t0 = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=dev)
    try:
        add_row("d", "init_process_group(nccl, device_id) world 1", time.perf_counter() - t0, unit="s", ok=True)
        x = torch.arange(1 << 20, device=dev, dtype=torch.float32)
        for grp_name, grp in (("WORLD", None), ("new_group([0])", dist.new_group([0])),
                              ("twin_group", twin_group(None))):
            p2p = P2P(grp)
            buf = p2p.recv(torch.empty_like(x), 0, "up", tag=3)
            p2p.send(x, 0, "kv", "up", tag=3)
            p2p.start().wait()
            cuda_sync()
            add_row("d", f"P2P self send/recv on {grp_name}", float((buf - x).abs().max()), 0.0, ok=bool(torch.equal(buf, x)))
        y = x.clone()
        dist.all_reduce(y)
        add_row("d", "all_reduce", float((y - x).abs().max()), 0.0, ok=bool(torch.equal(y, x)))
        z = torch.empty_like(x)
        dist.all_to_all_single(z, x)
        add_row("d", "all_to_all_single", float((z - x).abs().max()), 0.0, ok=bool(torch.equal(z, x)))
        nc = x[::2]  # non-contiguous: P2P.send must make it contiguous (NCCL would be silently wrong)
        p2p = P2P(None)
        buf = p2p.recv(torch.empty(nc.shape, device=dev), 0, "up", tag=4)
        p2p.send(nc, 0, "kv", "up", tag=4)
        p2p.start().wait()
        add_row("d", "P2P of a non-contiguous view", float((buf - nc).abs().max()), 0.0, ok=bool(torch.equal(buf, nc)))
    finally:
        from longtrain.parallel.comm import close_process_groups
        close_process_groups()


# ----------------------------------------------------------------------------- e: training


# ----------------------------------------------------------------------------- f: lightning vs softmax


def section_f(dev: torch.device) -> None:
    import torch.nn.functional as F

    from longtrain.kernels import attention_block, lightning_attention, tnl_decay

    H = 16
    decay = tnl_decay(H, 1, 8).to(dev)
    for D, S in ((D, S) for D in (64, 128) for S in (8192, 32768)):  # D = 128: tnl-lightning-1b
        q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16)

        def light():
            o = lightning_attention(q, k, v, decay, backend="triton")
            torch.autograd.grad(o, (q, k, v), g)

        def ours():
            o, _ = attention_block(q, k, v, causal=True)
            torch.autograd.grad(o, (q, k, v), g)

        def sdpa():
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            torch.autograd.grad(o, (q, k, v), g.transpose(1, 2))

        t = {n: cuda_time(f) for n, f in (("lightning", light), ("attention_block", ours), ("torch_sdpa", sdpa))}
        flops = 4 * S * S * H * D / 2 * 3.5  # causal fwd (2 matmuls) + bwd (5), counted once
        add_row("f", f"S={S} fwd+bwd bf16 H={H} D={D}: lightning / softmax attention_block", t["lightning"] / t["attention_block"],
                unit="x time", note=f"lightning {t['lightning'] * 1e3:.2f} ms, attention_block {t['attention_block'] * 1e3:.2f} ms "
                                 f"({flops / t['attention_block'] / 1e12:.0f} TFLOP/s), torch SDPA {t['torch_sdpa'] * 1e3:.2f} ms")
        add_row("f", f"S={S} D={D} attention_block / torch SDPA time", t["attention_block"] / t["torch_sdpa"], unit="x")


# ----------------------------------------------------------------------------- driver


SECTIONS = {"a": "Triton kernels", "b": "attention backends", "c": "simulated rings", "d": "NCCL world 1",
            "e": "training", "f": "lightning vs softmax"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench gpu-check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="abcdef", help="which sections to run (default all: abcdef)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per arm in section e (default 24 on CUDA, 4 in the CPU dry run)")
    ap.add_argument("--quick", action="store_true", help="fewer ring sizes in section c")
    ap.add_argument("--cpu", action="store_true",
                    help="dry run on CPU: section c (simulated rings) and e (every training arm, tiny model)")
    ap.add_argument("--multi", action="store_true",
                    help="the check for >= 2 GPUs instead (longtrain/bench/multi_check.py; --multi --help)")
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/gpu-check.json)")
    if argv is None:
        argv = sys.argv[1:]
    if "--multi" in argv:
        from longtrain.bench import multi_check

        return multi_check.main([a for a in argv if a != "--multi"])
    args = ap.parse_args(argv)
    from longtrain.bench.common import machine_info

    if not torch.cuda.is_available() or args.cpu:
        if not args.cpu:
            print("gpu-check: no CUDA GPU visible; skipped sections a-f (Triton compiled kernels, CUDA attention "
                  "backends, GPU rings, NCCL, GPU training, timings). `--cpu` runs the simulated rings and the "
                  "training arms on CPU as a dry run.")
            return 0
        dev = torch.device("cpu")
        plan = [s for s in args.sections if s in "ce"]
    else:
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
        plan = [s for s in args.sections if s in SECTIONS]
    info = machine_info()
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    print(f"gpu-check on {info['cuda'] or 'CPU'} | torch {info['torch']} | triton {info['triton']}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="longtrain-gpu-check-"))
    timings = {}
    errors = {}
    for s in plan:
        t0 = time.perf_counter()
        print(f"--- section {s}: {SECTIONS[s]}", flush=True)
        try:
            if s == "a":
                section_a(dev)
            elif s == "b":
                section_b(dev)
            elif s == "c":
                section_c(dev, quick=args.quick)
            elif s == "d":
                section_d(dev)
            elif s == "e":
                section_e(dev, args.steps or (4 if dev.type == "cpu" else 24), work)
            elif s == "f":
                section_f(dev)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            tb = traceback.format_exc()
            errors[s] = tb
            print(tb, flush=True)
            add_row(s, f"section {s} ({SECTIONS[s]}) crashed", "error", ok=False,
                    note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        timings[s] = time.perf_counter() - t0
    print_table()
    failed = [r for r in ROWS if r["status"] == "FAIL"]
    print(f"\ngpu-check: {len([r for r in ROWS if r['status'] == 'ok'])} ok, {len(failed)} failed, "
          f"{time.perf_counter() - T0:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    from longtrain.bench.common import write_json

    write_json("gpu-check", {"rows": ROWS, "section_seconds": timings, "errors": errors,
                             "machine_extra": info}, args.out)
    if dev.type == "cuda":
        logs = sorted(work.glob("*.log"))
        if logs and args.out:
            for lg in logs:
                (Path(args.out).parent / lg.name).write_text(lg.read_text()[-20000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
