"""A store for checkpointed layer inputs in host memory, prefetched back during backward.

With activation checkpointing each layer keeps only its input for backward; at long
sequences those inputs (L x tokens x dim) are the largest thing left on the device
(LLaMA-3-8B at 500k tokens: 122 GB). `OffloadStore` keeps them in host memory instead:

  forward   `put(key, x)` copies x to a pinned host buffer on a side stream (CUDA) and returns
            the host tensor; the device tensor is used for this forward only, then freed;
  backward  `take(key, x_host)` hands back the device copy, prefetched on the side stream
            while the layer after it was being recomputed, and starts the prefetch of the
            next key backward (`prefetch`).

On CPU the same code runs with plain copies (host and device are the same memory there).
Buffers are reused across steps (pinned allocations are slow). Numbers are exact copies.
"""

from __future__ import annotations

import torch
from torch import Tensor


class OffloadStore:
    """Host copies of tensors keyed by an int (the layer index); see the module doc."""

    def __init__(self) -> None:
        self._live: dict[int, Tensor] = {}        # device tensor of the forward in progress
        self._host: dict[int, Tensor] = {}        # host copies (pinned on CUDA), reused across steps
        self._grad: dict[int, bool] = {}          # did the forward's tensor require grad
        self._copied: dict[int, object] = {}      # CUDA event: device->host copy done
        self._prefetched: dict[int, tuple[Tensor, object]] = {}
        self._stream = None
        self.puts = 0
        self.takes = 0
        self.prefetch_hits = 0

    @property
    def host_bytes(self) -> int:
        """Bytes of the host buffers currently held."""
        return sum(t.numel() * t.element_size() for t in self._host.values())

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def put(self, key: int, x: Tensor) -> Tensor:
        """Copy x to host memory under `key`; x stays usable (via `take`) for the current forward."""
        self.puts += 1
        buf = self._host.get(key)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
            self._host[key] = buf
        if x.is_cuda:
            s = self._side_stream()
            s.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(s):
                buf.copy_(x.detach(), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s)
            x.record_stream(s)  # keep x's memory until the copy has read it
            self._copied[key] = ev
        else:
            buf.copy_(x.detach())
        self._live[key] = x
        self._grad[key] = x.requires_grad
        self._prefetched.pop(key, None)
        return buf

    def take(self, key: int, x_host: Tensor, device: torch.device, prefetch: int | None = None) -> Tensor:
        """The device tensor for `key`: during the forward the original one; in backward (recompute)
        a copy from host memory (prefetched if `prefetch` was asked for earlier). Then prefetch
        `prefetch` (the key that backward needs next), if given."""
        live = self._live.pop(key, None)
        if live is not None:
            return live
        self.takes += 1
        hit = self._prefetched.pop(key, None)
        if hit is not None:
            x, ev = hit
            if ev is not None:
                torch.cuda.current_stream(device).wait_event(ev)
            self.prefetch_hits += 1
        else:
            ev = self._copied.get(key)
            if ev is not None:
                ev.synchronize()
            x = x_host.to(device, copy=True)
        if prefetch is not None:
            self.prefetch(prefetch, device)
        return x.requires_grad_(self._grad.get(key, False))

    def prefetch(self, key: int, device: torch.device) -> None:
        """Start copying `key` back to `device` (side stream on CUDA; nothing to gain on CPU)."""
        buf = self._host.get(key)
        if buf is None or key in self._prefetched or device.type != "cuda":
            return
        x = torch.empty(buf.shape, dtype=buf.dtype, device=device)
        s = self._side_stream()
        s.wait_stream(torch.cuda.current_stream(device))
        ev0 = self._copied.get(key)
        with torch.cuda.stream(s):
            if ev0 is not None:
                s.wait_event(ev0)
            x.copy_(buf, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s)
        self._prefetched[key] = (x, ev)

    def clear(self) -> None:
        """Forget pending forwards and prefetches (buffers stay for reuse)."""
        self._live.clear()
        self._prefetched.clear()


__all__ = ["OffloadStore"]
