"""A store for checkpointed layer inputs: on the device or in host memory, exact or 8-bit.

With activation checkpointing each layer keeps only its input for backward; at long
sequences those inputs (L x tokens x dim) are the largest thing left on the device
(LLaMA-3-8B at 500k tokens: 122 GB). `InputStore` holds them instead of the checkpoint:

  forward   `put(key, x)` records x (exact, or as a codec's payload: Mesa's 8-bit codes) and
            returns a small placeholder tensor for checkpoint to keep; the device tensor x is
            used for this forward only (`take` hands it back), then freed;
  backward  `take(key, placeholder)` hands back x rebuilt on the device (a copy back from host
            memory, prefetched on a side stream while the layer after it was being recomputed,
            and decoded when a codec stored it), and starts the prefetch of `prefetch`.

place = "host": the payload lives in pinned host buffers, copied on a side stream (CUDA); on CPU
the same code runs with plain copies (host and device are the same memory there).
place = "device": the payload stays on the device (only useful with a codec: 8-bit inputs).
Buffers are reused across steps (pinned allocations are slow). Without a codec numbers are
exact copies; a codec's own docstring says what it keeps.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class InputCodec(Protocol):
    """Encodes a layer input into named tensors (the payload) and back. A codec may also have
    `checkpoint(key, fn, *args)`, which the model then uses instead of torch's checkpoint for the
    layer (Mesa's: the recomputed layer saves its activations in 8 bits too)."""

    def encode(self, key: int, x: Tensor) -> tuple[dict[str, Tensor], Any]: ...

    def decode(self, payload: dict[str, Tensor], meta: Any) -> Tensor: ...


PLACES = ("host", "device")


class InputStore:
    """Checkpointed layer inputs keyed by an int (the layer index); see the module doc."""

    def __init__(self, place: str = "host", codec: InputCodec | None = None) -> None:
        if place not in PLACES:
            raise ValueError(f"place must be one of {PLACES}, got {place!r}")
        self.place, self.codec = place, codec
        self._live: dict[int, Tensor] = {}            # device tensor of the forward in progress
        self._payload: dict[int, dict[str, Tensor]] = {}  # what backward rebuilds x from
        self._meta: dict[int, Any] = {}
        self._grad: dict[int, bool] = {}              # did the forward's tensor require grad
        self._copied: dict[int, object] = {}          # CUDA event: device->host copy done
        self._prefetched: dict[int, tuple[dict[str, Tensor], object]] = {}
        self._stream = None
        self.puts = 0
        self.takes = 0
        self.prefetch_hits = 0

    def _bytes(self, on_host: bool) -> int:
        return sum(t.numel() * t.element_size() for p in self._payload.values() for t in p.values()
                   if (t.device.type == "cpu") == on_host)

    @property
    def host_bytes(self) -> int:
        """Bytes of the host buffers currently held (the payloads of place='host')."""
        return self._bytes(True) if self.place == "host" else 0

    @property
    def stored_bytes(self) -> int:
        """Bytes held for the stored inputs wherever they are (host buffers or device payloads)."""
        return sum(t.numel() * t.element_size() for p in self._payload.values() for t in p.values())

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _host_buffers(self, key: int, payload: dict[str, Tensor]) -> dict[str, Tensor]:
        old = self._payload.get(key, {})
        bufs = {}
        for name, t in payload.items():
            b = old.get(name)
            if b is None or b.shape != t.shape or b.dtype != t.dtype or b.device.type != "cpu":
                b = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            bufs[name] = b
        return bufs

    def _to_host(self, key: int, payload: dict[str, Tensor]) -> dict[str, Tensor]:
        bufs = self._host_buffers(key, payload)
        if any(t.is_cuda for t in payload.values()):
            s = self._side_stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for name, t in payload.items():
                    bufs[name].copy_(t.detach(), non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s)
            for t in payload.values():
                t.record_stream(s)  # keep the device memory until the copy has read it
            self._copied[key] = ev
        else:
            for name, t in payload.items():
                bufs[name].copy_(t.detach())
        return bufs

    def put(self, key: int, x: Tensor) -> Tensor:
        """Record x under `key`; x stays usable (via `take`) for the current forward. Returns the
        placeholder to hand to checkpoint (the stored copy, or the codes of a codec)."""
        self.puts += 1
        if self.codec is not None:
            with torch.no_grad():
                payload, meta = self.codec.encode(key, x.detach())
        else:
            payload, meta = {"x": x}, None
        if self.place == "host":
            payload = self._to_host(key, payload)
        elif self.codec is None:
            payload = {"x": x.detach()}  # exact on the device: what plain checkpointing keeps
        self._payload[key], self._meta[key] = payload, meta
        self._live[key] = x
        self._grad[key] = x.requires_grad
        self._prefetched.pop(key, None)
        return next(iter(payload.values()))

    def _rebuild(self, payload: dict[str, Tensor], key: int) -> Tensor:
        if self.codec is None:
            return payload["x"]
        return self.codec.decode(payload, self._meta[key])

    def take(self, key: int, placeholder: Tensor, device: torch.device, prefetch: int | None = None) -> Tensor:
        """The device tensor for `key`: during the forward the original one; in backward (recompute)
        the one rebuilt from the store (prefetched if `prefetch` was asked for earlier). Then
        prefetch `prefetch` (the key that backward needs next), if given."""
        live = self._live.pop(key, None)
        if live is not None:
            return live
        self.takes += 1
        hit = self._prefetched.pop(key, None)
        if hit is not None:
            payload, ev = hit
            if ev is not None:
                torch.cuda.current_stream(device).wait_event(ev)
            self.prefetch_hits += 1
        else:
            ev = self._copied.get(key)
            if ev is not None:
                ev.synchronize()
            payload = {n: t.to(device, copy=self.codec is None and self.place == "host")
                       for n, t in self._payload[key].items()}
        x = self._rebuild(payload, key)
        if self.place == "device":  # backward needs it once: free the codes now, not at the next put
            self._payload.pop(key, None)
            self._meta.pop(key, None)
        if prefetch is not None:
            self.prefetch(prefetch, device)
        return x.requires_grad_(self._grad.get(key, False))

    def prefetch(self, key: int, device: torch.device) -> None:
        """Start copying `key` back to `device` (side stream on CUDA; nothing to gain on CPU)."""
        payload = self._payload.get(key)
        if payload is None or self.place != "host" or key in self._prefetched or device.type != "cuda":
            return
        s = self._side_stream()
        s.wait_stream(torch.cuda.current_stream(device))
        ev0 = self._copied.get(key)
        with torch.cuda.stream(s):
            if ev0 is not None:
                s.wait_event(ev0)
            out = {n: t.to(device, non_blocking=True) for n, t in payload.items()}
            ev = torch.cuda.Event()
            ev.record(s)
        self._prefetched[key] = (out, ev)

    def clear(self) -> None:
        """Forget pending forwards and prefetches (host buffers stay for reuse; device payloads go)."""
        self._live.clear()
        self._prefetched.clear()
        if self.place == "device":
            self._payload.clear()
            self._meta.clear()


__all__ = ["InputCodec", "InputStore", "PLACES"]
