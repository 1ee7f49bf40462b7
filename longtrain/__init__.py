"""longtrain: long-context LLM training (sequence parallelism, Mesa, MoH, lightning attention)."""

__version__ = "0.1.0"
