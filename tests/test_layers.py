"""models/layers.RMSNorm against autograd's own derivative of the same formula (the reference), and
what it keeps for backward."""

from __future__ import annotations

import pytest
import torch

from longtrain.kernels.mesa import saved_bytes_counter
from longtrain.models.layers import RMSNorm


def _reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rmsnorm_forward_bitwise_and_gradients_match_autograd(dtype, tol):
    torch.manual_seed(0)
    x = (torch.randn(2, 33, 96) * torch.logspace(-1, 1, 33).view(1, 33, 1)).to(dtype).requires_grad_()
    norm = RMSNorm(96).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    out, ref = norm(x), _reference(x, norm.weight, norm.eps)
    assert out.dtype == dtype and torch.equal(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, norm.weight), g)
    want = torch.autograd.grad(ref, (x, norm.weight), g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < tol
    with torch.no_grad():  # no autograd: the same numbers, nothing saved
        assert torch.equal(norm(x), ref)


def test_rmsnorm_saves_its_input_and_rstd_only():
    """bf16 input: 2 bytes per element + 4 per row (autograd's formula kept an fp32 copy of the input
    and the fp32 normalised tensor: 8 bytes per element)."""
    x = torch.randn(4, 64, 256, dtype=torch.bfloat16, requires_grad=True)
    norm = RMSNorm(256).to(torch.bfloat16)
    with saved_bytes_counter() as c:
        norm(x * 1.0)
    assert c.exact_bytes == 4 * 64 * 256 * 2 + 4 * 64 * 4, c.as_dict()
