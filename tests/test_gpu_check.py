"""`make gpu-check` on a machine without CUDA: one line and exit 0; its CPU-safe section (ring and
TokenRing simulated as threads, W = 2/3/4, causal / window / documents, forward and backward vs
full-sequence attention) runs and passes here, as CI runs it. The CUDA sections run on a GPU box
(docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from helpers import REPO
from longtrain.bench import gpu_check

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA behaviour")


def test_without_cuda_it_says_what_it_skipped(capsys):
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA GPU visible; skipped sections a-f" in out[0]


def test_cpu_safe_section_runs_and_passes(tmp_path):
    gpu_check.ROWS.clear()
    out = tmp_path / "gc.json"
    assert gpu_check.main(["--cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    ring_rows = [r for r in rows if r["section"] == "c"]
    assert len(ring_rows) == 2 * 3 * 3  # {ring, tokenring} x W {2, 3, 4} x {causal, window, documents}
    assert all(r["status"] == "ok" for r in ring_rows), [r for r in ring_rows if r["status"] != "ok"]
    assert max(r["value"] for r in ring_rows) <= 1e-5


def test_a_wrong_schedule_fails_the_simulation(monkeypatch):
    """The simulated check can fail: drop the last K,V hop of the ring and the output is wrong."""
    from longtrain.kernels import naive_attention
    from longtrain.parallel import ring
    from longtrain.parallel.simulate import simulate_ring

    monkeypatch.setattr(ring.RingSpec, "hops", property(lambda self: self.world - 2))
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(1, 48, 2, 8) for _ in range(4))
    out = simulate_ring(q, k, v, g, 3, impl="ring")[0]
    assert (out - naive_attention(q, k, v, causal=True)).abs().max() > 1e-2


def test_make_target_uses_the_given_interpreter():
    dry = subprocess.run(["make", "-n", "gpu-check", "PYTHON=python3"], capture_output=True, text=True, cwd=REPO)
    assert dry.returncode == 0
    assert "python3 -m longtrain.bench.gpu_check" in dry.stdout and "PYTHONPATH=" in dry.stdout
    assert "pip" not in dry.stdout
