"""`longtrain bench kernels`: compile every Triton kernel variant for a CUDA target, no GPU needed.

Triton compiles for a target it is told about (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`) on a machine without a GPU; the `ptxas` that ships with
triton reports registers and spills of the PTX. For each target this lists every variant
longtrain can dispatch:
  lightning  _state_fwd, _out_fwd, _state_bwd, _dq_bwd, _dk_bwd, _dv_bwd for each head dim
             (Dk = Dv), dtype, with and without documents, every autotune config (initial /
             final state are run-time flags of one compiled kernel)
  mesa       quantize (round-to-nearest, stochastic with given noise, stochastic with tl.rand)
             and dequantize, fp32 / bf16 / fp16
with shared memory, registers and spills against the target's per-block limits, using the
same check as the lightning autotune pruning (`resource_problems`). Exit 1 when a variant
exceeds a limit or spills; 2 on bad arguments. Table on stdout, JSON in bench-results/kernels.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

TARGETS_DEFAULT = "cuda:80,cuda:90"
DTYPES = ("float32", "bfloat16", "float16")


def _error(msg: str) -> int:
    print(f"longtrain: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _mesa_variants(dtypes: list[str]) -> list[dict[str, Any]]:
    """Quantize / dequantize as mesa/triton.py launches them (LAUNCH_NUM_WARPS warps, the default 3 stages)."""
    from longtrain.kernels.mesa.triton import LAUNCH_BLOCK, LAUNCH_NUM_WARPS

    tt = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}
    out = []
    for dt in dtypes:
        for mode, stoch, noise in (("nearest", False, False), ("stochastic, noise", True, True),
                                   ("stochastic, tl.rand", True, False)):
            sig = {"x_ptr": tt[dt], "out_ptr": "*u8", "shift_ptr": "*fp32", "inv_ptr": "*fp32",
                   # without noise the kernel gets x as a placeholder pointer
                   "noise_ptr": "*fp32" if noise else tt[dt], "n": "i32", "inner": "i32",
                   "G": "i32", "seed": "i32", "levels": "fp32", "STOCHASTIC": "constexpr",
                   "HAS_NOISE": "constexpr", "BLOCK": "constexpr"}
            out.append({"family": "mesa", "kernel": "quant_kernel", "variant": mode, "dtype": dt,
                        "head_dim": None, "docs": None, "signature": sig,
                        "constexprs": {"STOCHASTIC": stoch, "HAS_NOISE": noise, "BLOCK": LAUNCH_BLOCK},
                        "num_warps": LAUNCH_NUM_WARPS, "num_stages": 3})
        # bf16 output is written as uint16 (hand-rounded); other dtypes directly
        sig = {"q_ptr": "*u8", "out_ptr": "*u16" if dt == "bfloat16" else tt[dt],
               "shift_ptr": "*fp32", "step_ptr": "*fp32", "n": "i32", "inner": "i32", "G": "i32",
               "OUT_BF16": "constexpr", "BLOCK": "constexpr"}
        out.append({"family": "mesa", "kernel": "dequant_kernel", "variant": "", "dtype": dt,
                    "head_dim": None, "docs": None, "signature": sig,
                    "constexprs": {"OUT_BF16": dt == "bfloat16", "BLOCK": LAUNCH_BLOCK},
                    "num_warps": LAUNCH_NUM_WARPS, "num_stages": 3})
    return out


def _lightning_variants(head_dims: list[int], dtypes: list[str], block: int) -> list[dict[str, Any]]:
    import torch

    from longtrain.kernels.lightning import triton as lt

    out = []
    for v in lt.aot_variants(tuple(head_dims), tuple(getattr(torch, d) for d in dtypes), block):
        v = dict(v)
        v.pop("fn")
        out.append({"family": "lightning", "variant": "documents" if v["docs"] else "", **v})
    return out


def _jit_fn(family: str, kernel: str):
    if family == "mesa":
        from longtrain.kernels.mesa import triton as mt

        _, quant, dequant = mt._kernels()
        return {"quant_kernel": quant, "dequant_kernel": dequant}[kernel]
    from longtrain.kernels.lightning import triton as lt

    k = lt.KERNELS[kernel]
    return getattr(k, "fn", k)


_USAGE = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores")


def _parse_usage(log: str) -> tuple[int, int] | None:
    regs, spills = _USAGE.search(log), _SPILLS.search(log)
    return (int(regs.group(1)), int(spills.group(1))) if regs and spills else None


def _ptxas_usage(ptx: str, arch: int, fp_fusion: bool) -> tuple[int, int]:
    """(registers, spill-store bytes) of the PTX, running triton's ptxas with triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               *([] if fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    usage = _parse_usage(r.stderr)
    if usage is None:
        raise RuntimeError(f"no register count in the ptxas log: {r.stderr[-300:]}")
    return usage


def _compile(job: tuple[int, dict[str, Any]]) -> dict[str, Any]:
    """Compile one variant for one target (runs in a worker process)."""
    arch, v = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longtrain.kernels.lightning.triton import TARGET_LIMITS, resource_problems

    fn = _jit_fn(v["family"], v["kernel"])
    sig = v["signature"]
    # the JIT marks 16-byte aligned pointers (every fresh torch allocation is)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*")}
    row = {k: v[k] for k in ("family", "kernel", "variant", "head_dim", "dtype", "num_warps",
                             "num_stages")}
    row["target"] = f"cuda:{arch}"
    limits = TARGET_LIMITS[arch]
    row["limit_kib"] = limits.shared / 1024
    t0 = time.perf_counter()
    try:
        # triton runs ptxas -v for the cubin: print its log (captured here) instead of a second
        # ptxas run; a kernel from triton's cache has no log, then run ptxas on its PTX
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, v["constexprs"], attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": v["num_warps"],
                                        "num_stages": v["num_stages"]})
        usage = _parse_usage(log.getvalue())
        regs, spills = usage or _ptxas_usage(k.asm["ptx"], arch, k.metadata.enable_fp_fusion)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a failed row
        row.update(shared_kib=None, regs=None, spills=None, status="FAIL",
                   problems=f"compile: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                   compile_s=time.perf_counter() - t0)
        return row
    problems = resource_problems(k.metadata.shared, regs, spills, v["num_warps"], limits)
    row.update(shared_kib=k.metadata.shared / 1024, regs=regs, spills=spills,
               status="FAIL" if problems else "ok", problems="; ".join(problems),
               compile_s=time.perf_counter() - t0)
    return row


def _ptxas_release(banner: str) -> str:
    m = re.search(r"V(\d+\.\d+\.\d+)", banner)
    return m.group(1) if m else banner.strip().splitlines()[-1]


def _parse_targets(text: str) -> list[int]:
    from longtrain.kernels.lightning.triton import TARGET_LIMITS

    archs = []
    for t in (x.strip() for x in text.split(",") if x.strip()):
        m = re.fullmatch(r"cuda:(\d+)", t)
        if not m:
            raise ValueError(f"--target must look like cuda:90 (comma-separated), got {t!r}")
        arch = int(m.group(1))
        if arch not in TARGET_LIMITS:
            raise ValueError(f"no per-block limits known for {t}; known: "
                             + ", ".join(f"cuda:{a}" for a in TARGET_LIMITS))
        archs.append(arch)
    if not archs:
        raise ValueError("--target is empty")
    return archs


def _parse_ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals or any(x < 1 or x > 1024 for x in vals):
        raise ValueError(f"{name} must be integers in 1..1024, got {text!r}")
    return vals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtrain bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=TARGETS_DEFAULT,
                   help=f"comma-separated CUDA targets cuda:CC (default {TARGETS_DEFAULT}; "
                        "also cuda:86, 87, 89, 100, 120)")
    p.add_argument("--head-dims", default="64,128", help="lightning head dims (Dk = Dv)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help=f"input dtypes, from {', '.join(DTYPES)}")
    p.add_argument("--block-size", type=int, default=None,
                   help="lightning block size C (default: the dispatch's, 64)")
    p.add_argument("--families", default="lightning,mesa", help="kernel families to compile")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="compiles at once (processes)")
    p.add_argument("--quiet", action="store_true", help="print only failing rows and the summary")
    p.add_argument("--out", default=None, help="JSON path (default bench-results/kernels.json)")
    return p


def _check_args(a: argparse.Namespace) -> tuple[list[int], list[int], list[str], list[str]]:
    """(targets, head dims, dtypes, families) of the parsed arguments; ValueError naming a bad one."""
    archs = _parse_targets(a.target)
    head_dims = _parse_ints(a.head_dims, "--head-dims")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        raise ValueError(f"--dtypes must be from {', '.join(DTYPES)}, got {a.dtypes!r}")
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    if not families or any(f not in ("lightning", "mesa") for f in families):
        raise ValueError(f"--families must be from lightning, mesa; got {a.families!r}")
    if a.block_size is not None and (a.block_size < 16 or a.block_size & (a.block_size - 1)):
        raise ValueError(f"--block-size must be a power of two >= 16, got {a.block_size}")
    if a.jobs < 1:
        raise ValueError("--jobs must be >= 1")
    return archs, head_dims, dtypes, families


def _backend_problem(triton, archs: list[int]) -> str | None:
    """Why triton cannot compile for one of `archs`, else None (once here, not in every worker:
    ptxas --version and the backend hash)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    for arch in archs:
        try:
            make_backend(GPUTarget("cuda", arch, 32)).hash()
        except Exception as e:  # noqa: BLE001
            return f"triton {triton.__version__} cannot compile for cuda:{arch}: {e}"
    return None


def _compile_all(jobs: list[tuple[int, dict[str, Any]]], n_jobs: int) -> list[dict[str, Any]]:
    if n_jobs == 1:
        return [_compile(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("fork")) as ex:
        return list(ex.map(_compile, jobs, chunksize=4))


def _print_targets(triton, rows: list[dict[str, Any]], archs: list[int], block: int, quiet: bool) -> None:
    """One table per target: its limits, then every variant (only the failing ones when quiet)."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    from longtrain.bench.common import print_table
    from longtrain.kernels.lightning import triton as lt

    cols = ["target", "kernel", "variant", "head_dim", "dtype", "num_warps", "num_stages",
            "shared_kib", "limit_kib", "regs", "spills", "status", "problems"]
    for arch in archs:
        lim = lt.TARGET_LIMITS[arch]
        print(f"\ntarget cuda:{arch}: {lim.shared / 1024:.0f} KiB shared memory per block, "
              f"{lim.regs_per_block} registers per block, {lim.regs_per_thread} per thread "
              f"(triton {triton.__version__}, ptxas {_ptxas_release(get_ptxas_version(arch))}, "
              f"block C = {block})")
        show = [r for r in rows if r["target"] == f"cuda:{arch}"
                and (not quiet or r["status"] != "ok")]
        print_table([{c: ("" if r[c] is None else r[c]) for c in cols} for r in show], cols)


def _summary(rows: list[dict[str, Any]], archs: list[int]) -> list[dict[str, Any]]:
    """Per target and kernel: variants, how many passed, and the max shared memory, registers, spills."""
    from longtrain.kernels.lightning import triton as lt

    summary = []
    for arch in archs:
        for fam_kernel in dict.fromkeys((r["family"], r["kernel"]) for r in rows):
            rs = [r for r in rows if r["target"] == f"cuda:{arch}"
                  and (r["family"], r["kernel"]) == fam_kernel]
            done = [r for r in rs if r["regs"] is not None]
            summary.append({
                "target": f"cuda:{arch}", "kernel": f"{fam_kernel[0]}.{fam_kernel[1]}",
                "variants": len(rs), "ok": sum(r["status"] == "ok" for r in rs),
                "shared_kib_max": max((r["shared_kib"] for r in done), default=None),
                "limit_kib": lt.TARGET_LIMITS[arch].shared / 1024,
                "regs_max": max((r["regs"] for r in done), default=None),
                "spills_max": max((r["spills"] for r in done), default=None)})
    return summary


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        archs, head_dims, dtypes, families = _check_args(a)
    except ValueError as e:
        return _error(str(e))
    try:
        import triton
    except ImportError:
        return _error("triton is not installed (pip install triton)")
    os.environ.pop("TRITON_INTERPRET", None)   # compile, do not interpret
    from longtrain.bench.common import print_table, write_json
    from longtrain.kernels.lightning import triton as lt
    from longtrain.kernels.lightning.chunk import DEFAULT_BLOCK

    if lt.INTERPRET:
        return _error("TRITON_INTERPRET=1 was set when triton was imported; run without it")
    block = a.block_size or DEFAULT_BLOCK
    variants = []
    if "lightning" in families:
        variants += _lightning_variants(head_dims, dtypes, block)
    if "mesa" in families:
        variants += _mesa_variants(dtypes)
    jobs = [(arch, v) for arch in archs for v in variants]
    t0 = time.perf_counter()
    problem = _backend_problem(triton, archs)
    if problem is not None:
        return _error(problem)
    rows = _compile_all(jobs, a.jobs)
    wall = time.perf_counter() - t0
    _print_targets(triton, rows, archs, block, a.quiet)
    summary = _summary(rows, archs)
    print("\nsummary (max over variants)")
    print_table(summary)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} variants within limits with 0 spills; "
          f"{len(failed)} failed; {wall:.0f}s for {len(rows)} compiles with {a.jobs} job(s)")
    write_json("kernels", {"config": {"targets": [f"cuda:{x}" for x in archs],
                                      "head_dims": head_dims, "dtypes": dtypes, "block": block,
                                      "families": families, "triton": triton.__version__,
                                      "jobs": a.jobs, "seconds": wall},
                           "limits": {f"cuda:{x}": vars(lt.TARGET_LIMITS[x]) for x in archs},
                           "rows": rows, "summary": summary}, a.out)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
