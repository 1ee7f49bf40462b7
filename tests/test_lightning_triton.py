"""Lightning attention, Triton path, run by the Triton interpreter on CPU.

TRITON_INTERPRET must be set before triton is imported, and another test module
may already have imported it in this pytest process: so the real tests run in a
fresh `python -m pytest` subprocess of this same file, with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

INNER = os.environ.get("LONGTRAIN_TRITON_INNER") == "1"

if not INNER:
    def test_triton_kernels_under_interpreter():
        env = dict(os.environ, TRITON_INTERPRET="1", LONGTRAIN_TRITON_INNER="1",
                   OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            __file__], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]

else:
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch

    from longtrain.kernels import lightning_attention, tnl_decay

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return ((a - b).norm() / b.norm()).item()

    def rmse_over_rms(a, b):
        a, b = a.detach().double(), b.detach().double()
        return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()

    def make(B, S, H, Dk, Dv=None, *, state=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        Dv = Dv or Dk
        q, k = (torch.randn(B, S, H, Dk, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(B, S, H, Dv, generator=g, dtype=torch.float64)
        do = torch.randn(B, S, H, Dv, generator=g, dtype=torch.float64)
        s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64) if state else None
        dst = torch.randn(B, H, Dk, Dv, generator=g, dtype=torch.float64)
        return [q, k, v, s0], do, dst

    def run(inputs, do, dst, decay, dtype, **kw):
        leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
        q, k, v, s0 = leaves
        out, st = lightning_attention(q, k, v, decay, initial_state=s0, return_state=True, **kw)
        ((out.double() * do).sum() + (st.double() * dst).sum()).backward()
        return [out, st] + [x.grad for x in leaves if x is not None]

    GRID = [  # (B, S, H, D): every S, H, D value at least once; S <= 512 for the interpreter
        (2, 100, 8, 64), (1, 130, 12, 80), (1, 512, 12, 64), (1, 130, 8, 80),
    ]

    @pytest.mark.parametrize("B,S,H,D", GRID)
    def test_triton_fp32_matches_recurrence(B, S, H, D):
        inputs, do, dst = make(B, S, H, D, state=True, seed=S + H + D)
        decay = tnl_decay(H, S % 4, 4)
        ref = run(inputs, do, dst, decay, torch.float64, backend="naive")
        got = run(inputs, do, dst, decay, torch.float32, backend="triton")
        assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
        errs = [rel(g, r) for g, r in zip(got, ref)]   # out, state, dq, dk, dv, ds0
        assert max(errs) <= 1e-5, errs

    def test_triton_documents_dv_and_block_sizes():
        inputs, do, dst = make(2, 200, 3, 32, 16, state=True, seed=1)
        cu = torch.tensor([0, 64, 64, 100, 101, 190, 200])
        decay = torch.tensor([0.0, 0.05, 3.0])
        ref = run(inputs, do, dst, decay, torch.float64, backend="naive", cu_seqlens=cu)
        for C in (16, 64, 128):
            got = run(inputs, do, dst, decay, torch.float32, backend="triton", cu_seqlens=cu,
                      block_size=C)
            errs = [rel(g, r) for g, r in zip(got, ref)]
            assert max(errs) <= 1e-5, (C, errs)

    def test_triton_equals_torch_path_and_continues_state():
        inputs, do, dst = make(1, 256, 4, 64, state=True, seed=2)
        decay = tnl_decay(4, 1, 3)
        ref = run(inputs, do, dst, decay, torch.float32, backend="torch")
        got = run(inputs, do, dst, decay, torch.float32, backend="triton")
        assert max(rel(g, r) for g, r in zip(got, ref)) <= 1e-5
        # two halves with the carried state, gradients through the state
        q, k, v, s0 = (x.float().requires_grad_() for x in inputs)
        o1, st1 = lightning_attention(q[:, :100], k[:, :100], v[:, :100], decay,
                                      initial_state=s0, return_state=True, backend="triton")
        o2, st2 = lightning_attention(q[:, 100:], k[:, 100:], v[:, 100:], decay,
                                      initial_state=st1, return_state=True, backend="triton")
        out = torch.cat([o1, o2], 1)
        ((out.double() * do).sum() + (st2.double() * dst).sum()).backward()
        for g, r in zip([out, st2, q.grad, k.grad, v.grad, s0.grad], ref):
            assert rel(g, r) <= 1e-5

    @pytest.mark.parametrize("D", [64, 80])
    def test_triton_fp16(D):
        inputs, do, dst = make(1, 256, 4, D, seed=3)
        inputs = [x if x is None else x.half().double() for x in inputs]  # same values both sides
        decay = tnl_decay(4, 0, 4)
        ref = run(inputs, do, dst, decay, torch.float64, backend="naive")
        got = run(inputs, do, dst, decay, torch.float16, backend="triton")
        assert got[0].dtype == torch.float16 and all(g.dtype == torch.float16 for g in got[2:])
        errs = [rmse_over_rms(g, r) for g, r in zip(got, ref)]
        assert max(errs) <= 5e-3, errs

    def test_triton_rejects_bad_block():
        (q, k, v, _), _, _ = make(1, 32, 2, 16)
        with pytest.raises(ValueError, match="power of two"):
            lightning_attention(q.float(), k.float(), v.float(), torch.ones(2),
                                backend="triton", block_size=48)
