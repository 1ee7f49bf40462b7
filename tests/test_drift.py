"""Rules that used to live in several places and drifted: each is now read from one source, and these
tests would have caught the drift (issue #22)."""

from __future__ import annotations

import tempfile

from helpers import FAST, TINY

from longtrain.testing import run_distributed


def _attention_settings_seen(rank, world, sets):
    """SequenceParallelOps built by a training step and by the in-training evaluation."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.eval.in_training import in_training_eval
    from longtrain.launcher.metrics import Metrics
    from longtrain.launcher.trainer import Trainer
    from longtrain.parallel import ops as ops_mod

    seen: list[tuple] = []
    orig = ops_mod.SequenceParallelOps.__init__

    def spy(self, group, **kw):
        orig(self, group, **kw)
        seen.append((self.impl, self.layout, self.ulysses_degree, self.one_communicator))

    ops_mod.SequenceParallelOps.__init__ = spy
    try:
        trainer = Trainer(load_recipe(str(TINY), [f"run.output_dir={tempfile.mkdtemp()}", *sets]))
        trainer.metrics = Metrics(trainer.recipe.output_dir, is_main=False, total_steps=1, log_every=1,
                                  tensorboard=False)
        trainer.train_step()
        train = set(seen)
        seen.clear()
        in_training_eval(trainer)
        return train, set(seen)
    finally:
        ops_mod.SequenceParallelOps.__init__ = orig


def test_in_training_eval_uses_the_training_attention_settings():
    """Evaluation during training built its attention without ulysses_degree / sp_one_communicator."""
    sets = [*FAST, "parallel.sp=4", "parallel.sp_impl=hybrid", "parallel.ulysses_degree=2",
            "parallel.sp_one_communicator=true", "data.seq_len=64", "eval.every=1", "eval.lengths=[64]",
            "eval.samples=1", "model.n_heads=4", "model.n_kv_heads=2"]
    for train, evaluated in run_distributed(_attention_settings_seen, 4, sets):
        assert train == {("hybrid", "zigzag", 2, True)}
        assert evaluated == train


def _stage_steps(rank, world, recipe):
    from longtrain.launcher.trainer import Trainer

    trainer = Trainer(recipe)
    out = []
    for _ in range(4):
        res = trainer.train_step()
        s = trainer.step_scalars(res, 1.0, peak=1e12)
        out.append((trainer.data.seq_len, s["tokens_per_step"], s["mfu"], res["tokens"]))
    return out, trainer.data.global_batch, trainer.model.cfg


def test_mfu_and_tokens_per_step_follow_a_stage_switch(tmp_path):
    """After a [[stages]] switch the logged tokens per step and MFU use the new sequence length."""
    from longtrain.launcher.config import load_recipe, recipe_from_dict
    from longtrain.launcher.metrics import train_flops_per_token

    r = load_recipe(str(TINY), [*FAST, f"run.output_dir={tmp_path}", "training.steps=4", "data.prefetch=false"])
    data = r.to_dict()
    data["stages"] = [{"start_step": 2, "seq_len": 128}]
    r = recipe_from_dict(data, str(TINY))

    (rows, gb, cfg), = run_distributed(_stage_steps, 1, r)
    assert [x[0] for x in rows] == [64, 64, 128, 128]
    for seq, tokens_per_step, mfu, counted in rows:
        assert tokens_per_step == gb * seq
        assert abs(mfu - train_flops_per_token(cfg, seq) * counted / 1e12) < 1e-12 * max(1.0, mfu)
