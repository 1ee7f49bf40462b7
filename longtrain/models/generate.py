"""Incremental decoding: a KV cache behind the `AttentionOps` hook, greedy and sampled generation.

The cache is an ops object (models/ops.py) handed to the ordinary `Transformer.forward` with
explicit positions, so decoding runs exactly the layers training runs. Each forward calls the
ops once per layer, in layer order (Attention, MoH and lightning layers all do), so the n-th call
of a forward belongs to layer n. Per layer the cache keeps:

  full        keys/values after RoPE, [B, T, Hkv, D] (GQA stays grouped), in a buffer that grows
              by doubling (or is sized once by `max_len`)
  window:N    only the last N-1 keys/values: the next query sees those and itself
  lightning   the recurrent state fp32 (fp64 for fp64 models) [B, H, Dk, Dv]: S = lambda S + k v^T, o = q^T S with
              lambda = exp(-decay) (kernels/lightning/naive.py); a multi-token call runs
              `lightning_attention` from that state

New queries attend to everything cached with the causal/window mask at their global positions
(`attention_block` with q_offset/k_offset), so a call may carry one token (a decode step) or
many (the prompt, or a chunk of it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from longtrain.errors import ConfigError
from longtrain.models.spans import Span

if TYPE_CHECKING:
    from longtrain.models.llama import Transformer


class KVCache:
    """Per-layer decoding state of one batch; implements `AttentionOps` (softmax, linear).

    Use through `forward_cached` (or `prefill` / `decode_step`): it numbers the layers' calls
    and advances `seen`, the number of tokens cached (= the position of the next token).
    """

    def __init__(self, spans: Sequence[Span], max_len: int | None = None) -> None:
        self.spans = list(spans)
        self.max_len = max_len
        self.seen = 0
        n = len(self.spans)
        self._k: list[Tensor | None] = [None] * n  # full: buffer [B, cap, Hkv, D]; window: last N-1 keys
        self._v: list[Tensor | None] = [None] * n
        self._len = [0] * n  # keys stored per softmax layer
        self._state: list[Tensor | None] = [None] * n  # lightning: fp32 [B, H, Dk, Dv]
        self._call: int | None = None  # index of the next layer call inside a forward, None outside
        self._new = 0  # tokens of the forward in flight
        self._broken = False

    @classmethod
    def for_model(cls, model: "Transformer", max_len: int | None = None) -> "KVCache":
        return cls(model.spans, max_len)

    # ------------------------------------------------------------------ forward bookkeeping
    def begin(self, n_tokens: int, device: torch.device) -> Tensor:
        """Start a forward of `n_tokens` new tokens; returns their positions [n_tokens] (int64)."""
        if self._broken:
            raise RuntimeError("this KVCache was left inconsistent by a failed forward; build a new one")
        if self._call is not None:
            raise RuntimeError("KVCache.begin called twice without end()")
        self._call, self._new = 0, n_tokens
        return torch.arange(self.seen, self.seen + n_tokens, device=device)

    def end(self) -> None:
        """Finish the forward started by `begin`: every layer must have called the cache once."""
        if self._call != len(self.spans):
            self._broken = True
            raise RuntimeError(f"the model made {self._call} attention calls for {len(self.spans)} layers; "
                               "the KV cache needs exactly one per layer")
        self.seen += self._new
        self._call, self._new = None, 0

    def abort(self) -> None:
        self._broken = True
        self._call = None

    def _layer(self, kind: str, q: Tensor) -> int:
        i = self._call
        if i is None:
            raise RuntimeError("KVCache used outside forward_cached/prefill/decode_step")
        if i >= len(self.spans):
            raise RuntimeError(f"more attention calls than the {len(self.spans)} layers of the cache")
        want = "linear" if self.spans[i].kind == "lightning" else "softmax"
        if kind != want:
            raise RuntimeError(f"layer {i} is {self.spans[i]} but called ops.{kind}")
        if q.shape[1] != self._new:
            raise RuntimeError(f"layer {i} got {q.shape[1]} tokens, the forward has {self._new}")
        self._call = i + 1
        return i

    # ------------------------------------------------------------------ AttentionOps
    def softmax(self, q: Tensor, k: Tensor, v: Tensor, *, window: int | None = None,
                softmax_scale: float | None = None) -> Tensor:
        """q [B,S,Hq,D] at positions seen..seen+S-1, k/v [B,S,Hkv,D] (after RoPE) -> [B,S,Hq,D]."""
        from longtrain.kernels import attention_block

        i = self._layer("softmax", q)
        S = q.shape[1]
        if window is None:
            K, V = self._append_full(i, k, v)
        else:
            K, V = self._append_window(i, k, v, window)
        out, _ = attention_block(q, K, V, causal=True, softmax_scale=softmax_scale, window=window,
                                 q_offset=self.seen, k_offset=self.seen + S - K.shape[1])
        return out

    def _append_full(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n, S = self._len[i], k.shape[1]
        buf_k, buf_v = self._k[i], self._v[i]
        if buf_k is None or buf_k.shape[1] < n + S:
            cap = max(n + S, self.max_len or 0, 2 * (buf_k.shape[1] if buf_k is not None else 0))
            B, _, H, D = k.shape
            new_k = k.new_empty(B, cap, H, D)
            new_v = v.new_empty(B, cap, H, v.shape[-1])
            if buf_k is not None and n:
                new_k[:, :n] = buf_k[:, :n]
                new_v[:, :n] = buf_v[:, :n]
            self._k[i], self._v[i] = buf_k, buf_v = new_k, new_v
        buf_k[:, n:n + S] = k
        buf_v[:, n:n + S] = v
        self._len[i] = n + S
        return buf_k[:, :n + S], buf_v[:, :n + S]

    def _append_window(self, i: int, k: Tensor, v: Tensor, window: int) -> tuple[Tensor, Tensor]:
        old_k, old_v = self._k[i], self._v[i]
        K = k if old_k is None else torch.cat([old_k, k], dim=1)
        V = v if old_v is None else torch.cat([old_v, v], dim=1)
        keep = min(window - 1, K.shape[1])
        self._k[i] = K[:, K.shape[1] - keep:].clone()
        self._v[i] = V[:, V.shape[1] - keep:].clone()
        self._len[i] = keep
        return K, V

    def linear(self, q: Tensor, k: Tensor, v: Tensor, decay: Tensor) -> Tensor:
        """q, k [B,S,H,Dk], v [B,S,H,Dv], decay [H] -> [B,S,H,Dv]; carries the state across calls."""
        i = self._layer("linear", q)
        state = self._state[i]
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32  # as the kernels
        if q.shape[1] == 1:  # one token: the recurrence itself (kernels/lightning/naive.py)
            B, _, H, Dk = q.shape
            if state is None:
                state = torch.zeros(B, H, Dk, v.shape[-1], dtype=dt, device=q.device)
            lam = torch.exp(-decay.detach().to(device=q.device, dtype=dt)).view(1, H, 1, 1)
            state = lam * state + k[:, 0].to(dt).unsqueeze(-1) * v[:, 0].to(dt).unsqueeze(-2)
            out = torch.einsum("bhd,bhde->bhe", q[:, 0].to(dt), state).unsqueeze(1).to(q.dtype)
        else:
            from longtrain.kernels import lightning_attention

            out, state = lightning_attention(q, k, v, decay, initial_state=state, return_state=True)
        self._state[i] = state.to(dt)
        return out


# ---------------------------------------------------------------------- forward passes
def forward_cached(model: "Transformer", tokens: Tensor, cache: KVCache) -> Tensor:
    """Run `tokens` [B,S] (positions cache.seen..) through the model, caching; -> logits fp32 [B,V]
    of the last position."""
    positions = cache.begin(tokens.shape[1], tokens.device)
    try:
        logits = model(tokens, positions, cache, logits="last")
    except BaseException:
        cache.abort()
        raise
    cache.end()
    return logits[:, -1]


@torch.no_grad()
def prefill(model: "Transformer", tokens: Tensor, max_len: int | None = None) -> tuple[Tensor, KVCache]:
    """Prompt [B,S] -> (logits fp32 [B,V] of its last position, a cache holding it).
    `max_len` sizes the full-attention buffers once (prompt + new tokens)."""
    cache = KVCache.for_model(model, max_len)
    return forward_cached(model, tokens, cache), cache


@torch.no_grad()
def decode_step(model: "Transformer", cache: KVCache, tokens: Tensor) -> Tensor:
    """Next token(s) [B] or [B,n] after what the cache holds -> logits fp32 [B,V] of the last one."""
    if tokens.dim() == 1:
        tokens = tokens[:, None]
    return forward_cached(model, tokens, cache)


# ---------------------------------------------------------------------- sampling
def sample_next(logits: Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """logits [B,V] -> next tokens int64 [B]: argmax at temperature 0, else a sample from
    softmax(logits / T) restricted to the top_k tokens (0 = all) and the smallest set whose
    probability reaches top_p (the most likely token is always kept)."""
    if temperature == 0:
        return logits.argmax(-1)
    lg = logits.float() / temperature
    if top_k and top_k < lg.shape[-1]:
        kth = lg.topk(top_k, dim=-1).values[:, -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = lg.sort(dim=-1, descending=True)
        p = torch.softmax(srt, dim=-1)
        drop = (p.cumsum(-1) - p) > top_p  # mass before this token already reaches top_p
        lg = lg.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = torch.softmax(lg, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def check_context(prompt_len: int, max_new_tokens: int, context: int) -> None:
    """ConfigError (one line) when prompt + new tokens exceed `context` tokens; never truncates."""
    if prompt_len + max_new_tokens > context:
        raise ConfigError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the context of "
                          f"{context} tokens; shorten the prompt or ask for fewer new tokens")


@torch.no_grad()
def generate(model: "Transformer", prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             eos_id: int | None = None, max_context: int | None = None) -> Tensor:
    """prompt int64 [B, S] (same length per row) -> new tokens int64 [B, n<=max_new_tokens]; temperature 0 = greedy.
    Stops early when every row has produced eos_id (rows that finished are padded with eos_id)."""
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ConfigError(f"prompt must be a non-empty [batch, tokens] tensor, got shape {tuple(prompt.shape)}")
    if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
        raise ConfigError(f"prompt must hold integer token ids, got {prompt.dtype}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1 "
                          f"(got {temperature}, {top_k}, {top_p})")
    B, S = prompt.shape
    check_context(S, max_new_tokens, int(max_context or model.cfg.max_seq_len))
    vocab = model.cfg.vocab_size
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= vocab:
        raise ConfigError(f"prompt token id {lo if lo < 0 else hi} is outside the model's vocabulary [0, {vocab})")
    prompt = prompt.long()
    if max_new_tokens == 0:
        return prompt.new_empty(B, 0)
    logits, cache = prefill(model, prompt, max_len=S + max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    out: list[Tensor] = []
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done = done | (nxt == eos_id)
        out.append(nxt)
        if t + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        logits = decode_step(model, cache, nxt)
    return torch.stack(out, dim=1)


__all__ = ["KVCache", "check_context", "decode_step", "forward_cached", "generate", "prefill", "sample_next"]
