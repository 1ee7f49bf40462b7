"""Mesa Triton kernels == torch twin, run under TRITON_INTERPRET=1 in a subprocess.

The interpreter must be chosen before triton is imported, so the checks run in a
fresh interpreter; it prints one JSON line of results that the tests assert on.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent(r"""
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from longtrain.kernels.mesa import quantize, dequantize, MesaConfig, MesaState, mesa_scope

    out = {}
    cases = [
        ("head_fp32", torch.randn(2, 77, 4, 16), 4, 2, 8),             # 9856 elements: ragged last block
        ("chan_bf16", torch.randn(3, 50, 96).bfloat16(), 6, -1, 8),
        ("chan_fp16", (torch.randn(5, 40, 32) * 7).half(), 4, -1, 8),
        ("head_4bit", torch.randn(2, 33, 2, 16), 2, 2, 4),
    ]
    for name, x, g, dim, bits in cases:
        noise = torch.rand(x.shape)
        res = {}
        for st in (False, True):
            a = quantize(x, g, dim=dim, bits=bits, stochastic=st, noise=noise, backend="torch")
            b = quantize(x, g, dim=dim, bits=bits, stochastic=st, noise=noise, backend="triton")
            da, db = dequantize(a, backend="torch"), dequantize(b, backend="triton")
            res["codes_equal_st" if st else "codes_equal"] = bool(torch.equal(a.codes, b.codes))
            res["deq_equal_st" if st else "deq_equal"] = bool(torch.equal(da, db)) and db.dtype == x.dtype
            # cross: triton dequantizes torch's codes identically
            res["cross_equal_st" if st else "cross_equal"] = bool(torch.equal(dequantize(a, backend="triton"), da))
        out[name] = res

    # in-kernel noise (tl.rand): unbiased over 1000 draws
    n, draws = 512, 1000
    x = torch.linspace(-1, 1, n)
    xs = x.expand(draws, n).contiguous()
    q = quantize(xs, 1, shift=torch.tensor([-1.0]), span=torch.tensor([2.0]), stochastic=True, backend="triton")
    y = dequantize(q, backend="triton")
    out["trand_bias"] = float(((y.mean(0) - x).abs() / 2.0).max())
    out["trand_varies"] = bool(not torch.equal(y[0], y[1]))

    # a block under mesa_scope: triton backend gives the same gradients as the torch backend
    lin1, lin2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)
    x0 = torch.randn(4, 32, 64)
    grads = {}
    for be in ("torch", "triton"):
        st = MesaState(MesaConfig(stochastic=False, backend=be), layers=1)
        lin1.zero_grad(); lin2.zero_grad()
        x = (x0 * 1.0).requires_grad_()
        with mesa_scope(st, 0):
            y = lin2(torch.nn.functional.silu(lin1(x * 1.0)))
        y.square().sum().backward()
        grads[be] = [lin1.weight.grad.clone(), lin2.weight.grad.clone(), x.grad.clone()]
    out["scope_grads_equal"] = all(torch.equal(a, b) for a, b in zip(grads["torch"], grads["triton"]))
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", ["head_fp32", "chan_bf16", "chan_fp16", "head_4bit"])
def test_triton_matches_torch_twin(results, case):
    r = results[case]
    assert r == {k: True for k in r}, r
    assert len(r) == 6


def test_triton_in_kernel_stochastic_rounding_unbiased(results):
    assert results["trand_varies"]
    assert results["trand_bias"] < 1e-3


def test_triton_backend_in_scope_gives_identical_gradients(results):
    assert results["scope_grads_equal"]
