"""training.optimizer_offload: FSDP2's CPUOffloadPolicy and DeepSpeed's ZeRO offload_optimizer train the
same steps as the optimizer on the device (2 gloo ranks, fp32), say so in the log, and resume from their
checkpoints; DDP and ZeRO-0 refuse it (tests/test_bad_input.py: one line, exit 2)."""

from __future__ import annotations

import pytest

from helpers import losses, run_train

SETS = ["training.steps=4", "checkpoint.interval=2", "data.seq_len=128", "training.micro_batch=2",
        "training.grad_accum=2", "training.lr=1e-3", "data.document_mask=true"]


@pytest.mark.parametrize("engine,extra", [("fsdp2", ["parallel.sp=2", "parallel.sp_impl=ring"]),
                                          ("deepspeed", ["parallel.zero_stage=2"])])
def test_offloaded_optimizer_trains_like_the_device_one(tmp_path, engine, extra):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    sets = [*SETS, f"parallel.dp_engine={engine}", *extra]
    run_train(tmp_path / "device", *sets)
    proc = run_train(tmp_path / "host", *sets, "training.optimizer_offload=true")
    assert "optimizer offload:" in proc.stdout + proc.stderr
    a, b = losses(tmp_path / "device"), losses(tmp_path / "host")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) / a[s] < 1e-5 for s in a), (a, b)
    if engine == "fsdp2":  # resume the offloaded run from step 2: the same steps 3 and 4
        resumed = tmp_path / "resumed"
        run_train(resumed, *sets, "training.optimizer_offload=true",
                  f"checkpoint.resume={tmp_path / 'host' / 'checkpoints' / 'step_00000002'}")
        c = losses(resumed)
        assert all(abs(c[s] - b[s]) / b[s] < 1e-6 for s in (3, 4)), (b, c)
