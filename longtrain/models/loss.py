"""Output projection + cross-entropy in token chunks: no `[S, vocab]` tensor in forward or backward.

`chunked_lm_loss(h, weight, labels, chunk)` returns the summed token cross-entropy of
`logits = h @ weight.T` (fp32 per chunk) without ever holding the logits of more than
`chunk` tokens. Forward keeps only `h`, the weight and the per-token log-sum-exp (fp32,
O(S)); backward recomputes each chunk's logits, forms `softmax - onehot` and accumulates
`dW += dlogitsᵀ h_c` (fp32) and `dh_c = dlogits W` (the Liger / Cut Cross-Entropy idea,
REFERENCES §10). `chunked_token_nll` is the no-grad variant for evaluation: per-token NLL and
argmax. The default chunk comes from `models.memory.loss_chunk_tokens` (a byte budget).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk: int, ignore_index: int) -> Tensor:
        # h [N, D], weight [V, D], labels [N]
        n = h.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for a in range(0, n, chunk):
            logits = F.linear(h[a:a + chunk], weight).float()
            lab = labels[a:a + chunk]
            keep = lab != ignore_index
            lse_c = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(keep, lse_c - tgt, torch.zeros_like(lse_c)).sum()
            lse[a:a + chunk] = lse_c
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        ctx.autocast = _autocast_state(h.device.type)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, labels, lse = ctx.saved_tensors
        chunk, ignore = ctx.chunk, ctx.ignore_index
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        enabled, dtype = ctx.autocast
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):
            for a in range(0, h.shape[0], chunk):
                hc = h[a:a + chunk]
                logits = F.linear(hc, weight)
                lab = labels[a:a + chunk]
                # d(sum of CE)/dlogits = softmax - onehot for counted tokens, built in one fp32
                # buffer in place (the chunk's memory is one [chunk, V] fp32 tensor, not five)
                ldt = logits.dtype
                d = logits.float() if ldt != torch.float32 else logits
                d.sub_(lse[a:a + chunk].unsqueeze(1)).exp_()
                d.scatter_add_(1, lab.clamp(min=0).unsqueeze(1), torch.full((d.shape[0], 1), -1.0, device=d.device))
                d.mul_(((lab != ignore).float() * grad.float()).unsqueeze(1))
                if ldt != torch.float32:
                    del logits
                    d = d.to(ldt)  # as autograd would hand it to the projection's backward
                if need_h:  # (under autocast the matmuls cast as the forward's did)
                    dh[a:a + chunk] = (d @ weight).to(h.dtype)
                if need_w:
                    if d.dtype == torch.float32 and hc.dtype == torch.float32:
                        dw.addmm_(d.t(), hc)
                    else:
                        dw += (d.t() @ hc).float()
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None


def chunked_lm_loss(h: Tensor, weight: Tensor, labels: Tensor, chunk: int, ignore_index: int = -100) -> Tensor:
    """Summed cross-entropy of `h @ weight.T` against `labels` (ignore_index not counted).

    h [B, S, D] or [N, D] (any float dtype; logits are formed in fp32 per chunk), weight [V, D],
    labels int64 of h's leading shape. chunk = tokens per chunk; <= 0, or a chunk that covers all
    tokens, means all at once (the plain path: autograd's own cross-entropy over the [N, V] logits,
    which then fit the chunk's budget; nothing to recompute). Returns a 0-d fp32 tensor; divide by
    the GLOBAL count of counted tokens.
    """
    h2 = h.reshape(-1, h.shape[-1])
    lab = labels.reshape(-1)
    if chunk <= 0 or chunk >= h2.shape[0]:
        logits = F.linear(h2, weight).float()
        return F.cross_entropy(logits, lab, ignore_index=ignore_index, reduction="sum")
    return _ChunkedLMLoss.apply(h2, weight, lab, int(chunk), ignore_index)


@torch.no_grad()
def chunked_token_nll(h: Tensor, weight: Tensor, labels: Tensor, chunk: int,
                      ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-token NLL fp32 [B, S] (0 where not counted) and argmax int64 [B, S], in chunks of tokens."""
    B, S, D = h.shape
    h2, lab = h.reshape(-1, D), labels.reshape(-1)
    chunk = chunk if chunk > 0 else h2.shape[0]
    nll = torch.empty(h2.shape[0], dtype=torch.float32, device=h.device)
    pred = torch.empty(h2.shape[0], dtype=torch.long, device=h.device)
    for a in range(0, h2.shape[0], chunk):
        logits = F.linear(h2[a:a + chunk], weight).float()
        nll[a:a + chunk] = F.cross_entropy(logits, lab[a:a + chunk], ignore_index=ignore_index, reduction="none")
        pred[a:a + chunk] = logits.argmax(-1)
    return nll.view(B, S), pred.view(B, S)


__all__ = ["chunked_lm_loss", "chunked_token_nll"]
