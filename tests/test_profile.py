"""[profile] traces with our named ranges, and the planner's memory beside what a run measures (issue 37)."""

from __future__ import annotations

import json
import tempfile
from types import SimpleNamespace

import pytest

from helpers import FAST, TINY, run_train

from longtrain.launcher.metrics import read_jsonl
from longtrain.testing import run_distributed


def _trace_names(path) -> tuple[set[str], list[dict]]:
    events = json.loads(path.read_text())["traceEvents"]
    return {e["name"] for e in events if e.get("name", "").startswith("longtrain/")}, events


def test_profiled_step_writes_a_trace_with_our_ranges(tmp_path):
    """3 steps, sp = 2 (ring), checkpointing full, step 2 profiled with the CPU memory timeline: one trace
    from rank 0 only, holding every phase's range, the SP ranges, and the RSS counter track."""
    out = tmp_path / "run"
    run_train(out, "training.steps=3", "profile.steps=[2]", "profile.memory=true", "checkpoint.interval=2",
              "parallel.sp=2", "parallel.sp_impl=ring", "model.attention=['full','window:32']",
              "training.activation_checkpointing=full")
    files = sorted(p.name for p in (out / "profile").iterdir())
    assert files == ["rank0.2.pt.trace.json", "rss.rank0.2.json"], files
    names, events = _trace_names(out / "profile" / "rank0.2.pt.trace.json")
    for phase in ("step", "data", "forward", "layer/full", "layer/window", "loss", "backward", "optimizer",
                  "checkpoint", "sp_attention/ring", "sp_comm/post", "sp_comm/wait"):
        assert f"longtrain/{phase}" in names, (phase, sorted(names))
    # one step: a single step range enclosing the forward ranges
    step = [e for e in events if e.get("name") == "longtrain/step" and e.get("ph") == "X"]
    fwd = [e for e in events if e.get("name") == "longtrain/forward" and e.get("ph") == "X"]
    assert len(step) == 1 and fwd
    t0, t1 = step[0]["ts"], step[0]["ts"] + step[0]["dur"]
    assert all(t0 <= e["ts"] and e["ts"] + e["dur"] <= t1 for e in fwd)
    # block ranges close, also for a checkpoint's recompute (which stops the block's forward early)
    opt = next(e for e in events if e.get("name") == "longtrain/optimizer" and e.get("ph") == "X")
    layers = [e for e in events if e.get("name", "").startswith("longtrain/layer/") and e.get("ph") == "X"]
    assert len(layers) >= 4 and all(e["ts"] + e["dur"] <= opt["ts"] for e in layers)
    counters = [e for e in events if e.get("ph") == "C" and e.get("name") == "rss_mib"]
    assert len(counters) >= 3 and all(c["args"]["rss_mib"] > 10 for c in counters)
    rss = json.loads((out / "profile" / "rss.rank0.2.json").read_text())
    assert rss["samples"] and {"longtrain/forward", "longtrain/backward"} <= {n for n, _, _ in rss["ranges"]}
    # planned vs measured is logged on every run, at step 2
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "memory/planned_gib" in r]
    assert [r["step"] for r in recs] == [2] and recs[0]["memory/measured_gib"] > 0


def _fit_unprofiled(rank, world):
    import sys

    import torch.profiler

    from longtrain import ranges
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    def refuse(*a, **k):
        raise AssertionError("a profiler was created with [profile] off")

    torch.profiler.profile = refuse
    ranges._Range = refuse  # our record_function ranges (FSDP2 marks its own: torch's, not ours)
    seen = []
    orig = ranges.scope
    ranges.scope = lambda name: (seen.append(ranges.ACTIVE), orig(name))[1]
    trainer = Trainer(load_recipe(str(TINY), [f"run.output_dir={tempfile.mkdtemp()}", *FAST, "training.steps=2",
                                              "metrics.tensorboard=false", "checkpoint.interval=100"]))
    trainer.fit()
    return "longtrain.launcher.profile" in sys.modules, bool(seen), any(seen)


def test_profiling_off_creates_no_profiler():
    """With [profile] off: launcher/profile.py is never imported, no profiler object and none of our
    record_function ranges is made: the ranges the step passes through are the shared no-op."""
    imported, passed, active = run_distributed(_fit_unprofiled, 1)[0]
    assert not imported and passed and not active


# (memory bench grid points, launcher/planned.py): the planner's figure for the run's own layout against
# its measured peak; MALLOC_MMAP_THRESHOLD_ as `longtrain bench memory` measures (module doc there)
GRID = {
    "V=128256 ffn=1536 none fsdp2 x1": (1, ["model.vocab_size=128256", "model.ffn_dim=1536"]),
    "V=320 ffn=1536 full+mesa fsdp2 x2": (2, ["model.vocab_size=320", "model.ffn_dim=1536",
                                              "training.activation_checkpointing=full", "mesa.enabled=true"]),
    "V=128256 ffn=384 none+mesa ddp x1": (1, ["model.vocab_size=128256", "model.ffn_dim=384",
                                              "parallel.dp_engine=ddp", "mesa.enabled=true"]),
}


@pytest.mark.parametrize("case", list(GRID))
def test_logged_plan_matches_the_measured_peak(tmp_path, case):
    nproc, sets = GRID[case]
    out = tmp_path / "run"
    run_train(out, "training.steps=2", "data.seq_len=2048", "training.micro_batch=1", "metrics.tensorboard=false",
              "checkpoint.interval=100", "data.max_documents=200", "model.max_seq_len=2048", *sets, nproc=nproc,
              MALLOC_MMAP_THRESHOLD_="65536")
    (rec,) = [r for r in read_jsonl(out / "metrics.jsonl") if "memory/planned_gib" in r]
    ratio = rec["memory/measured_gib"] / rec["memory/planned_gib"]
    assert 0.85 <= ratio <= 1.15, (case, rec)
    # parameters and optimizer state are counted from the tensors: the plan's figures exactly
    for k in ("params", "optimizer"):
        assert rec[f"memory/measured/{k}_gib"] == pytest.approx(rec[f"memory/planned/{k}_gib"], rel=1e-3), k


def test_measured_steps_are_the_second_of_each_length():
    """The plan check measures the step after the first at each sequence length (a stage change starts a
    new one), resets the peak just before it, and measures the only step of a one-step run."""
    from longtrain.launcher import planned

    def steps(lengths):
        pc = planned.PlanCheck(None, None, None, None, world=1, sp=1, impl="ring", device=None)
        got, resets = [], []
        pc._measure = lambda n, seq, dt: got.append((n, seq)) or {"x": 1.0}
        orig = planned.reset_peak, planned.state_bytes
        planned.reset_peak, planned.state_bytes = (lambda dev: resets.append(len(got))), (lambda m, o: (0.0, 0.0))
        try:
            for n, seq in enumerate(lengths, 1):
                pc.before(n)
                pc.after(n, seq, len(lengths), 0.1)
        finally:
            planned.reset_peak, planned.state_bytes = orig
        return got, len(resets)

    assert steps([64, 64, 64, 128, 128, 128]) == ([(2, 64), (5, 128)], 2)
    assert steps([64]) == ([(1, 64)], 0)  # no step before it to reset at: measured from the start
    assert steps([64, 64, 128]) == ([(2, 64), (3, 128)], 1)


def test_gpu_names_map_to_the_planners_kinds():
    from longtrain.launcher.planned import gpu_key
    from longtrain.launcher.sizing import GPUS

    cases = {("NVIDIA H100 80GB HBM3", 80): "h100", ("NVIDIA H100 PCIe", 80): "h100-pcie",
             ("NVIDIA H200", 141): "h200", ("NVIDIA A100-SXM4-40GB", 40): "a100-40g",
             ("NVIDIA A100-SXM4-80GB", 80): "a100", ("NVIDIA A10G", 24): "a10", ("NVIDIA L40S", 48): "l40s",
             ("Tesla T4", 16): None}
    for (name, mem), key in cases.items():
        assert gpu_key(name, mem) == key, name
        assert key is None or key in GPUS


def test_fsdp2_plan_holds_the_root_whole():
    """FSDP2 does not reshard the root (embedding, final norm, output) after forward: the plan counts
    it whole beside the sharded state (the gap the run's plan check found: +12% at V = 128,256)."""
    from longtrain.launcher.sizing import memory_per_gpu
    from longtrain.models import model_config

    cfg = model_config("tiny", vocab_size=128256, max_seq_len=2048)
    kw = dict(sp=1, micro_batch=1, seq_len=2048, dtype="bf16", zero_stage=0, checkpointing="none", mesa=False)
    for world in (1, 8):
        f = memory_per_gpu(cfg, world=world, engine="fsdp2", **kw)
        layer = (cfg.n_params - 2 * cfg.vocab_size * cfg.dim) / cfg.n_layers
        root = (2 * cfg.vocab_size * cfg.dim + cfg.dim) * 2
        gathered = f.transient - cfg.n_params * 4 / world  # less the foreach optimizer temporaries
        assert gathered == pytest.approx(2 * layer * 2 * 2 + root, rel=1e-9)
        d = memory_per_gpu(cfg, world=world, engine="ddp", **kw)
        assert d.transient == pytest.approx(cfg.n_params * 4)


def test_step_time_check_on_a_known_gpu(monkeypatch, caplog):
    """On a GPU the planner knows, the plan check's step time is `longtrain plan`'s for the same layout
    (a stand-in H100: CUDA's device query is the only thing replaced), and a step twice as slow warns."""
    import logging

    import torch

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.plan import make_plan
    from longtrain.launcher.planned import PlanCheck

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2**30))
    recipe = load_recipe(str(TINY), ["training.dtype=bf16"])
    cfg = recipe.model_config()
    pc = PlanCheck(recipe, cfg, None, None, world=1, sp=1, impl="ring", device=SimpleNamespace(type="cuda"))
    got = pc._step_time(recipe.data.seq_len, 1.0)
    want = make_plan(recipe, gpus=1, gpu="h100").step_time[0]["step_s"]
    assert got["perf/planned_step_time_s"] == pytest.approx(want, rel=1e-12)
    assert got["perf/planned_mfu"] == 0.45
    m = pc.planned_memory(recipe.data.seq_len)
    planned = {"total": m.total, "params": m.params, "optimizer": m.optimizer}
    slow = {**got, "perf/measured_step_time_s": 2 * want}
    with caplog.at_level(logging.INFO, logger="longtrain"):
        pc._report(2, recipe.data.seq_len, m, planned, dict(planned), 0.0, 0.0, slow)
    assert any("2.00x the planned time" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not any("memory differs" in r.getMessage() for r in caplog.records)


def test_memory_gap_warning_names_the_component(caplog):
    """Past 25% and 128 MiB the plan check warns and names the component with the largest gap."""
    import logging

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.planned import GiB, PlanCheck

    recipe = load_recipe(str(TINY), [])
    pc = PlanCheck(recipe, recipe.model_config(), None, None, world=1, sp=1, impl="ring",
                   device=SimpleNamespace(type="cpu"))
    m = pc.planned_memory(recipe.data.seq_len)
    planned = {"total": 1.0 * GiB, "params": 0.1 * GiB, "optimizer": 0.2 * GiB}
    for measured_total, warns in ((1.2 * GiB, False), (1.0 * GiB + 0.3 * GiB * 2, True)):
        caplog.clear()
        measured = {**planned, "total": measured_total}
        with caplog.at_level(logging.INFO, logger="longtrain"):
            pc._report(2, 256, m, planned, measured, 0.7 * GiB, measured_total - 0.3 * GiB, {})
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warned) == warns, warned
        if warns:
            assert "activations and the rest" in warned[0] and "+0.6 GiB" in warned[0], warned[0]
