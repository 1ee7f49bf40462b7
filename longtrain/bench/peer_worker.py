"""One rank of a `longtrain bench peer` run, started by torchrun: `python -m longtrain.bench.peer_worker
{longtrain|torchtitan} SPEC.json`.

Both trainers are measured the same way here: the wall time of each call of their own `train_step`
(perf_counter around it, rank 0's numbers are the run's), the global loss of every step (longtrain's
`train_step` result; torchtitan's `MetricsProcessor.log`, logged every step), and the peak resident
memory of each rank during the training steps: /proc/self/status VmHWM, reset (`/proc/self/clear_refs`
= 5) just before the first step and read right after every step (the largest kept, so a trainer's own
reset between steps loses nothing), so imports, setup and the final checkpoint are left out
(`setup_hwm_mb` keeps the peak before the reset). Each rank writes
OUT/<trainer>.rank<R>.json.

The torchtitan side runs torchtitan 0.3.0's own `Trainer` (FSDP2 via its `parallelize_llama`, its
AdamW container, LR schedule, chunked loss) after four run-time patches that let it run on a CPU-only
torch 2.13 with gloo (docs/peer.md has the errors they avoid):

- `torchtitan/tools/utils.py:55` picks `device_type = _get_available_device_type() or "cuda"`, so
  `Trainer.__init__` calls `torch.cuda.set_device` (`trainer.py:301`): `AttributeError: module
  'torch._C' has no attribute '_cuda_setDevice'`. Patched: torch's `_get_available_device_type`
  returns "cpu" before torchtitan is imported.
- `torchtitan/components/metrics.py:42` `DeviceMemoryMonitor` calls `get_device_name`,
  `get_device_properties`, `memory_stats`, ... which `torch.cpu` lacks. Patched:
  `build_device_memory_monitor` returns a monitor that reports VmHWM.
- `torchtitan/distributed/fsdp.py:41` sets FSDP2's gradient divide factor to 1, so FSDP2
  reduce-scatters with `ReduceOp.PREMUL_SUM`: `RuntimeError: Cannot use ReduceOp.PREMUL_SUM with
  Gloo`. Patched: the FSDP modules also get `set_force_sum_reduction_for_comms(True)` (a SUM, the same
  gradients).
- `torchtitan/distributed/utils.py:586` `set_pg_timeouts` calls `barrier(device_ids=["cpu"])`
  (TypeError) and then `torch.distributed.set_timeout`, which torch 2.13 lacks. Patched: a plain barrier.

Two settings are chosen rather than patched (peer_titan.py): `parallelism.spmd_backend =
"partial_dtensor"` (the default "spmd_types" needs an FSDP2 that turns spmd_types annotations into
DTensors; torch 2.13's raises "When dp_mesh_dims is provided, all parameters must be DTensors") and
causal SDPA attention (FlexAttention has no CPU backward, varlen no CPU kernel).

Its tokenizer and dataloader are small torchtitan components defined here: the dataloader yields
longtrain's corpus samples (same global order, same dp assignment: step t, dp rank d takes samples
t*G + d*micro_batch + [0, micro_batch)), and the model starts from longtrain's initial weights
(`build_model`, same seed), loaded through torch.distributed.checkpoint's full-state-dict API, so the
two runs start from the same weights on the same data.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def rss_kib(field: str) -> int:
    """A /proc/self/status memory field (VmHWM, VmRSS) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CATEGORIES = (  # (kind, substrings of lower-cased op names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("attention", ("scaled_dot_product", "attention")),
    ("fsdp + collectives", ("fsdp", "c10d", "wait_tensor", "all_gather", "reduce_scatter", "allreduce")),
    ("optimizer", ("optimizer", "_foreach")),
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
)


def op_kind(name: str) -> str:
    """The CATEGORIES kind of a profiler op name ("other" when none matches)."""
    low = name.lower()
    for kind, keys in CATEGORIES:
        if any(k in low for k in keys):
            return kind
    return "other"


class StepRecorder:
    """Step times, losses and the training-time peak RSS of this rank."""

    def __init__(self, spec: dict[str, Any], trainer: str) -> None:
        self.steps, self.times, self.losses = spec["steps"], [], []
        self.trainer, self.out = trainer, Path(spec["out"])
        self.profile_step = spec.get("profile_step", 0) if int(os.environ.get("RANK", "0")) == 0 else 0
        self.profiler: Any = None
        self.setup_hwm_kib = self.train_hwm_kib = 0
        self.hwm_reset = False

    def before(self) -> float:
        if not self.times:
            self.setup_hwm_kib = rss_kib("VmHWM")
            self.hwm_reset = reset_hwm()
        if len(self.times) + 1 == self.profile_step:  # profiles this step to the last
            import torch.profiler

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        return time.perf_counter()

    def after(self, t0: float) -> None:
        self.times.append(time.perf_counter() - t0)
        if self.profiler is not None and len(self.times) == self.steps:
            self._write_profile(self.steps - self.profile_step + 1)
        # every step: a trainer's own reset between steps (longtrain's plan check) loses no peak
        self.train_hwm_kib = max(self.train_hwm_kib, rss_kib("VmHWM"))

    def _write_profile(self, steps: int) -> None:
        """key_averages of the profiled steps: a table (self CPU time) and, as JSON, ms per step by kind
        (CATEGORIES) and the top ops."""
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        avg = prof.key_averages()
        (self.out / f"{self.trainer}.profile.txt").write_text(
            avg.table(sort_by="self_cpu_time_total", row_limit=40))
        kinds: dict[str, float] = {}
        for e in avg:
            k = op_kind(e.key)
            kinds[k] = kinds.get(k, 0.0) + e.self_cpu_time_total / 1000 / steps
        top = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:60]
        (self.out / f"{self.trainer}.profile.json").write_text(json.dumps({
            "steps": steps, "ms_per_step": kinds,
            "top": [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total
                     / 1000 / steps} for e in top]}, indent=1))

    def write(self, extra: dict[str, Any]) -> None:
        out, trainer = self.out, self.trainer
        rank = int(os.environ.get("RANK", "0"))
        payload = {"trainer": trainer, "rank": rank, "step_times_s": self.times, "losses": self.losses,
                   "setup_hwm_mb": self.setup_hwm_kib / 1024, "train_hwm_mb": self.train_hwm_kib / 1024,
                   "hwm_reset": self.hwm_reset, **extra}
        (out / f"{trainer}.rank{rank}.json").write_text(json.dumps(payload))


def run_longtrain(spec: dict[str, Any]) -> None:
    """longtrain's own CLI (`longtrain train RECIPE --set ...`, joining this torchrun job), its
    Trainer.train_step timed from outside."""
    from longtrain.launcher import cli
    from longtrain.launcher.trainer import Trainer

    rec = StepRecorder(spec, "longtrain")
    inner = Trainer.train_step

    def timed(self):
        t0 = rec.before()
        res = inner(self)
        rec.after(t0)
        rec.losses.append(res["loss"])
        return res

    Trainer.train_step = timed
    rc = cli.main(["train", spec["recipe"], "--set", *spec["longtrain_sets"]])
    if rc:
        raise SystemExit(rc)
    rec.write({})


def _patch_torchtitan_for_cpu() -> None:
    """The four run-time patches of the module docstring (the first before torchtitan is imported)."""
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"
    import torchtitan.components.metrics as ttm

    class CpuMemoryMonitor:
        device_name, device_capacity, device_capacity_gib = "cpu", 1 << 40, 1024.0

        def get_peak_stats(self):
            gib = rss_kib("VmHWM") / 2**20
            return ttm.DeviceMemStats(gib, 100 * gib / 1024, gib, 100 * gib / 1024, 0, 0)

        def reset_peak_stats(self) -> None:
            pass

    ttm.build_device_memory_monitor = CpuMemoryMonitor
    import torchtitan.distributed.fsdp as ttf

    no_division = ttf.disable_fsdp_gradient_division

    def sum_reduction(model) -> None:  # gloo has no PREMUL_SUM: FSDP2 reduces with SUM, divides by 1
        no_division(model)
        for m in model.modules():
            if isinstance(m, ttf.FSDPModule):
                m.set_force_sum_reduction_for_comms(True)

    ttf.disable_fsdp_gradient_division = sum_reduction
    import torch.distributed as dist
    import torchtitan.distributed.utils as ttu

    def set_pg_timeouts(timeout, parallel_dims) -> None:
        # its barrier passes device_ids=["cpu"]; torch 2.13 has no dist.set_timeout: barrier only
        dist.barrier()

    ttu.set_pg_timeouts = set_pg_timeouts


def run_torchtitan(spec: dict[str, Any]) -> None:
    """torchtitan's Trainer on longtrain's data and initial weights (module docstring)."""
    _patch_torchtitan_for_cpu()
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.trainer import Trainer

    from longtrain.bench.peer_titan import build_config, load_initial_weights

    rec = StepRecorder(spec, "torchtitan")
    inner_step, inner_log = Trainer.train_step, MetricsProcessor.log

    def timed(self, data_iterator):
        t0 = rec.before()
        inner_step(self, data_iterator)
        rec.after(t0)

    def log(self, step, global_avg_loss, *args, **kwargs):
        rec.losses.append(float(global_avg_loss))
        return inner_log(self, step, global_avg_loss, *args, **kwargs)

    Trainer.train_step, MetricsProcessor.log = timed, log
    trainer = build_config(spec).build()
    try:
        load_initial_weights(trainer, spec)
        trainer.train()
    finally:
        trainer.close()
    import torch.distributed as dist

    rec.write({"attn": spec["titan"]["attn"]})
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    which, spec_path = argv
    spec = json.loads(Path(spec_path).read_text())
    {"longtrain": run_longtrain, "torchtitan": run_torchtitan}[which](spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
