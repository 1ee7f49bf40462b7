"""Mask geometry of a block between two ranges of global positions (no kernels here).

Mask semantics (positions are global; i = query, j = key):
  causal          j <= i
  window=N        causal: i - N < j <= i (N keys including itself);
                  non-causal: |i - j| < N (symmetric, flash-attn window_size=(N-1, N-1))
  cu_seqlens      document starts over the global sequence; i and j must lie in the same
                  document (positions at or past cu_seqlens[-1] form one trailing document).
"""

from __future__ import annotations

import bisect
from typing import Sequence

import torch

Bounds = tuple[int, ...]
NEG_INF = float("-inf")


def as_bounds(cu_seqlens: torch.Tensor | Sequence[int] | None) -> Bounds | None:
    """Document boundaries as a tuple of python ints (validated), or None.

    A tuple that already carries its own device copies (kernels.documents.DocBounds, which is
    validated when built) is returned as it is, so kernels can use its cached device tensor.
    """
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, tuple) and hasattr(cu_seqlens, "on"):
        return cu_seqlens
    vals = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    vals = [int(x) for x in vals]
    if len(vals) < 2 or vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {vals}")
    return tuple(vals)


def _doc_of(pos: int, bounds: Bounds) -> int:
    return bisect.bisect_right(bounds, pos, 1) - 1


def _interval_kind(a: int, m: int, b: int, n: int, causal: bool, window: int | None) -> str:
    """Queries [a, a+m) vs keys [b, b+n), ignoring documents: 'empty' | 'full' | 'partial'."""
    qlo, qhi, klo, khi = a, a + m - 1, b, b + n - 1
    if causal:
        if klo > qhi:
            return "empty"
        if window is not None and khi <= qlo - window:
            return "empty"
        full = khi <= qlo and (window is None or klo > qhi - window)
        return "full" if full else "partial"
    if window is None:
        return "full"
    if klo > qhi + window - 1 or khi < qlo - window + 1:
        return "empty"
    full = qhi - klo < window and khi - qlo < window
    return "full" if full else "partial"


def classify_block(q_start: int, q_len: int, k_start: int, k_len: int, *, causal: bool,
                   window: int | None = None, bounds: Bounds | None = None) -> str:
    """Exact kind of the mask between global query and key ranges.

    Returns 'empty' (no visible pair: skip), 'full' (no mask needed) or 'partial'.
    """
    if q_len <= 0 or k_len <= 0:
        return "empty"
    if bounds is None:
        return _interval_kind(q_start, q_len, k_start, k_len, causal, window)
    q_end, k_end = q_start + q_len, k_start + k_len
    dq0, dq1 = _doc_of(q_start, bounds), _doc_of(q_end - 1, bounds)
    dk0, dk1 = _doc_of(k_start, bounds), _doc_of(k_end - 1, bounds)
    lo, hi = max(dq0, dk0), min(dq1, dk1)
    kinds = []
    for d in range(lo, hi + 1):
        d_start = bounds[d]
        d_end = bounds[d + 1] if d + 1 < len(bounds) else max(q_end, k_end)
        a, a2 = max(q_start, d_start), min(q_end, d_end)
        b, b2 = max(k_start, d_start), min(k_end, d_end)
        if a2 <= a or b2 <= b:
            continue
        kinds.append(_interval_kind(a, a2 - a, b, b2 - b, causal, window))
    if not kinds or all(k == "empty" for k in kinds):
        return "empty"
    single_doc = dq0 == dq1 == dk0 == dk1
    if single_doc and kinds == ["full"]:
        return "full"
    return "partial"


def _bounds_on(bounds: Bounds, device: torch.device) -> torch.Tensor:
    """int64 document starts on `device` (the DocBounds' cached copy when there is one)."""
    if hasattr(bounds, "on"):
        return bounds.on(device)
    return torch.tensor(bounds, dtype=torch.int64, device=device)


def doc_index(pos: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    b = _bounds_on(bounds, pos.device)[1:].to(pos.dtype)
    return torch.searchsorted(b, pos, right=True)


def block_mask(sq: int, sk: int, *, q_offset: int, k_offset: int, causal: bool,
               window: int | None, bounds: Bounds | None, device: torch.device) -> torch.Tensor:
    """Boolean [sq, sk] mask (True = visible) for a block at the given global offsets."""
    i = torch.arange(q_offset, q_offset + sq, device=device)[:, None]
    j = torch.arange(k_offset, k_offset + sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
        if not causal:
            keep &= j < i + window
    if bounds is not None:
        keep &= doc_index(i, bounds) == doc_index(j, bounds)
    return keep


def tile_kinds(sq: int, sk: int, *, q_offset: int, k_offset: int, causal: bool, window: int | None,
               bounds: Bounds | None, tile: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) booleans [ceil(sq/tile), ceil(sk/tile)] for the tiles of a block.

    The same rules as `classify_block`, vectorised over tiles, and conservative with documents: a
    tile is 'full' only if it lies in one document and the interval rules make it full, 'empty' only
    if the interval rules or disjoint document ranges prove it; anything else is 'partial' (the
    kernel then evaluates the exact mask inside it). Never builds the sq x sk mask; no host sync.
    """
    nq, nk = -(-sq // tile), -(-sk // tile)
    t = torch.arange(max(nq, nk), device=device, dtype=torch.int64)
    qlo = (q_offset + t[:nq] * tile)[:, None]
    qhi = (q_offset + torch.clamp((t[:nq] + 1) * tile, max=sq) - 1)[:, None]
    klo = (k_offset + t[:nk] * tile)[None, :]
    khi = (k_offset + torch.clamp((t[:nk] + 1) * tile, max=sk) - 1)[None, :]
    if causal:
        empty = klo > qhi
        full = khi <= qlo
        if window is not None:
            empty = empty | (khi <= qlo - window)
            full = full & (klo > qhi - window)
    elif window is not None:
        empty = (klo > qhi + window - 1) | (khi < qlo - window + 1)
        full = (qhi - klo < window) & (khi - qlo < window)
    else:
        empty = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        full = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if bounds is not None:
        dq0, dq1, dk0, dk1 = (doc_index(x, bounds) for x in (qlo, qhi, klo, khi))
        empty = empty | (dq1 < dk0) | (dk1 < dq0)
        full = full & (dq0 == dq1) & (dk0 == dk1) & (dq0 == dk0)
    full = full & ~empty
    return full, ~empty & ~full
