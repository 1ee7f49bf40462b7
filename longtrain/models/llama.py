"""LLaMA decoder: RMSNorm, RoPE with explicit positions, SwiGLU, GQA.

The model knows nothing about processes: attention goes through an
`AttentionOps` hook (models/ops.py) and positions are given explicitly, so a
sequence-parallel caller hands in its local tokens, their global positions and
a distributed ops object.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from longtrain.models.config import ModelConfig
from longtrain.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from longtrain.models.loss import chunked_lm_loss, chunked_token_nll
from longtrain.models.memory import (attention_head_bytes, attn_head_chunk_heads, checkpoint_policy, loss_chunk_tokens,
                                     mlp_chunk_tokens)
from longtrain.models.ops import AttentionOps, LocalAttention
from longtrain.models.spans import Span, layer_plan
from longtrain.models.tiling import token_tiled


class HeadLinear(nn.Linear):
    """nn.Linear that can apply a slice of its output rows (`rows`, with their bias) or input columns
    (`cols`: a partial sum, so no bias) only, for one group of heads. Called as a module, so engines
    that fetch weights in module hooks (DeepSpeed ZeRO-3) see every use."""

    def forward(self, x: Tensor, rows: slice | None = None, cols: slice | None = None) -> Tensor:
        if cols is not None and self.bias is not None:
            raise ValueError("a column slice of a Linear with a bias would add the bias once per group")
        w = self.weight if rows is None else self.weight[rows]
        b = self.bias if self.bias is None or rows is None else self.bias[rows]
        return F.linear(x, w if cols is None else w[:, cols], b)


class Attention(nn.Module):
    """Causal GQA softmax attention over a full or windowed span.

    With `head_chunk` (training.attn_head_chunk: query heads per group, 'auto', see
    models/memory.py; 0 = off) the heads run in groups: a group's q/k/v projections, attention and
    its share of the output projection, recomputed group by group in backward, so the layer never
    saves attention tensors for more than one group (the price: one more attention forward)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, span: Span) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = span.window if span.kind == "window" else None
        self.wq = HeadLinear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = HeadLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = HeadLinear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = HeadLinear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.head_chunk: int | str = 0
        self.head_divisor = 1  # Ulysses ranks a group's heads must split over ('auto' picks such groups)

    def group_heads(self, tokens: int, act_bytes: int) -> int:
        """Query heads per group for `tokens` tokens (0 = all heads at once)."""
        if not self.head_chunk:
            return 0
        head_bytes = attention_head_bytes(self.head_dim, self.n_heads, self.n_kv_heads, act_bytes)
        return attn_head_chunk_heads(self.head_chunk, self.n_heads, self.n_kv_heads, tokens, head_bytes,
                                     self.head_divisor)

    def _heads(self, x: Tensor, rope: tuple[Tensor, Tensor], ops: AttentionOps, first: int, n: int) -> Tensor:
        """Query heads first..first+n-1 (with their key/value heads) -> their part of the output [B,S,dim]."""
        B, S, _ = x.shape
        d, rep = self.head_dim, self.n_heads // self.n_kv_heads
        kv_first, n_kv = first // rep, max(1, n // rep)
        whole = n == self.n_heads  # no slices: the weights' gradients stay as without groups
        q_rows = None if whole else slice(first * d, (first + n) * d)
        kv_rows = None if whole else slice(kv_first * d, (kv_first + n_kv) * d)
        q = self.wq(x, rows=q_rows).view(B, S, n, d)
        k = self.wk(x, rows=kv_rows).view(B, S, n_kv, d)
        v = self.wv(x, rows=kv_rows).view(B, S, n_kv, d)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = ops.softmax(q, k, v, window=self.window)
        return self.wo(o.reshape(B, S, -1), cols=q_rows)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], ops: AttentionOps) -> Tensor:
        B, S, _ = x.shape
        n = self.group_heads(B * S, x.element_size())
        if not n or n >= self.n_heads:
            return self._heads(x, rope, ops, 0, self.n_heads)
        grad = torch.is_grad_enabled()
        out = None
        for first in range(0, self.n_heads, n):
            y = (checkpoint(self._heads, x, rope, ops, first, n, use_reentrant=False, preserve_rng_state=False)
                 if grad else self._heads(x, rope, ops, first, n))
            out = y if out is None else out + y
        return out


class SwiGLU(nn.Module):
    """x [B,S,dim] -> [B,S,dim]. With a `chunk` (training.mlp_chunk: tokens, or 'auto', see
    models/memory.py) the MLP runs over tiles of that many tokens and is recomputed per tile in
    backward: no [S, hidden] tensor exists. 0 = the whole sequence at once."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.chunk: int | str = 0

    def _mlp(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x: Tensor) -> Tensor:
        B, S = x.shape[0], x.shape[1]
        n = mlp_chunk_tokens(self.chunk, self.w1.out_features, B * S, x.element_size()) if self.chunk else 0
        tile = max(1, n // B) if n else 0
        if tile and S > tile:
            return token_tiled(self._mlp, x, tile, list(self.parameters()))
        return self._mlp(x)


def _make_mixer(cfg: ModelConfig, layer_idx: int, span: Span) -> nn.Module:
    if span.kind == "lightning":
        from longtrain.models.lightning import LightningAttention

        return LightningAttention(cfg.dim, cfg.n_heads, cfg.head_dim, layer_idx, cfg.n_layers, cfg.norm_eps)
    if cfg.moh is not None:
        from longtrain.models.moh import MoHAttention

        return MoHAttention(cfg, layer_idx, span)
    return Attention(cfg, layer_idx, span)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, span: Span) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.span = span
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = _make_mixer(cfg, layer_idx, span)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)
        self.mesa_scope: Any = None  # set by enable_mesa(): a callable returning a context manager

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], ops: AttentionOps) -> Tensor:
        ctx = self.mesa_scope() if self.mesa_scope is not None else nullcontext()
        with ctx:
            h = self.attn_norm(x)
            if self.span.kind == "lightning":
                h = self.attn(h, attn_fn=ops.linear)
            else:
                h = self.attn(h, rope, ops)
            x = x + h
            return x + self.mlp(self.mlp_norm(x))


class _SkipInitOnMeta(torch.overrides.TorchFunctionMode):
    """nn.Linear / nn.Embedding initialisers return at once on meta tensors: there are no values to
    draw, and their meta path (torch._refs) imports torch._dynamo, about 1 s in every process."""

    _INITIALISERS = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                               "xavier_uniform_", "xavier_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self._INITIALISERS:
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


class Transformer(nn.Module):
    """Decoder-only LM.

    forward(tokens [B,S], positions [S] or [B,S], ops) -> logits [B,S,V] (fp32; `logits="last"`:
    [B,1,V], the last position only, as decoding needs), or with `labels`
    [B,S] (-100 = not counted) the summed cross-entropy (0-d fp32; `reduction="none"`: per-token
    NLL fp32 [B,S] and argmax [B,S], no grad) computed in token chunks (the `loss_chunk` argument:
    'auto' | 0 | tokens, see models/memory.py), so no [S, V] tensor exists. Memory settings
    (attributes): `activation_checkpointing` (a policy, see `checkpoint_policy`),
    `set_mlp_chunk(tokens)`, `set_attn_head_chunk(heads)`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.spans = layer_plan(cfg.attention, cfg.n_layers)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i, s) for i, s in enumerate(self.spans))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
                             persistent=False)
        self.activation_checkpointing: bool | str = False
        self.input_codec: Any = None  # kernels.offload.InputCodec: 8-bit checkpointed inputs (set by Mesa)
        self.input_stores: dict[str, Any] = {}  # kernels.offload.InputStore per place, made on first use
        if not self.output.weight.is_meta:  # meta holds no values: whoever materialises it fills them
            self.init_weights()

    @classmethod
    def on_meta(cls, cfg: ModelConfig) -> "Transformer":
        """The model on the meta device (shapes only, no memory): give it memory with `to_empty`,
        then values (init_weights / a checkpoint) and `reset_buffers`."""
        with torch.device("meta"), _SkipInitOnMeta():
            return cls(cfg)

    def init_weights(self, seed: int | None = None,
                     write: Callable[[Tensor, Tensor], None] | None = None) -> None:
        """Normal(0, init_std) for matrices, output projections scaled by 1/sqrt(2 L); norms at 1.

        `write(param, full_value)` stores a value (default: copy); a sharded caller copies only
        its own slice, so the same seed gives the same weights at any world size."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        write = write or (lambda p, v: p.copy_(v))
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, RMSNorm):
                    write(m.weight, torch.ones(m.weight.shape))
                elif isinstance(m, (nn.Linear, nn.Embedding)):
                    s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo", "w2", "out_proj")) else std
                    write(m.weight, torch.randn(m.weight.shape, generator=gen) * s)
                    if getattr(m, "bias", None) is not None:
                        write(m.bias, torch.zeros(m.bias.shape))
                elif hasattr(m, "init_extra_parameters"):
                    m.init_extra_parameters(write)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE frequencies, lightning decays), e.g. after
        the model was built on the meta device and materialised with `to_empty`."""
        self.set_rope()
        for m in self.modules():
            if m is not self and hasattr(m, "reset_buffers"):
                m.reset_buffers()

    def set_rope(self, theta: float | None = None, scaling: dict[str, Any] | None = None) -> None:
        """Change RoPE base/scaling (staged long-context continue-tuning)."""
        if theta is not None:
            self.cfg.rope_theta = theta
        if scaling is not None:
            self.cfg.rope_scaling = scaling
        self.inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling).to(
            self.inv_freq.device)

    def set_mlp_chunk(self, tokens: int | str) -> None:
        """Run every SwiGLU MLP over tiles of `tokens` tokens ('auto': models/memory.py; 0 = off)."""
        for m in self.modules():
            if isinstance(m, SwiGLU):
                m.chunk = tokens

    def set_attn_head_chunk(self, heads: int | str, divisor: int = 1) -> None:
        """Run softmax attention in groups of `heads` query heads ('auto': models/memory.py; 0 = off);
        'auto' picks groups whose heads split over `divisor` (the Ulysses degree). MoH and lightning
        layers are not grouped (MoH routes heads per token; lightning keeps a [heads, D, D] state,
        not per-token attention tensors)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.head_chunk, m.head_divisor = heads, divisor

    def _layer_checkpointing(self, i: int) -> str:
        policy = checkpoint_policy(self.activation_checkpointing)
        if policy.startswith("every:"):
            return "full" if i % int(policy[6:]) == 0 else "none"
        return policy

    @property
    def offload_store(self) -> Any:
        """The host store of 'offload' (None before the first offloaded forward)."""
        return self.input_stores.get("host")

    def _input_store(self, place: str) -> Any:
        store = self.input_stores.get(place)
        if store is None or store.codec is not self.input_codec:
            from longtrain.kernels.offload import InputStore

            store = self.input_stores[place] = InputStore(place, self.input_codec)
        return store

    def _stored(self, i: int, layer: nn.Module, h: Tensor, rope: tuple[Tensor, Tensor],
                ops: AttentionOps, place: str) -> Tensor:
        """Checkpointed layer whose input waits in an InputStore (kernels/offload.py) until backward:
        in host memory ('offload') and/or as 8-bit codes (`input_codec`)."""
        store, device = self._input_store(place), h.device
        held = store.put(i, h)

        def run(hh: Tensor, rope_: tuple[Tensor, Tensor], ops_: AttentionOps) -> Tensor:
            # forward: the device tensor itself; recompute: rebuilt from the store (prefetching layer i-1's)
            return layer(store.take(i, hh, device, prefetch=i - 1 if i > 0 else None), rope_, ops_)

        recompute = getattr(self.input_codec, "checkpoint", None)  # Mesa: the recompute saves 8-bit copies
        if recompute is not None:
            return recompute(i, run, held, rope, ops)
        return checkpoint(run, held, rope, ops, use_reentrant=False)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, ops: AttentionOps | None = None,
                labels: Tensor | None = None, reduction: str = "sum",
                logits: str = "all", loss_chunk: int | str = "auto") -> Tensor | tuple[Tensor, Tensor]:
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        B, S = tokens.shape
        if positions is None:
            positions = torch.arange(S, device=tokens.device)
        ops = ops if ops is not None else LocalAttention()
        rope = rope_cos_sin(positions, self.inv_freq)
        h = self.tok_embeddings(tokens)
        grad = self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kind = self._layer_checkpointing(i) if grad else "none"
            if kind == "full" and self.input_codec is None:
                h = checkpoint(layer, h, rope, ops, use_reentrant=False)
            elif kind in ("full", "offload"):
                h = self._stored(i, layer, h, rope, ops, "host" if kind == "offload" else "device")
            else:
                h = layer(h, rope, ops)
        if labels is None and logits == "last":
            h = h[:, -1:]
        h = self.norm(h)
        if labels is None:
            return self.output(h).float()
        chunk = loss_chunk_tokens(loss_chunk, self.cfg.vocab_size)
        if reduction == "none":
            return chunked_token_nll(h, self.output.weight, labels, chunk)
        if reduction != "sum":
            raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
        return chunked_lm_loss(h, self.output.weight, labels, chunk)

    def aux_loss(self) -> Tensor | None:
        """Sum of auxiliary losses (MoH load balance) from the last forward, or None."""
        losses = [m.last_aux_loss for m in self.modules()
                  if getattr(m, "last_aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None


def lm_loss_sum(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed token cross-entropy and the number of counted targets (divide by the GLOBAL count)."""
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    return loss, (labels != ignore_index).sum()
