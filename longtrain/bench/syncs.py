"""Count device->host synchronisations of a region of code (a training step, a forward).

On any device: every `aten._local_scalar_dense` (the op behind `.item()`, `int(t)`,
`float(t)`, `bool(t)`) and every `Tensor.tolist()` (which reads the data directly and
so bypasses the dispatcher). On CPU these are not real waits, but each is one on CUDA,
so counting them on CPU finds the code that would drain a GPU pipeline. On CUDA the
counter also collects torch's own sync-debug warnings (`torch.cuda.set_sync_debug_mode`),
which see every synchronising copy as well.

    with HostSyncCounter() as c:
        trainer.train_step()
    print(c.count, c.sites.most_common(3))
"""

from __future__ import annotations

import collections
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _site() -> str:
    """The innermost longtrain frame that asked for the value (file:line), or '?'."""
    for f in reversed(traceback.extract_stack()[:-3]):
        if "/longtrain/" in f.filename and not f.filename.endswith("bench/syncs.py"):
            return f"{f.filename.split('/longtrain/')[-1]}:{f.lineno}"
    return "?"


class _ScalarReads(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counter._hit()
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """Context manager: `count` host syncs (see the module doc), `sites` by longtrain call site,
    `cuda_syncs` (CUDA only: torch's sync-debug warnings inside the region)."""

    def __init__(self, sites: bool = True) -> None:
        self.count = 0
        self.cuda_syncs = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._want_sites = sites
        self._mode = _ScalarReads(self)
        self._orig_tolist = None
        self._warn_ctx = None
        self._cuda_mode = None

    def _hit(self) -> None:
        self.count += 1
        if self._want_sites:
            self.sites[_site()] += 1

    def __enter__(self) -> "HostSyncCounter":
        orig = torch.Tensor.tolist
        counter = self

        def tolist(t: torch.Tensor):
            counter._hit()
            return orig(t)

        self._orig_tolist = orig
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            self._warn_ctx = warnings.catch_warnings(record=True)
            self._records = self._warn_ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        torch.Tensor.tolist = self._orig_tolist  # type: ignore[method-assign]
        if self._warn_ctx is not None:
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
            self.cuda_syncs = sum("synchroniz" in str(w.message) for w in self._records)
            self._warn_ctx.__exit__(*exc)


def count_step_syncs(recipe_path: str, sets: list[str], steps: int = 2) -> dict[str, dict]:
    """Host syncs of `steps` training steps (after one warm-up step) in this process, without and with
    data.document_mask: {"plain"|"documents": {"per_step", "cuda_per_step", "sites"}}."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = {}
    for arm, dm in (("plain", "false"), ("documents", "true")):
        trainer = Trainer(load_recipe(recipe_path, [*sets, f"data.document_mask={dm}", "data.prefetch=false"]))
        trainer.train_step()
        trainer.step += 1
        with HostSyncCounter() as c:
            for _ in range(steps):
                trainer.train_step()
                trainer.step += 1
        out[arm] = {"per_step": c.count / steps, "cuda_per_step": c.cuda_syncs / steps,
                    "sites": dict(c.sites.most_common(12))}
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m longtrain.bench.syncs RECIPE [--set k=v ...]`: host syncs per step with and without
    document masks, as one JSON line (make gpu-check runs it on CUDA, where torch's sync-debug mode
    sees every synchronising copy too)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m longtrain.bench.syncs", description=main.__doc__)
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)
    res = count_step_syncs(a.recipe, a.sets, a.steps)
    res["added_per_step"] = res["documents"]["per_step"] - res["plain"]["per_step"]
    res["cuda_added_per_step"] = res["documents"]["cuda_per_step"] - res["plain"]["cuda_per_step"]
    print(json.dumps(res), flush=True)
    import torch.distributed as dist

    if dist.is_initialized():
        from longtrain.parallel.comm import close_process_groups
        close_process_groups()
    return 0


__all__ = ["HostSyncCounter", "count_step_syncs"]

if __name__ == "__main__":
    raise SystemExit(main())
