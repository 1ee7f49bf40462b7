"""Training parity: the tiny recipe with sp=2 (each impl) gives the same per-step losses as sp=1
(within 1e-4 relative over 20 fp32 steps), for all-full models and for mixed spans
(full + window + lightning layers)."""

from __future__ import annotations

import pytest

from helpers import losses, run_train

STEPS = 20
COMMON = [f"training.steps={STEPS}", "checkpoint.interval=100", "data.seq_len=128", "training.micro_batch=2",
          "training.lr=3e-3"]
# Models with lightning layers are far more sensitive to round-off at high learning rates: two sp=1
# runs that differ only in the data-parallel reduction order drift apart by ~1e-2 within 15 steps
# at lr 3e-3 (and 1e-3), while all-softmax models stay at ~1e-7. At lr 5e-4 the same dp=1 vs dp=2
# comparison stays below 2e-6 over 20 steps (20 warmup steps), so sp parity can be asserted at 1e-4 there.
MIXED = ["model.attention=['full','window:48','lightning','window:17']", "training.lr=5e-4",
         "training.warmup=20"]


class _Baselines(dict):
    """sp=1 reference losses, computed once per module on first use."""

    def __init__(self, factory):
        super().__init__()
        self.factory = factory

    def __missing__(self, name):
        d = self.factory.mktemp(f"sp1-{name}")
        run_train(d, *COMMON, *({"full": [], "mixed": MIXED}[name]), "parallel.sp=1", nproc=1)
        self[name] = losses(d)
        return self[name]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    return _Baselines(tmp_path_factory)


def _assert_close(a: dict[int, float], b: dict[int, float], fall: float = 0.5) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst <= 1e-4, f"max relative loss difference {worst:.3g}"
    assert a[STEPS] < a[1] - fall  # and it actually trained


@pytest.mark.parametrize("impl", ["ring", "tokenring", "ulysses", "hybrid"])
def test_sp2_matches_sp1(impl, baselines, tmp_path):
    run_train(tmp_path, *COMMON, "parallel.sp=2", f"parallel.sp_impl={impl}", nproc=2)
    _assert_close(baselines["full"], losses(tmp_path))


def test_dp2_sp2_matches_sp1(baselines, tmp_path):
    # 4 ranks = dp 2 x sp 2, micro_batch 1 each: the same 2 samples per step as 1 rank x micro_batch 2
    run_train(tmp_path, *COMMON, "training.micro_batch=1", "parallel.sp=2", "parallel.sp_impl=tokenring", nproc=4)
    _assert_close(baselines["full"], losses(tmp_path))


@pytest.mark.parametrize("impl,layout", [("tokenring", "zigzag"), ("ring", "contiguous")])
def test_mixed_spans_sp2_matches_sp1(impl, layout, baselines, tmp_path):
    run_train(tmp_path, *COMMON, *MIXED, "parallel.sp=2", f"parallel.sp_impl={impl}",
              f"parallel.sp_layout={layout}", nproc=2)
    _assert_close(baselines["mixed"], losses(tmp_path), fall=0.2)


def test_sp2_with_document_mask_matches_sp1(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(a, *COMMON, "data.document_mask=true", nproc=1)
    run_train(b, *COMMON, "data.document_mask=true", "parallel.sp=2", nproc=2)
    _assert_close(losses(a), losses(b))
