"""Planned vs measured in every run: the planner's memory (and, on GPUs it knows, step time) for this
run's exact layout beside what the run measures (docs/profiling.md).

Measured at the second step of the run (the first creates the AdamW state and pays one-off costs),
and again at the second step after a stage changes the sequence length. Memory:
  CUDA  torch.cuda.max_memory_allocated over the step (peak statistics reset before it);
  CPU   what lives across steps (parameters and optimizer state, counted from the tensors) plus how far
        the resident set rose above its level at the start of the step (VmHWM, reset through
        /proc/self/clear_refs; file-backed pages mapped in meanwhile not counted): the process's own
        overhead (interpreter, libraries, thread pools, allocator slack) stays out, as the planner's
        device figure leaves it out. glibc may serve a step from heap it kept from the last one, which
        hides that part of the rise: MALLOC_MMAP_THRESHOLD_=65536 (as `longtrain bench memory` sets)
        makes the CPU figure exact.
The planner's figure is launcher/sizing.recipe_memory at the step's sequence length (on CPU plus the
offloaded inputs: host and device are one memory). Parameters and optimizer state are also measured
exactly (the local tensors' bytes), so a gap is named: the component that differs most.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("longtrain")

GiB = 2**30
TOLERANCE = 0.25  # a warning above this relative gap ...
MIN_GAP_BYTES = 128 * 2**20  # ... when it is also this large (tiny CPU runs: allocator noise)
ASSUMED_MFU = 0.45  # `longtrain plan`'s default --mfu


def _status_bytes(*keys: str) -> dict[str, int]:
    out = dict.fromkeys(keys, 0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in out:
                    out[k] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass  # the peak then counts from the start of the process: an upper bound


def measured_peak(device: torch.device, start: dict[str, int], persistent: float) -> float:
    """Bytes of this process's tensors at the step's peak (module doc); `start`: VmRSS and RssFile when the
    step began, `persistent`: the bytes of what lived then (CPU only)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    now = _status_bytes("VmHWM", "RssFile")
    return persistent + max(0.0, float(now["VmHWM"] - start["VmRSS"] - max(0, now["RssFile"] - start["RssFile"])))


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size() if t.device.type != "meta" else 0


def state_bytes(model: torch.nn.Module, optimizer: Any) -> tuple[float, float | None]:
    """(parameter bytes, optimizer-state bytes or None when the engine hides its optimizer) on this rank's
    training device (state offloaded to the host, optimizer_offload, is not counted on a GPU)."""
    params = float(sum(_local_bytes(p) for p in model.parameters()))
    state = getattr(optimizer, "state", None)
    if not isinstance(state, dict):
        return params, None
    opt = sum(_local_bytes(v) for s in state.values() for v in s.values()
              if isinstance(v, torch.Tensor) and v.dim() > 0)
    return params, float(opt)


def gpu_key(name: str, memory_gib: float) -> str | None:
    """The planner's GPU kind (sizing.GPUS) for a CUDA device name, or None when the planner has none."""
    n = name.upper()
    for tag, key in (("H200", "h200"), ("B200", "b200"), ("L40S", "l40s")):
        if tag in n:
            return key
    if "H100" in n:
        return "h100-pcie" if "PCIE" in n else "h100"
    if "A100" in n:
        return "a100" if memory_gib > 60 else "a100-40g"
    if "A10" in n:
        return "a10"
    return None


class PlanCheck:
    """Compares the planner with the run at the steps the module doc names; reports on rank 0."""

    def __init__(self, recipe: Any, cfg: Any, model: torch.nn.Module, optimizer: Any, *, world: int, sp: int,
                 impl: str, device: torch.device, replicate: int = 1, is_main: bool = True) -> None:
        self.recipe, self.cfg, self.model, self.optimizer = recipe, cfg, model, optimizer
        self.world, self.sp, self.impl = world, sp, impl
        self.device, self.replicate, self.is_main = device, replicate, is_main
        self.pending: int | None = None  # the step to measure
        self.seen_seq: int | None = None
        self.start: dict[str, int] = {}
        self.persistent = 0.0

    def before(self, n: int) -> None:
        """Called before step `n` (1-based) runs."""
        if n == self.pending:
            params, opt = state_bytes(self.model, self.optimizer)
            self.persistent = params + (opt or 0.0)
            reset_peak(self.device)
            self.start = _status_bytes("VmRSS", "RssFile")

    def planned_memory(self, seq_len: int) -> Any:
        from longtrain.launcher.sizing import recipe_memory

        return recipe_memory(self.recipe, self.cfg, world=self.world, sp=self.sp, seq_len=seq_len,
                             replicate=self.replicate)

    def after(self, n: int, seq_len: int, last_step: int, step_time_s: float) -> dict[str, float]:
        """After step `n` ran at `seq_len`: the scalars to log, printing the comparison on a measured step
        (the next one after a new length, or this one when it is the last); else {}."""
        if seq_len != self.seen_seq:  # the run's first step, or a stage changed the length
            self.seen_seq = seq_len
            self.pending = n + 1 if n < last_step else n
        if n != self.pending:
            return {}
        self.pending = None
        return self._measure(n, seq_len, step_time_s)

    def _measure(self, n: int, seq_len: int, step_time_s: float) -> dict[str, float]:
        m = self.planned_memory(seq_len)
        params, opt = state_bytes(self.model, self.optimizer)
        if not self.start:  # the only step of a run: measured from the start of the process, an upper bound
            self.start = {"VmRSS": 0, "RssFile": 0}
        peak = measured_peak(self.device, self.start, self.persistent)
        vals = torch.tensor([peak, params, -1.0 if opt is None else opt],
                            dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(vals, op=dist.ReduceOp.MAX)  # the fullest rank
        peak, params, opt = vals.tolist()
        host = m.host_offload if self.device.type != "cuda" else 0.0
        planned = {"total": m.total + host, "params": m.params, "optimizer": m.optimizer}
        measured = {"total": peak, "params": params, "optimizer": opt if opt >= 0 else None}
        scalars = {"memory/planned_gib": planned["total"] / GiB, "memory/measured_gib": peak / GiB}
        for k in ("params", "optimizer"):
            scalars[f"memory/planned/{k}_gib"] = planned[k] / GiB
            if measured[k] is not None:
                scalars[f"memory/measured/{k}_gib"] = measured[k] / GiB
        rest_p = planned["total"] - planned["params"] - planned["optimizer"]
        rest_m = None if measured["optimizer"] is None else peak - params - measured["optimizer"]
        scalars["memory/planned/rest_gib"] = rest_p / GiB
        if rest_m is not None:
            scalars["memory/measured/rest_gib"] = rest_m / GiB
        scalars.update(self._step_time(seq_len, step_time_s))
        if self.is_main:
            self._report(n, seq_len, m, planned, measured, rest_p, rest_m, scalars)
        return scalars

    def _step_time(self, seq_len: int, measured_s: float) -> dict[str, float]:
        """The planner's step time at its assumed MFU on a GPU it knows (else nothing)."""
        if self.device.type != "cuda":
            return {}
        from longtrain.launcher.sizing import GPUS, INTERCONNECTS, step_time

        props = torch.cuda.get_device_properties(self.device)
        key = gpu_key(props.name, props.total_memory / GiB)
        if key is None:
            return {}
        t, p = self.recipe.training, self.recipe.parallel
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or self.world)
        st = step_time(self.cfg, GPUS[key], INTERCONNECTS["ib"][0], world=self.world, sp=self.sp, impl=self.impl,
                       micro_batch=t.micro_batch, grad_accum=t.grad_accum, seq_len=seq_len, dtype=t.dtype,
                       engine=p.dp_engine, checkpointing=t.activation_checkpointing, mfu=ASSUMED_MFU,
                       gpus_per_node=min(local, self.world), ulysses_degree=p.ulysses_degree,
                       zero_stage=p.zero_stage, loss_chunk=t.loss_chunk, mlp_chunk=t.mlp_chunk,
                       replicate=self.replicate, attn_head_chunk=t.attn_head_chunk)
        return {"perf/planned_step_time_s": st.step_s, "perf/measured_step_time_s": measured_s,
                "perf/planned_mfu": ASSUMED_MFU}

    def _report(self, n: int, seq_len: int, m: Any, planned: dict, measured: dict, rest_p: float,
                rest_m: float | None, scalars: dict[str, float]) -> None:
        def g(x: float | None) -> str:
            return "n/a" if x is None else f"{x / GiB:.3g}"

        gap = measured["total"] / planned["total"] - 1 if planned["total"] > 0 else 0.0
        where = "peak allocated" if self.device.type == "cuda" else "peak resident (host = device on CPU)"
        log.info("plan vs measured, step %d (seq %d): memory %s GiB planned, %s GiB measured %s (%+.0f%%%s) | "
                 "params %s/%s, optimizer %s/%s, activations and the rest %s/%s GiB (planned/measured)", n, seq_len,
                 g(planned["total"]), g(measured["total"]), where, 100 * gap,
                 ", the fullest of all ranks" if self.world > 1 else "", g(planned["params"]), g(measured["params"]),
                 g(planned["optimizer"]), g(measured["optimizer"]), g(rest_p), g(rest_m))
        if abs(gap) > TOLERANCE and abs(measured["total"] - planned["total"]) > MIN_GAP_BYTES:
            log.warning("measured memory differs from the plan by %+.0f%% (more than %.0f%%): %s", 100 * gap,
                        100 * TOLERANCE, self._largest_gap(m, planned, measured, rest_p, rest_m))
        if "perf/planned_step_time_s" in scalars:
            ps, ms = scalars["perf/planned_step_time_s"], scalars["perf/measured_step_time_s"]
            log.info("plan vs measured, step %d: step time %.3g s planned (at MFU %.2f), %.3g s measured (%.2fx)",
                     n, ps, ASSUMED_MFU, ms, ms / ps if ps else float("nan"))
            if ps and abs(ms / ps - 1) > TOLERANCE:
                log.warning("step %d took %.2fx the planned time (the plan assumes MFU %.2f; measured MFU is about "
                            "%.2f); step 2 can still hold one-off compilation", n, ms / ps, ASSUMED_MFU,
                            ASSUMED_MFU * ps / ms)

    @staticmethod
    def _largest_gap(m: Any, planned: dict, measured: dict, rest_p: float, rest_m: float | None) -> str:
        """Which component differs most, with the plan's largest item of the rest."""
        gaps = {k: measured[k] - planned[k] for k in ("params", "optimizer") if measured[k] is not None}
        if rest_m is not None:
            gaps["activations and the rest"] = rest_m - rest_p
        items = {"activations": m.activations, "logits and loss": m.logits, "gradients": m.grads,
                 "gathered layers and optimizer temporaries": m.transient, "offloaded inputs": m.host_offload}
        big = max(items, key=items.get)
        if not gaps:
            return f"the largest planned component is {big} ({items[big] / GiB:.3g} GiB)"
        worst = max(gaps, key=lambda k: abs(gaps[k]))
        tail = (f"; of it the plan's largest is {big} ({items[big] / GiB:.3g} GiB)"
                if worst == "activations and the rest" else "")
        return (f"the largest gap is {worst}: {gaps[worst] / GiB:+.3g} GiB against its plan{tail} "
                "(docs/profiling.md: reading the comparison)")
