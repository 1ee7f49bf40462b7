"""Mesa in the trainer: same loss as exact training, works with sp=2 and activation checkpointing,
and its running estimates travel in the checkpoint."""

from __future__ import annotations

from helpers import losses, run_train
from longtrain.launcher.checkpoint import _MetadataUnpickler


def _window(ls: dict[int, float], first: int, last: int) -> float:
    return sum(ls[s] for s in range(first, last + 1)) / (last - first + 1)


def test_mesa_loss_within_1pct_of_exact(tmp_path):
    """The tiny recipe, 150 steps on 2 processes (FSDP2), with and without Mesa: every 30-step mean
    of the loss from step 61 on (the last one is the acceptance's "final loss") within 1 % of exact.

    With the running range alone (range_mode="ema") the residual stream saturated early in
    training; Mesa fell behind from about step 80 and ended 5.9 % worse (windows: +3.3 %, +4.7 %,
    +5.9 %). With the default range (running estimate widened to each tensor's min/max), seeds
    0-3 measured within +0.62 % in every window (docs/mesa.md).

    Trained at lr 1e-3 (was 3e-3): at 3e-3 both runs spike (grad norms 2-3.7 at steps 50-94), and
    once RMSNorm saved its input instead of its fp32 intermediates (1e-8 gradient rounding, and
    fewer tensors for Mesa) the two trajectories drifted 1-3 % apart in both directions (window
    91-120: Mesa 1.9 % *lower*). At 1e-3 the windows measure +0.12 / +0.06 / +0.34 %."""
    common = ["training.steps=150", "checkpoint.interval=1000", "data.seq_len=128", "training.lr=1e-3"]
    run_train(tmp_path / "exact", *common)
    run_train(tmp_path / "mesa", *common, "mesa.enabled=true")
    a, b = losses(tmp_path / "exact"), losses(tmp_path / "mesa")
    assert sorted(a) == sorted(b) == list(range(1, 151))
    for first, last in ((61, 90), (91, 120), (121, 150)):
        ea, mb = _window(a, first, last), _window(b, first, last)
        assert abs(mb - ea) / ea < 0.01, (first, last, ea, mb)
    assert _window(a, 121, 150) < a[1] - 1.0  # the run really trained


def test_mesa_sp2_checkpoint_holds_estimates(tmp_path):
    out = tmp_path / "run"
    run_train(out, "training.steps=4", "checkpoint.interval=2", "data.seq_len=128", "mesa.enabled=true",
              "parallel.sp=2", "parallel.sp_impl=tokenring", "model.attention=['full','window:40']")
    ls = losses(out)
    assert all(v == v for v in ls.values()) and ls[4] < ls[1]
    with open(out / "checkpoints" / "step_00000004" / ".metadata", "rb") as f:
        keys = set(_MetadataUnpickler(f).load().state_dict_metadata)
    assert any(".mesa." in k or k.startswith("model.mesa") for k in keys), sorted(keys)[:20]
    # resume with Mesa from that checkpoint (estimates loaded, not re-initialised)
    run_train(out, "training.steps=6", "checkpoint.interval=2", "data.seq_len=128", "mesa.enabled=true",
              "parallel.sp=2", "parallel.sp_impl=tokenring", "model.attention=['full','window:40']",
              "training.activation_checkpointing=true")
    assert sorted(losses(out)) == list(range(1, 7))


def test_mesa_resume_is_exact(tmp_path):
    """A run interrupted and resumed gives the same losses as a straight run, step for step (fp32, CPU, 2
    ranks): stochastic rounding draws from a generator reseeded every step from (seed, step, rank), and
    the running ranges are averaged over ranks every step, so the one copy a checkpoint holds is every
    rank's. (With per-rank ranges alone, steps 5-6 differed by ~6e-8 relative; the test fails on that.)"""
    common = ["training.steps=6", "checkpoint.interval=3", "data.seq_len=64", "mesa.enabled=true",
              "mesa.stochastic=true"]
    run_train(tmp_path / "a", *common)
    run_train(tmp_path / "b", *common, check=False, LONGTRAIN_FAULT="crash_during_save:6")
    assert sorted(losses(tmp_path / "b")) == list(range(1, 7))  # step 6 ran, its checkpoint did not land
    run_train(tmp_path / "b", *common)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")

    assert all(la[s] == lb[s] for s in range(1, 7)), (la, lb)


def test_8bit_checkpointed_inputs_train_like_exact(tmp_path):
    """Issue 34's quality bar, at CI size: every layer checkpointed ('full'), Mesa storing the layer
    inputs in 8 bits vs exact checkpointing, 100 fp32 steps at lr 1e-3 on 2 processes: the final
    loss within 1 % and no step's loss off by more than 3 %. (The 200-step run at the recipe's
    seq_len 256 measured +0.02 % final, 0.50 % worst step; at lr 3e-3 the exact run's own grad-norm
    spikes leave a 2-3 % offset either way: docs/mesa.md.)"""
    common = ["training.steps=100", "checkpoint.interval=1000", "data.seq_len=128", "training.lr=1e-3",
              "training.activation_checkpointing='full'"]
    run_train(tmp_path / "exact", *common)
    run_train(tmp_path / "mesa", *common, "mesa.enabled=true")
    a, b = losses(tmp_path / "exact"), losses(tmp_path / "mesa")
    assert sorted(a) == sorted(b) == list(range(1, 101))
    assert a[1] == b[1]  # the forward is exact
    assert abs(_window(b, 91, 100) - _window(a, 91, 100)) / _window(a, 91, 100) < 0.01
    worst = max(abs(b[s] - a[s]) / a[s] for s in a)
    assert 0 < worst < 0.03, worst
    assert _window(a, 91, 100) < a[1] - 1.0
