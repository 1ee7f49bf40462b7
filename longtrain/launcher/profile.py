"""[profile]: torch.profiler traces of chosen steps on chosen ranks (docs/profiling.md).

Imported by the trainer only when `profile.steps` is set. Each profiled step on each profiled rank
writes, into <run folder>/profile/:

  rank<R>.<STEP>.pt.trace.json   a Chrome trace of the whole step (data, forward, backward, optimizer,
                                 checkpoint): TensorBoard's profiler plugin (torch-tb-profiler) lists it
                                 as run <name>/profile, worker rank<R>, span <STEP>; Perfetto and
                                 chrome://tracing open it as it is
  memory.rank<R>.<STEP>.pickle   (CUDA, profile.memory) the allocator's memory snapshot of the step,
                                 for https://pytorch.org/memory_viz
  rss.rank<R>.<STEP>.json        (CPU, profile.memory) the resident set sampled every 2 ms with our
                                 ranges' start and end times; also added to the trace as a counter track

Our phases are named ranges (longtrain/ranges.py), active only inside profiled steps: data, forward,
layer/<kind> per transformer block (forward hooks applied from here; inside backward they mark the
recompute of a checkpointed block), loss, backward, optimizer, checkpoint, eval, sp_attention/<impl>
and sp_comm/<post|wait|all_to_all|all_gather|reduce_scatter>.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from longtrain import ranges
from longtrain.errors import ConfigError
from longtrain.launcher.metrics import memory_mb

log = logging.getLogger("longtrain")

RSS_INTERVAL_S = 0.002
_CPU = torch.device("cpu")


def _rss_mib() -> float:
    return memory_mb(_CPU)  # the resident set, as the progress line's CPU figure


class _RssTimeline:
    """The resident set sampled in a thread, with our ranges' (name, phase, time) beside it."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, float]] = []
        self.marks: list[tuple[str, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="longtrain-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _rss_mib()))
            self._stop.wait(RSS_INTERVAL_S)

    def mark(self, name: str, phase: str, t: float) -> None:
        self.marks.append((name, phase, t))

    def start(self) -> None:
        ranges.listener = self.mark
        self._thread.start()

    def stop(self) -> None:
        ranges.listener = None
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), _rss_mib()))

    def to_json(self) -> dict[str, Any]:
        return {"unit": "MiB", "interval_s": RSS_INTERVAL_S,
                "samples": [[round(t - self.t0, 6), round(m, 2)] for t, m in self.samples],
                "ranges": [[n, ph, round(t - self.t0, 6)] for n, ph, t in self.marks]}


def _add_rss_counter(trace_path: Path, rss: _RssTimeline) -> bool:
    """Add the RSS samples to the trace as a counter track ("rss_mib"), aligned on our first range.
    Returns False (trace unchanged) when the trace has no range to align on."""
    data = json.loads(trace_path.read_text())
    events = data.get("traceEvents", [])
    first = next((n for n, ph, _ in rss.marks if ph == "B"), None)
    ev = next((e for e in events if e.get("name") == first and e.get("ph") == "X"), None) if first else None
    if ev is None:
        return False
    t_mark = next(t for n, ph, t in rss.marks if n == first and ph == "B")
    offset_us = float(ev["ts"]) - t_mark * 1e6
    pid = ev.get("pid", 0)
    events += [{"name": "rss_mib", "ph": "C", "pid": pid, "ts": t * 1e6 + offset_us, "args": {"rss_mib": m}}
               for t, m in rss.samples]
    trace_path.write_text(json.dumps(data))
    return True


class StepProfiler:
    """Profiles the recipe's [profile] steps on its ranks; `step(n)` wraps everything step n does."""

    def __init__(self, section: Any, out_dir: Path, *, rank: int, world: int, device: torch.device,
                 compiled: bool = False) -> None:
        bad = [r for r in section.ranks if r >= world]
        if bad:
            raise ConfigError(f"'profile.ranks' names rank {bad[0]}, but this run has {world} rank"
                              f"{'s' if world > 1 else ''} (0..{world - 1})")
        self.section, self.device, self.compiled = section, device, compiled
        self.steps = set(section.step_list())
        self.active = rank in section.ranks
        self.rank = rank
        self.dir = Path(out_dir) / "profile"
        self.written: list[Path] = []
        if self.active:
            self.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            log.info("profiling step%s %s on rank%s %s into %s%s", "s" if len(self.steps) > 1 else "",
                     ", ".join(map(str, sorted(self.steps))), "s" if len(section.ranks) > 1 else "",
                     ", ".join(map(str, section.ranks)), self.dir,
                     " (training.compile: no per-layer ranges, torch's own are shown)" if compiled else "")

    def _layer_hooks(self, model: nn.Module) -> list[Any]:
        """Forward hooks marking each transformer block as layer/<kind>, and the loss after the final norm."""
        handles, open_ = [], {}

        def enter(name: str, key: Any) -> None:
            r = ranges.scope(name)
            r.__enter__()
            open_.setdefault(key, []).append(r)

        def leave(key: Any) -> None:
            stack = open_.get(key)
            if stack:
                stack.pop().__exit__(None, None, None)

        if not self.compiled:
            for block in getattr(model, "layers", []):
                kind = getattr(getattr(block, "span", None), "kind", "block")
                handles.append(block.register_forward_pre_hook(lambda m, a, k=kind: enter(f"layer/{k}", id(m))))
                # always_call: a checkpoint's recompute stops the block's forward early (by raising)
                handles.append(block.register_forward_hook(lambda m, a, o: leave(id(m)), always_call=True))
        norm = getattr(model, "norm", None)
        if norm is not None:  # the loss: the output projection and cross-entropy after the final norm
            handles.append(norm.register_forward_hook(lambda m, a, o: enter("loss", "loss")))
            handles.append(model.register_forward_hook(lambda m, a, o: leave("loss"), always_call=True))
        return handles

    @contextmanager
    def step(self, n: int, model: nn.Module) -> Iterator[None]:
        """Profile step `n` (1-based) of `model` if it is one of the chosen steps on this rank; else nothing."""
        if not self.active or n not in self.steps:
            yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        cuda = self.device.type == "cuda"
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        s = self.section
        rss = _RssTimeline() if s.memory and not cuda else None
        if s.memory and cuda:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        hooks = self._layer_hooks(model)
        prof = torch.profiler.profile(activities=activities, record_shapes=s.record_shapes,
                                      profile_memory=s.memory, with_stack=s.stack)
        prof.__enter__()
        ranges.ACTIVE = True
        if rss is not None:
            rss.start()
        try:
            with ranges.scope("step"):
                yield
        finally:
            ranges.ACTIVE = False
            if rss is not None:
                rss.stop()
            for h in hooks:
                h.remove()
            prof.__exit__(None, None, None)
            self._export(n, prof, rss, cuda and s.memory)

    def _export(self, n: int, prof: Any, rss: _RssTimeline | None, snapshot: bool) -> None:
        t0 = time.perf_counter()
        trace = self.dir / f"rank{self.rank}.{n}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        files = [trace]
        if snapshot:
            files.append(self.dir / f"memory.rank{self.rank}.{n}.pickle")
            torch.cuda.memory._dump_snapshot(str(files[-1]))
            torch.cuda.memory._record_memory_history(enabled=None)
        if rss is not None:
            files.append(self.dir / f"rss.rank{self.rank}.{n}.json")
            files[-1].write_text(json.dumps(rss.to_json()))
            _add_rss_counter(trace, rss)
        self.written += files
        log.info("profile of step %d written: %s (%.1f s; open with TensorBoard's profiler plugin or "
                 "https://ui.perfetto.dev)", n, ", ".join(p.name for p in files), time.perf_counter() - t0)
