"""Document bounds of a packed micro-batch, held on the host.

`DocBounds` is `cu_seqlens` as a tuple of Python ints (0, s1, ..., S): every
kernel that needs a boundary for planning (which blocks are empty, where a
lightning state restarts) reads it without touching a device tensor, so the
model's forward and backward never wait for the device (`.tolist()`, `int()`,
`bool()` on a CUDA tensor each drain the pipeline). Kernels that need the
bounds ON the device call `on(device)`: one copy per micro-batch (pinned,
non-blocking on CUDA), cached on the object that the trainer builds once per
micro-batch and every layer and every recompute reuses.
"""

from __future__ import annotations

from typing import Sequence

import torch


class DocBounds(tuple):
    """Validated, non-decreasing document starts (0, ..., S) as host ints, with cached device copies.

    A tuple subclass: anything that takes `Sequence[int]` cu_seqlens accepts it unchanged.
    """

    _device_cache: dict
    _local_cache: dict

    def __new__(cls, values: Sequence[int]) -> "DocBounds":
        vals = tuple(int(v) for v in values)
        if len(vals) < 2 or vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {list(vals)}")
        self = super().__new__(cls, vals)
        self._device_cache, self._local_cache = {}, {}
        return self

    @property
    def total(self) -> int:
        """The sequence length the bounds cover (the last value)."""
        return self[-1]

    def on(self, device: torch.device | str) -> torch.Tensor:
        """int64 [n_docs + 1] on `device`, copied once per object (pinned + non-blocking on CUDA)."""
        dev = torch.device(device)
        t = self._device_cache.get(dev)
        if t is None:
            host = torch.tensor(self, dtype=torch.int64)
            if dev.type == "cuda":
                host = host.pin_memory()
                self._device_cache[("pinned", dev)] = host  # keep the source alive while the copy runs
            t = host.to(dev, non_blocking=True)
            self._device_cache[dev] = t
        return t

    def window(self, start: int, length: int) -> "DocBounds | None":
        """Local bounds of the tokens [start, start + length), or None when no document starts inside
        (after `start`); cached, so the window's own device copy is made once per micro-batch too."""
        key = (int(start), int(length))
        if key not in self._local_cache:
            inner = sorted({b - start for b in self[1:-1] if start < b < start + length})
            self._local_cache[key] = DocBounds((0, *inner, length)) if inner else None
        return self._local_cache[key]

    def starts_in(self, start: int, length: int) -> list[int]:
        """Interior document starts b with start <= b < start + length (b > 0), ascending."""
        return [b for b in self[1:-1] if start <= b < start + length and b > 0]

    def __reduce__(self):  # pickles (spawned workers, DataLoader) as plain values: caches are per process
        return (DocBounds, (tuple(self),))


def as_doc_bounds(cu_seqlens: torch.Tensor | Sequence[int] | None) -> DocBounds | None:
    """None, a DocBounds (returned as is), a host sequence, or a tensor (read once: call this on the
    host side, once per micro-batch, never inside a model layer)."""
    if cu_seqlens is None or isinstance(cu_seqlens, DocBounds):
        return cu_seqlens
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor [n_docs + 1]")
        return DocBounds(cu_seqlens.tolist())
    return DocBounds(cu_seqlens)


__all__ = ["DocBounds", "as_doc_bounds"]
