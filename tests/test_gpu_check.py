"""`make gpu-check` on a machine without CUDA: one line and exit 0; its CPU-safe sections run and
pass here, as CI runs them: c (ring and TokenRing simulated as threads, W = 2/3/4, causal / window /
documents, forward and backward vs full-sequence attention) and a dry run of e (every training arm
on the tiny model). `make gpu-check-multi` (the >= 2 GPU check) runs as a gloo dry run on 4
processes. The CUDA sections run on a GPU box (docs/gpu.md)."""

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
    assert gpu_check.main(["--cpu", "--sections", "c", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    ring_rows = [r for r in rows if r["section"] == "c"]
    assert len(ring_rows) == 2 * 3 * 3  # {ring, tokenring} x W {2, 3, 4} x {causal, window, documents}
    assert all(r["status"] == "ok" for r in ring_rows), [r for r in ring_rows if r["status"] != "ok"]
    assert max(r["value"] for r in ring_rows) <= 1e-5


def test_a_wrong_schedule_fails_the_simulation(monkeypatch):
    """The simulated check can fail: drop the last K,V hop of the ring and the output is wrong."""
    from longtrain.kernels import naive_attention
    from longtrain.parallel import ring_common as ring
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


def test_training_arms_dry_run(tmp_path):
    """Section e on CPU: every arm trains (a fresh `longtrain train` each), the resumed run repeats the
    async-saved run's losses exactly, and document masks add no host sync."""
    gpu_check.ROWS.clear()
    out = tmp_path / "gc.json"
    assert gpu_check.main(["--cpu", "--sections", "e", "--out", str(out)]) == 0
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"] if r["section"] == "e"}
    trained = [c for c in rows if c.startswith("train ")]
    assert [c.split()[1] for c in trained] == ["eager", "mesa", "documents", "window", "checkpointing", "ddp",
                                               "async-save", "resume"]
    assert all(rows[c]["status"] == "ok" and rows[c]["value"] > 0 for c in trained), [rows[c] for c in trained]
    resume = next(r for c, r in rows.items() if c.startswith("resume from the async checkpoint: steps 3-4"))
    assert resume["status"] == "ok" and resume["value"] <= 1e-5
    syncs = next(r for c, r in rows.items() if c.startswith("documents: host syncs added per step"))
    assert syncs["status"] == "ok" and syncs["value"] <= 2
    summary = next(r for r in json.loads(out.read_text())["rows"] if r["check"] == "training summary")["value"]
    assert summary["documents"]["losses"] != summary["eager"]["losses"]  # the masks really cut documents


def test_multi_gpu_check_dry_run_on_gloo(tmp_path):
    """`make gpu-check-multi` on 4 gloo processes: SP parity for every impl / mask / communicator mode at
    sp = 2 (dp 2) and 4, FSDP2 vs DDP with SP, DCP save at 4 ranks and resume at 2, the hang drill."""
    gpu_check.ROWS.clear()
    out = tmp_path / "gcm.json"
    assert gpu_check.main(["--multi", "--cpu", "--nproc", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    g = [r for r in rows if r["section"] == "g"]
    # sp 2 and 4 x (3 masks x (4 impls x 2 communicator modes + ulysses) + lightning with documents)
    assert len(g) == 2 * (3 * 9 + 1) and all(r["status"] == "ok" and r["value"] <= 2e-5 for r in g), \
        [r for r in g if r["status"] != "ok"]
    assert {r["check"].split()[0] for r in g} == {"sp=2", "sp=4"}
    by = {r["section"]: [x for x in rows if x["section"] == r["section"]] for r in rows}
    assert len(by["h"]) == 1 and by["h"][0]["status"] == "ok" and by["h"][0]["value"] <= 1e-5
    assert [r["status"] for r in by["i"]] == ["ok", "ok"] and by["i"][1]["value"] <= 1e-5
    drill = {r["check"]: r for r in by["j"]}
    hung = drill["rank 1: unmatched collective ended"]
    assert hung["status"] == "ok" and 4.0 <= hung["value"] <= 20.0 and "Timed out" in hung["note"]


def test_multi_bad_input_is_one_line(capsys):
    assert gpu_check.main(["--multi", "--cpu", "--nproc", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtrain: error:") and "got 3" in err[0]
