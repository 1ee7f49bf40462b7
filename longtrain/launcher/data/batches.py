"""Samples -> micro-batches that remember document boundaries, and the background prefetcher."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from longtrain.kernels.documents import DocBounds


@dataclass
class Sample:
    tokens: Tensor  # [S] input ids
    labels: Tensor  # [S] next-token targets
    doc_starts: Tensor  # starts of documents inside the sample (always includes 0), ascending


def collate(samples: Sequence[Sample], document_mask: bool) -> dict[str, Tensor | DocBounds | None]:
    """Stack samples into tokens/labels [B,S] and positions.

    With document_mask the rows are joined into one row [1, B*S] whose `cu_seqlens` marks every
    document (and row) boundary and whose positions restart at 0 in each document; this is exact
    for attention that honours cu_seqlens and lets one boundary list serve the whole micro-batch.
    `cu_seqlens` is host data (a DocBounds of Python ints), computed here once per micro-batch:
    attention plans with it and copies it to the device at most once, so no layer syncs.
    """
    tokens = torch.stack([s.tokens for s in samples])
    labels = torch.stack([s.labels for s in samples])
    S = tokens.shape[1]
    if not document_mask:
        return {"tokens": tokens, "labels": labels, "positions": torch.arange(S), "cu_seqlens": None}
    starts = np.concatenate([np.asarray(s.doc_starts, dtype=np.int64) + r * S for r, s in enumerate(samples)])
    cu = np.append(np.unique(starts), len(samples) * S)
    seg = np.searchsorted(cu[1:], np.arange(len(samples) * S), side="right")
    positions = torch.from_numpy(np.arange(len(samples) * S) - cu[seg])
    return {"tokens": tokens.reshape(1, -1), "labels": labels.reshape(1, -1), "positions": positions,
            "cu_seqlens": DocBounds(cu.tolist())}


log = logging.getLogger("longtrain")


class Prefetcher:
    """Runs `make(key)` for the next step in a background thread while the current step computes."""

    def __init__(self, make: Callable[[Any], Any], enabled: bool = True) -> None:
        self.make, self.enabled = make, enabled
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="longtrain-data") if enabled else None
        self._pending: tuple[Any, Future] | None = None
        self.last_wait_s = 0.0

    def get(self, key: Any, next_key: Any | None) -> Any:
        """The value for `key` (prefetched when it was asked for as `next_key` before); starts `next_key`."""
        t0 = time.perf_counter()
        if self._pending is not None and self._pending[0] == key:
            value = self._pending[1].result()
        else:
            if self._pending is not None:
                self._pending[1].cancel()
            value = self.make(key)
        self.last_wait_s = time.perf_counter() - t0
        self._pending = None
        if self._pool is not None and next_key is not None:
            self._pending = (next_key, self._pool.submit(self.make, next_key))
        return value

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
