"""Per-layer attention kinds (MASFormer-style mixed spans).

A plan is a list of strings, one of:
  "full"        causal softmax attention over the whole context
  "window:N"    causal sliding window of N keys, the query's own token included
  "lightning"   lightning (linear) attention with per-head decay
A plan shorter than the model repeats (its length must divide n_layers);
a plan as long as the model is taken layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("full", "window", "lightning")


@dataclass(frozen=True)
class Span:
    kind: str  # "full" | "window" | "lightning"
    window: int | None = None

    def __str__(self) -> str:
        return f"window:{self.window}" if self.kind == "window" else self.kind


def parse_span(text: str) -> Span:
    """Parse one plan entry; raises ValueError naming the bad entry."""
    if not isinstance(text, str):
        raise ValueError(f"attention plan entry {text!r} must be a string like 'full', 'window:1024' or 'lightning'")
    s = text.strip().lower()
    if s == "full":
        return Span("full")
    if s == "lightning":
        return Span("lightning")
    if s.startswith("window:"):
        n = s.split(":", 1)[1]
        try:
            w = int(n)
        except ValueError:
            raise ValueError(f"attention plan entry {text!r}: window size {n!r} is not an integer") from None
        if w <= 0:
            raise ValueError(f"attention plan entry {text!r}: window size must be > 0")
        return Span("window", w)
    raise ValueError(f"attention plan entry {text!r}: unknown kind (use 'full', 'window:N' or 'lightning')")


def layer_plan(plan: list[str] | tuple[str, ...], n_layers: int) -> list[Span]:
    """Expand a plan to exactly `n_layers` spans (repeat a shorter pattern)."""
    if not plan:
        raise ValueError("attention plan is empty: give at least one entry, e.g. ['full']")
    spans = [parse_span(p) for p in plan]
    if len(spans) > n_layers:
        raise ValueError(f"attention plan has {len(spans)} entries but the model has only {n_layers} layers")
    if n_layers % len(spans):
        raise ValueError(f"attention plan of {len(spans)} entries does not divide the {n_layers} layers; "
                         "give a pattern whose length divides n_layers or one entry per layer")
    return spans * (n_layers // len(spans))


def attention_flops_fraction(spans: list[Span], seq_len: int) -> float:
    """Causal attention FLOPs of the plan relative to all-full layers at `seq_len` (lightning ~ 0)."""
    total = 0.0
    for s in spans:
        if s.kind == "full":
            total += 1.0
        elif s.kind == "window":
            w = min(s.window or seq_len, seq_len)
            # causal full ~ S^2/2 key visits, window ~ S*W - W^2/2
            total += (seq_len * w - w * w / 2) / (seq_len * seq_len / 2)
    return total / len(spans)
