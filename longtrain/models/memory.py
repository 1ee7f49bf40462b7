"""The memory settings of a training step, as rules (no torch: config validation and the planner use them).

- `checkpoint_policy`: activation checkpointing per layer, 'none' | 'full' | 'offload' | 'every:N'.
- `loss_chunk_tokens`: tokens per chunk of the output projection + loss ('auto' = a byte budget).
- `mlp_chunk_tokens`: tokens per tile of the SwiGLU MLP ('auto' = tiles only when a tile's
  intermediates would pass a byte budget; 0 = off).
- `attn_head_chunk_heads`: query heads per attention group ('auto' = groups only when the layer's
  attention tensors would pass a byte budget; 0 = off); `check_head_chunk` validates a setting.
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
# 'auto' head groups: group when one layer's saved attention tensors would pass this many bytes
ATTN_CHUNK_BYTES = 256 * 2**20


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


def check_chunk(name: str, setting: int | str) -> int | str:
    """Validate a chunk setting ('auto' or an int >= 0); raises ValueError naming `name`."""
    if setting == "auto":
        return "auto"
    if isinstance(setting, bool) or not isinstance(setting, int):
        raise ValueError(f"{name} must be 'auto', 0 (off) or a whole number of tokens, got {setting!r}")
    if setting < 0:
        raise ValueError(f"{name} must be >= 0 (0 = off), got {setting}")
    return setting


def loss_chunk_tokens(setting: int | str, vocab_size: int) -> int:
    """Tokens per loss chunk: 'auto' (LOSS_CHUNK_BYTES of fp32 logits), 0 (all at once), or the count."""
    if check_chunk("loss_chunk", setting) == "auto":
        n = LOSS_CHUNK_BYTES // (4 * max(1, vocab_size))
        n = max(LOSS_CHUNK_MIN, min(LOSS_CHUNK_MAX, n))
        return n - n % 64
    return int(setting)


def mlp_chunk_tokens(setting: int | str, ffn_dim: int, tokens: int, act_bytes: int = 4) -> int:
    """Tokens per MLP tile: 'auto' tiles (at the token count whose 4 [tokens, ffn] intermediates
    take MLP_CHUNK_BYTES) only when the whole sequence would pass that budget; 0 = off."""
    if check_chunk("mlp_chunk", setting) == "auto":
        per_token = 4 * ffn_dim * act_bytes
        if tokens * per_token <= MLP_CHUNK_BYTES:
            return 0
        n = max(64, MLP_CHUNK_BYTES // per_token)
        return n - n % 64
    return int(setting)


def check_head_chunk(setting: int | str, n_heads: int | None = None, n_kv_heads: int | None = None) -> int | str:
    """Validate training.attn_head_chunk ('auto', 0 = off, or query heads per group). With the model's
    head counts: a group must divide the query heads and hold whole key/value groups or share one
    key/value head (a multiple or a divisor of n_heads / n_kv_heads). Raises ValueError naming it."""
    if setting == "auto":
        return "auto"
    if isinstance(setting, bool) or not isinstance(setting, int):
        raise ValueError(f"'training.attn_head_chunk' must be 'auto', 0 (off) or a whole number of query heads, "
                         f"got {setting!r}")
    if setting < 0:
        raise ValueError(f"'training.attn_head_chunk' must be >= 0 (0 = off), got {setting}")
    if setting and n_heads is not None:
        kv = n_kv_heads or n_heads
        rep = n_heads // max(1, kv)
        choices = ", ".join(map(str, head_chunk_choices(n_heads, kv)))
        if n_heads % setting:
            raise ValueError(f"'training.attn_head_chunk' = {setting} does not divide the model's {n_heads} query "
                             f"heads (use one of {choices})")
        if setting % rep and rep % setting:
            raise ValueError(f"'training.attn_head_chunk' = {setting} splits a key/value group: the model has "
                             f"{rep} query heads per key/value head (use one of {choices})")
    return setting


def head_chunk_choices(n_heads: int, n_kv_heads: int) -> list[int]:
    """Valid query heads per group (ascending; n_heads = one group, i.e. off)."""
    rep = n_heads // max(1, n_kv_heads)
    return [c for c in range(1, n_heads + 1) if n_heads % c == 0 and (c % rep == 0 or rep % c == 0)]


def head_groups_split(heads: int, kv_heads: int, degree: int) -> bool:
    """Whether a group of `heads` query / `kv_heads` key-value heads splits over `degree` Ulysses
    ranks (the rule of parallel.rules.ulysses_heads_ok, here for the model's groups)."""
    return heads % degree == 0 and (kv_heads % degree == 0 or degree % kv_heads == 0)


def attention_head_bytes(head_dim: int, n_heads: int, n_kv_heads: int, act_bytes: int) -> float:
    """Bytes of a layer's saved attention tensors per query head and token: q after RoPE and the
    output (a x head_dim each; the output projection's input is a view of the output), the head's
    share of k after RoPE and of v, and the log-sum-exp (fp32)."""
    return act_bytes * head_dim * (2 + 2 * n_kv_heads / n_heads) + 4


def attn_head_chunk_heads(setting: int | str, n_heads: int, n_kv_heads: int, tokens: int, head_bytes: float,
                          degree: int = 1) -> int:
    """Query heads per attention group; 0 = one group (off). `head_bytes`: bytes one query head's
    share of the layer's saved attention tensors takes per token. 'auto' groups only when the whole
    layer's would pass ATTN_CHUNK_BYTES, then takes the largest group under it, never below one
    key/value head's group (smaller groups would send a key/value head around the ring once per
    group) and only groups that split over `degree` Ulysses ranks."""
    c = check_head_chunk(setting)
    if c != "auto":
        return 0 if c >= n_heads else int(c)
    if tokens * head_bytes * n_heads <= ATTN_CHUNK_BYTES:
        return 0
    rep = n_heads // max(1, n_kv_heads)
    ok = [c for c in head_chunk_choices(n_heads, n_kv_heads)
          if c % rep == 0 and c < n_heads and head_groups_split(c, c // rep, degree)]
    fits = [c for c in ok if tokens * head_bytes * c <= ATTN_CHUNK_BYTES]
    return max(fits) if fits else (min(ok) if ok else 0)


__all__ = ["ATTN_CHUNK_BYTES", "attn_head_chunk_heads", "check_head_chunk", "head_chunk_choices", "head_groups_split",
           "attention_head_bytes", "CHECKPOINT_POLICIES", "checkpoint_policy", "checkpointed_layers", "check_chunk",
           "loss_chunk_tokens",
           "mlp_chunk_tokens", "LOSS_CHUNK_BYTES", "MLP_CHUNK_BYTES"]
