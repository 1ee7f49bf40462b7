"""Token-wise functions run over sequence tiles, recomputed tile by tile in backward.

`token_tiled(fn, x, chunk, params)` equals `fn(x)` for a function that acts on each token
independently (the SwiGLU MLP), but never holds fn's intermediates for more than `chunk`
tokens: forward runs the tiles without autograd and keeps only `x`; backward recomputes
one tile at a time and takes the gradients of that tile (DeepSpeed ALST's TiledMLP idea,
REFERENCES §10). Parameter gradients are returned through the function's inputs, so every
engine (FSDP2, DDP, DeepSpeed) sees one ordinary gradient per parameter.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _tiles(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int) -> Tensor:
    first = fn(x[:, :chunk])
    out = first.new_empty(x.shape[:2] + first.shape[2:])
    out[:, :chunk] = first
    del first
    for a in range(chunk, x.shape[1], chunk):
        out[:, a:a + chunk] = fn(x[:, a:a + chunk])
    return out


class _TokenTiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable[[Tensor], Tensor], chunk: int, x: Tensor, *params: Tensor) -> Tensor:
        with torch.no_grad():
            out = _tiles(fn, x, chunk)
        ctx.save_for_backward(x)
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        fn, chunk, params = ctx.fn, ctx.chunk, ctx.params
        wanted = [p for p in params if p.requires_grad]
        dx = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        acc: list[Tensor | None] = [None] * len(wanted)
        enabled, dtype = ctx.autocast
        for a in range(0, x.shape[1], chunk):
            xt = x[:, a:a + chunk].detach().requires_grad_(dx is not None)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                y = fn(xt)
            inputs = ([xt] if dx is not None else []) + wanted
            grads = torch.autograd.grad(y, inputs, grad[:, a:a + chunk], allow_unused=True)
            if dx is not None:
                dx[:, a:a + chunk] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if g is not None:
                    acc[i] = g if acc[i] is None else acc[i] + g
        it = iter(acc)
        pgrads = [next(it) if p.requires_grad else None for p in params]
        return (None, None, dx, *pgrads)


def token_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int, params: Sequence[Tensor]) -> Tensor:
    """fn(x) for x [B, S, ...] computed over tiles of `chunk` tokens along dim 1 and recomputed per
    tile in backward. `params` are the tensors fn uses that need gradients (its module's parameters).
    chunk <= 0 or >= S: plain fn(x)."""
    if chunk <= 0 or chunk >= x.shape[1]:
        return fn(x)
    if not torch.is_grad_enabled():
        return _tiles(fn, x, chunk)
    return _TokenTiled.apply(fn, int(chunk), x, *params)


__all__ = ["token_tiled"]
