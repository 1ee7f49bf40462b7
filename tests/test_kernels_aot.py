"""`longtrain bench kernels`: every Triton kernel variant compiled for sm_80 and sm_90 on this
CPU-only machine (triton's own compiler and ptxas), within the targets' shared-memory limits
with 0 spills; the check fails when a limit is exceeded; bad arguments are one line, exit 2.
Also the run-time autotune pruning, with a stand-in for the GPU compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import pytest

from helpers import REPO, cli_env

pytest.importorskip("triton")

LIGHTNING = {"_state_fwd", "_out_fwd", "_state_bwd", "_dq_bwd", "_dk_bwd", "_dv_bwd"}
BACKWARD = {"_state_bwd", "_dq_bwd", "_dk_bwd", "_dv_bwd"}


def _bench(tmp_path, *args: str, prelude: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    """Run the bench in a fresh process (no TRITON_INTERPRET, a private triton cache)."""
    out = tmp_path / "kernels.json"
    code = (f"{prelude}\nfrom longtrain.bench.kernels import main\n"
            f"raise SystemExit(main({list(args) + ['--out', str(out)]!r}))")
    env = cli_env(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    return r, (json.loads(out.read_text()) if out.exists() else {})


def test_every_variant_fits_sm80_and_sm90_at_head_dim_128(tmp_path):
    """The acceptance table: lightning (forward, backward, state kernels; fp32 and bf16; with and
    without documents; every autotune config) at head_dim 128 and the Mesa kernels, for
    cuda:80 (163 KiB shared per block) and cuda:90 (227 KiB): all within limits, 0 spills."""
    t0 = time.perf_counter()
    r, res = _bench(tmp_path, "--target", "cuda:80,cuda:90", "--head-dims", "128",
                    "--dtypes", "float32,bfloat16")
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    rows = res["rows"]
    for target, limit in (("cuda:80", 163), ("cuda:90", 227)):
        assert f"target {target}: {limit} KiB shared memory per block" in r.stdout
        light = [x for x in rows if x["target"] == target and x["family"] == "lightning"]
        # 6 kernels x 2 dtypes x (documents or not) x 2 autotune configs
        assert len(light) == 6 * 2 * 2 * 2
        assert {x["kernel"] for x in light} == LIGHTNING
        for x in light:
            assert x["head_dim"] == 128 and x["status"] == "ok", x
            assert x["spills"] == 0 and 0 < x["regs"] <= 255, x
            assert x["shared_kib"] <= limit == x["limit_kib"], x
        bwd = [x for x in light if x["kernel"] in BACKWARD]
        assert {(x["dtype"], x["num_warps"]) for x in bwd} == {
            (d, w) for d in ("float32", "bfloat16") for w in (4, 8)}
        mesa = [x for x in rows if x["target"] == target and x["family"] == "mesa"]
        assert len(mesa) == 2 * 4 and all(x["status"] == "ok" and x["spills"] == 0 for x in mesa)
    assert "0 failed" in r.stdout
    # 45-76 s on the 2-core CI box (load 5-7); the bound catches a regression such as an exact
    # fp32 ("ieee") kernel, which took minutes per compile, with room for a loaded machine
    assert wall < 180, f"AOT table took {wall:.0f}s"


def test_a_variant_over_the_limit_fails(tmp_path):
    """The check can fail: with sm_90's shared-memory limit set to 1 KiB, the dequantize kernel
    (4-8 KiB) is reported as FAIL and the bench exits 1."""
    prelude = ("import longtrain.kernels.lightning.triton as lt\n"
               "lt.TARGET_LIMITS[90] = lt.Limits(1024)")
    r, res = _bench(tmp_path, "--target", "cuda:90", "--families", "mesa", "--dtypes",
                    "bfloat16", "--jobs", "1", prelude=prelude)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    failed = [x for x in res["rows"] if x["status"] == "FAIL"]
    assert [x["kernel"] for x in failed] == ["dequant_kernel"]
    assert "shared" in failed[0]["problems"] and "> 1 KiB" in failed[0]["problems"]


@pytest.mark.parametrize("args,needle", [
    (["--target", "sm_90"], "--target must look like cuda:90"),
    (["--target", "cuda:75"], "no per-block limits known for cuda:75"),
    (["--head-dims", "0"], "--head-dims must be integers in 1..1024"),
    (["--dtypes", "int8"], "--dtypes must be from"),
    (["--block-size", "48"], "--block-size must be a power of two"),
    (["--families", "flash"], "--families must be from"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, args, needle):
    from longtrain.bench.kernels import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtrain: error:") and needle in err[0], err


def test_cli_lists_the_bench():
    from longtrain.launcher.cli import BENCHES

    assert "kernels" in BENCHES


# ------------------------------------------------------------------ run-time autotune pruning


def _import_compiled_module():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process imported triton for the interpreter")
    from longtrain.kernels.lightning import triton as lt

    if lt.INTERPRET:
        pytest.skip("this process imported triton for the interpreter")
    return lt


class _FakeJit:
    """Stands in for a JITFunction: warmup returns a 'compiled kernel' per num_warps."""
    __name__ = "_fake"

    def __init__(self, usage):
        self.usage, self.calls = usage, []

    def warmup(self, *, grid, **kw):
        self.calls.append(kw)
        if self.usage[kw["num_warps"]] is None:
            raise RuntimeError("an API this triton does not have")
        shared, regs, spills = self.usage[kw["num_warps"]]
        return SimpleNamespace(metadata=SimpleNamespace(shared=shared), n_regs=regs,
                               n_spills=spills, _init_handles=lambda: None)


@pytest.mark.parametrize("usage,kept,warns,listed", [
    ({4: (40 << 10, 200, 0), 8: (60 << 10, 150, 0)}, [4, 8], False, 0),     # both fit
    ({4: (40 << 10, 255, 96), 8: (60 << 10, 150, 0)}, [8], False, 1),       # 4 warps spills
    ({4: (40 << 10, 200, 0), 8: (300 << 10, 150, 0)}, [4], False, 1),       # 8 warps: shared
    ({4: (40 << 10, 255, 96), 8: (300 << 10, 150, 0)}, [4], True, 2),       # spills beat no launch
    ({4: (300 << 10, 200, 0), 8: (300 << 10, 150, 0)}, [4], True, 2),       # none launches: first
    ({4: None, 8: (300 << 10, 150, 0)}, [4], False, 2),                     # check failed: kept
])
def test_autotune_keeps_only_configs_that_fit(monkeypatch, usage, kept, warns, listed):
    triton = pytest.importorskip("triton")
    lt = _import_compiled_module()
    monkeypatch.setattr(lt, "_current_limits", lambda: lt.TARGET_LIMITS[90])
    monkeypatch.setattr(lt, "PRUNED", [])
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 1), (8, 2))]
    jit = _FakeJit(usage)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = lt._prune_configs(jit, configs, {"Q": "q"}, Dk=128)
    assert [c.num_warps for c in got] == kept
    assert bool(w) == warns
    assert len(lt.PRUNED) == listed
    assert all(p["kernel"] == "_fake" and p["problems"] for p in lt.PRUNED)
    # every config was compiled once with the caller's arguments and the config's options
    assert [(c["Q"], c["Dk"], c["num_warps"]) for c in jit.calls] == [("q", 128, 4), ("q", 128, 8)]


def test_every_kernel_is_autotuned_with_the_pruning():
    lt = _import_compiled_module()
    for name, kernel in lt.KERNELS.items():
        assert [(c.num_warps, c.num_stages) for c in kernel.configs] == lt.CONFIGS[name]
        assert kernel.early_config_prune.func is lt._prune_configs
        assert kernel.early_config_prune.args[0] is kernel.fn
