"""The memory settings of a training step, as rules (no torch: config validation and the planner use them).

- `checkpoint_policy`: activation checkpointing per layer, 'none' | 'full' | 'offload' | 'every:N'.
- `loss_chunk_tokens`: tokens per chunk of the output projection + loss ('auto' = a byte budget).
- `mlp_chunk_tokens`: tokens per tile of the SwiGLU MLP ('auto' = tiles only when a tile's
  intermediates would pass a byte budget; 0 = off).
"""

from __future__ import annotations

CHECKPOINT_POLICIES = ("none", "full", "offload", "every:N")

# 'auto' loss chunk: the fp32 logits of one chunk take about this many bytes (backward holds the
# softmax and its gradient as well): 256 tokens at a 128k vocabulary, 8192 (the cap) below 4k
LOSS_CHUNK_BYTES = 128 * 2**20
LOSS_CHUNK_MAX = 8192
LOSS_CHUNK_MIN = 64
# 'auto' MLP tile: tile when the [tokens, ffn] intermediates of one layer would pass this many bytes
MLP_CHUNK_BYTES = 256 * 2**20


def checkpoint_policy(setting: bool | str | None) -> str:
    """Canonical policy: 'none' | 'full' | 'offload' | 'every:N' (N >= 1; layers 0, N, 2N, ...
    are checkpointed). true/false mean full/none. Raises ValueError naming the problem."""
    if setting is True:
        return "full"
    if setting is False or setting is None:
        return "none"
    if isinstance(setting, str):
        s = setting.strip().lower()
        if s in ("none", "full", "offload"):
            return s
        if s.startswith("every:"):
            n = s[6:].strip()
            if n.isdigit() and int(n) >= 1:
                return f"every:{int(n)}"
            raise ValueError(f"'every:N' needs a whole number N >= 1, got {setting!r}")
    raise ValueError(f"unknown policy {setting!r} (use one of: {', '.join(CHECKPOINT_POLICIES)}; "
                     "true/false mean full/none)")


def checkpointed_layers(setting: bool | str | None, n_layers: int) -> int:
    """How many of `n_layers` layers a policy checkpoints (full or offload)."""
    p = checkpoint_policy(setting)
    if p == "none":
        return 0
    if p.startswith("every:"):
        n = int(p[6:])
        return (n_layers + n - 1) // n
    return n_layers


def _chunk_setting(name: str, setting: int | str) -> int | str:
    if setting == "auto":
        return "auto"
    if isinstance(setting, bool) or not isinstance(setting, int):
        raise ValueError(f"{name} must be 'auto', 0 (off) or a whole number of tokens, got {setting!r}")
    if setting < 0:
        raise ValueError(f"{name} must be >= 0 (0 = off), got {setting}")
    return setting


def check_chunk(name: str, setting: int | str) -> int | str:
    """Validate a chunk setting ('auto' or an int >= 0); raises ValueError naming `name`."""
    return _chunk_setting(name, setting)


def loss_chunk_tokens(setting: int | str, vocab_size: int) -> int:
    """Tokens per loss chunk: 'auto' (LOSS_CHUNK_BYTES of fp32 logits), 0 (all at once), or the count."""
    if _chunk_setting("loss_chunk", setting) == "auto":
        n = LOSS_CHUNK_BYTES // (4 * max(1, vocab_size))
        n = max(LOSS_CHUNK_MIN, min(LOSS_CHUNK_MAX, n))
        return n - n % 64
    return int(setting)


def mlp_chunk_tokens(setting: int | str, ffn_dim: int, tokens: int, act_bytes: int = 4) -> int:
    """Tokens per MLP tile: 'auto' tiles (at the token count whose 4 [tokens, ffn] intermediates
    take MLP_CHUNK_BYTES) only when the whole sequence would pass that budget; 0 = off."""
    if _chunk_setting("mlp_chunk", setting) == "auto":
        per_token = 4 * ffn_dim * act_bytes
        if tokens * per_token <= MLP_CHUNK_BYTES:
            return 0
        n = max(64, MLP_CHUNK_BYTES // per_token)
        return n - n % 64
    return int(setting)


__all__ = ["CHECKPOINT_POLICIES", "checkpoint_policy", "checkpointed_layers", "check_chunk", "loss_chunk_tokens",
           "mlp_chunk_tokens", "LOSS_CHUNK_BYTES", "MLP_CHUNK_BYTES"]
