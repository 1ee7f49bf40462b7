"""DeepSpeed ZeRO 1/2/3 on 2 CPU processes (gloo): same losses as DDP (the independent reference:
fp32, same data, same loss scaling), exact resume from its own checkpoints, sp=2 beside it, and the
atomic publish protocol (a crash during a save keeps the previous checkpoint; resume='auto' works)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from helpers import FAST, TINY, losses, run_train  # noqa: E402
from longtrain.launcher.checkpoint import is_complete, read_meta, safe_load  # noqa: E402
from longtrain.testing import run_distributed  # noqa: E402

os.environ.setdefault("DS_BUILD_OPS", "0")
STEPS = 4
# grad_accum=2 exercises DeepSpeed's accumulation boundary; lr high enough that steps differ visibly
EXTRA = [f"training.steps={STEPS}", "checkpoint.interval=2", "training.grad_accum=2", "training.lr=5e-3",
         "metrics.tensorboard=false"]
BASE = [*FAST, *EXTRA]


def _fit(recipe_path: str, sets: list[str]) -> dict:
    import torch.distributed as dist

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    trainer = Trainer(load_recipe(recipe_path, sets))
    out = trainer.fit()
    grad_norms = []
    if dist.get_rank() == 0:
        recs = [json.loads(x) for x in (trainer.recipe.output_dir / "metrics.jsonl").read_text().splitlines()]
        grad_norms = [r["grad_norm"] for r in recs if "grad_norm" in r]
    return {"losses": out["losses"], "first_step": out["steps"] - len(out["losses"]), "grad_norms": grad_norms}


def _runs(rank: int, world: int, recipe_path: str, root: str) -> dict:
    """In one pair of processes: a DDP reference, then for each ZeRO stage a straight run and a
    fresh engine resumed from the straight run's step-2 checkpoint."""
    import deepspeed  # noqa: F401 - import once, outside the timed part

    res = {"ddp": _fit(recipe_path, [*BASE, f"run.output_dir={root}/ddp", "parallel.dp_engine=ddp"])}
    for stage in (1, 2, 3):
        sets = [*BASE, "parallel.dp_engine=deepspeed", f"parallel.zero_stage={stage}"]
        a = f"{root}/z{stage}"
        res[f"z{stage}"] = _fit(recipe_path, [*sets, f"run.output_dir={a}"])
        res[f"z{stage}_resumed"] = _fit(recipe_path, [*sets, f"run.output_dir={root}/z{stage}r",
                                                      f"checkpoint.resume={a}/checkpoints/step_00000002"])
    # sequence parallelism beside ZeRO: sp=2 on both ranks (dp=1), DDP with the same sp as reference
    sp = [*BASE, "parallel.sp=2", "parallel.sp_impl=ring"]
    res["sp2_ddp"] = _fit(recipe_path, [*sp, f"run.output_dir={root}/sp2ddp", "parallel.dp_engine=ddp"])
    res["sp2_z2"] = _fit(recipe_path, [*sp, f"run.output_dir={root}/sp2z2", "parallel.dp_engine=deepspeed",
                                       "parallel.zero_stage=2"])
    return res


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    res = run_distributed(_runs, 2, str(TINY), str(root), timeout=600)
    return root, res[0]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from longtrain.models import Transformer, model_config

    meta = read_meta(ckpt)
    sd = {"model": Transformer(model_config(None, **meta["model"])).state_dict()}
    safe_load(sd, ckpt)
    return sd["model"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_ddp(zero_runs, stage):
    _, res = zero_runs
    ref, got = res["ddp"], res[f"z{stage}"]
    assert len(got["losses"]) == STEPS
    assert got["losses"][-1] < got["losses"][0] - 0.5, got["losses"]  # it learns
    # fp32 on gloo: only the reduction order differs from DDP
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    # gradient norm after DeepSpeed's all-reduce (before clipping) equals DDP's
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_resume_identical(zero_runs, stage):
    root, res = zero_runs
    straight, resumed = res[f"z{stage}"], res[f"z{stage}_resumed"]
    assert resumed["first_step"] == 2 and len(resumed["losses"]) == STEPS - 2
    assert resumed["losses"] == straight["losses"][2:]  # bit-identical: same state, same data, same order
    ck = root / f"z{stage}" / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step_{STEPS:08d}"
    meta = read_meta(ck / f"step_{STEPS:08d}")
    assert meta["deepspeed"]["zero_stage"] == stage and meta["step"] == STEPS and meta["world_size"] == 2
    wa = _weights(ck / f"step_{STEPS:08d}")
    wb = _weights(root / f"z{stage}r" / "checkpoints" / f"step_{STEPS:08d}")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_ds_config_generated_and_overridable():
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.optim import deepspeed_settings

    r = load_recipe(TINY, ["parallel.dp_engine=deepspeed", "parallel.zero_stage=2", "training.grad_accum=4",
                           "training.grad_clip=0.5",
                           "parallel.deepspeed_config={zero_optimization = {reduce_bucket_size = 1000}}"])
    cfg = deepspeed_settings(r, torch.bfloat16)
    assert cfg["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # merged, not replaced
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True
    assert cfg["managed_gradient_accumulation"] is False


def test_deepspeed_with_sp2(zero_runs):
    _, res = zero_runs
    ref, got = res["sp2_ddp"], res["sp2_z2"]
    assert len(got["losses"]) == STEPS and got["losses"][-1] < got["losses"][0] - 0.5
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4, atol=1e-5)
    # dp=1 x sp=2 reads half the samples per step of dp=2: a different run, not a copy of it
    assert got["losses"][1:] != res["ddp"]["losses"][1:]


def test_crash_during_save_then_auto_resume(tmp_path):
    """Same crash safety as the DCP path: rank 0 dies after writing the step-4 files but before
    publishing; 'latest' still names step 2, and resume='auto' continues from it to the end."""
    out = tmp_path / "run"
    sets = ["parallel.dp_engine=deepspeed", "parallel.zero_stage=3", *EXTRA]
    proc = run_train(out, *sets, check=False, LONGTRAIN_FAULT="crash_during_save:4")
    assert proc.returncode != 0
    ck = out / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert (ck / "step_00000004.tmp").is_dir() and not (ck / "step_00000004").exists()
    proc = run_train(out, *sets)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-2000:]
    assert not (ck / "step_00000004.tmp").exists()
    assert is_complete(ck / "step_00000004") and (ck / "latest").read_text().strip() == "step_00000004"
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
