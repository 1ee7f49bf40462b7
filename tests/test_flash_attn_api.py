"""flash-attn's private API across releases (issue 23, item 1): 2.6 (plain functions, window_size as
a pair, forward returns 8 values) and 2.7/2.8 (torch.library custom ops whose inspect.signature is
(*args, **kwargs), window_size_left/right, forward returns (out, lse, S_dmask, rng_state), backward
returns softmax_d and writes dq/dk/dv in place).

Stand-in modules reproduce those signatures, argument orders, return values and in-place writes
exactly (read from Dao-AILab/flash-attention flash_attn/flash_attn_interface.py at v2.6.3 and
v2.8.3) and compute with plain torch math on CPU, with flash-attn's semantics: masks aligned at the
bottom-right corner, grouped K/V heads, a backward from the given (final) out and lse. Through
`attention_block` forced to the flash backend they must equal the math backend (fp32, 1e-5), hand
K/V to the kernel with their own (grouped) number of heads, and call each kernel once per block.
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from typing import Optional, Tuple

import pytest
import torch

from longtrain.kernels import attention_block
from longtrain.kernels.attention import block_backward, block_forward, flash_api_of, flashattn, make_spec

CALLS: list = []  # (kernel, k heads, v heads) of every stand-in call


def _visible(sq, sk, causal, left, right, device):
    """flash-attn's mask: query i sees key j iff j - (i + sk - sq) lies in [-left, right] (-1: unbounded),
    right = 0 when causal."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        right = 0
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _scores(q, k, scale, keep):  # [B,Hq,Sq,Sk] fp32; query head h uses kv head h // (Hq/Hkv)
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bihd,bjhd->bhij", q.float(), k.float().repeat_interleave(g, 2)) * scale
    return s.masked_fill(~keep, float("-inf"))


def _fwd_math(q, k, v, scale, causal, left, right):
    keep = _visible(q.shape[1], k.shape[1], causal, left, right, q.device)
    s = _scores(q, k, scale, keep)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhij,bjhd->bihd", p, v.float().repeat_interleave(q.shape[2] // k.shape[2], 2))
    return out.to(q.dtype), lse.float()


def _bwd_math(dout, q, k, v, out, lse, dq, dk, dv, scale, causal, left, right):
    g = q.shape[2] // k.shape[2]
    keep = _visible(q.shape[1], k.shape[1], causal, left, right, q.device)
    p = torch.exp(_scores(q, k, scale, keep) - lse[..., None])  # the GIVEN lse, as flash-attn does
    do, vf = dout.float(), v.float().repeat_interleave(g, 2)
    dvx = torch.einsum("bhij,bihd->bjhd", p, do)
    dp = torch.einsum("bihd,bjhd->bhij", do, vf)
    ds = p * (dp - (do * out.float()).sum(-1).transpose(1, 2)[..., None]) * scale
    dqx = torch.einsum("bhij,bjhd->bihd", ds, k.float().repeat_interleave(g, 2))
    dkx = torch.einsum("bhij,bihd->bjhd", ds, q.float())
    b, sk, hkv, d = k.shape
    dq.copy_(dqx)
    dk.copy_(dkx.view(b, sk, hkv, g, d).sum(3))
    dv.copy_(dvx.view(b, sk, hkv, g, d).sum(3))


def _softmax_d(q):
    b, sq, h, _ = q.shape
    return torch.zeros(b, h, 128 * math.ceil(sq / 128), dtype=torch.float32, device=q.device)


# ---------------------------------------------------------------- flash-attn 2.6.3: plain functions

def _fwd_26(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax):
    CALLS.append(("fwd", k.shape[2], v.shape[2]))
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and return_softmax is False
    out, lse = _fwd_math(q, k, v, softmax_scale, causal, window_size[0], window_size[1])
    empty = torch.empty(0, dtype=q.dtype)
    return out, q, k, v, out, lse, empty, torch.zeros(2, dtype=torch.int64)


def _bwd_26(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal, window_size, softcap,
            alibi_slopes, deterministic, rng_state=None):
    CALLS.append(("bwd", k.shape[2], v.shape[2]))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    _bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, window_size[0], window_size[1])
    return dq, dk, dv, _softmax_d(q)


# ---------------------------------------------------------------- flash-attn 2.8.3: custom ops

@torch.library.custom_op("lt_flash_standin::_flash_attn_forward", mutates_args=())
def _fwd_28(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float, causal: bool,
            window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
            return_softmax: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    CALLS.append(("fwd", k.shape[2], v.shape[2]))
    assert dropout_p == 0.0 and softcap == 0.0 and alibi_slopes is None and return_softmax is False
    out, lse = _fwd_math(q, k, v, softmax_scale, causal, window_size_left, window_size_right)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


@torch.library.custom_op("lt_flash_standin::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
def _bwd_28(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            softmax_lse: torch.Tensor, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor],
            dv: Optional[torch.Tensor], dropout_p: float, softmax_scale: float, causal: bool, window_size_left: int,
            window_size_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor], deterministic: bool,
            rng_state: Optional[torch.Tensor] = None) -> torch.Tensor:
    CALLS.append(("bwd", k.shape[2], v.shape[2]))
    _bwd_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal, window_size_left,
              window_size_right)
    return _softmax_d(q)


STANDINS = {"2.6.3": (_fwd_26, _bwd_26), "2.8.3": (_fwd_28, _bwd_28)}


@pytest.fixture(params=sorted(STANDINS))
def flash_standin(request, monkeypatch):
    version = request.param
    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = version
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_forward, iface._flash_attn_backward = STANDINS[version]
    pkg.flash_attn_interface = iface
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)
    monkeypatch.setattr(flashattn, "_FLASH", None)  # probe again, finding the stand-in
    monkeypatch.setenv("LONGTRAIN_ATTENTION_BACKEND", "flash")
    CALLS.clear()
    return version


def test_standins_have_the_real_calling_conventions():
    # 2.7+: a custom op; the signature shows nothing to fill by name (what broke the old code)
    assert list(inspect.signature(_bwd_28).parameters) == ["args", "kwargs"]
    assert "window_size" in inspect.signature(_bwd_26).parameters
    assert flash_api_of(types.SimpleNamespace(_flash_attn_forward=_fwd_26), "2.6.3") == "2.6"
    for version, api in [("2.7.0.post2", "2.7"), ("2.8.3", "2.7"), ("2.5.9.post1", None), ("3.0.0b1", "2.7")]:
        assert flash_api_of(None, version) == api, version
    # no usable version string: the functions themselves tell
    assert flash_api_of(types.SimpleNamespace(_flash_attn_forward=_fwd_26), "") == "2.6"
    assert flash_api_of(types.SimpleNamespace(_flash_attn_forward=_fwd_28), "") == "2.7"


CASES = [  # sq, sk, causal, window, q_offset, k_offset
    (37, 37, False, None, 0, 0),    # full
    (37, 37, True, None, 0, 0),     # square causal
    (24, 40, True, 7, 16, 0),       # causal window on the diagonal of a rectangular block (bottom-right)
]


@pytest.mark.parametrize("sq,sk,causal,window,qo,ko", CASES)
def test_attention_block_through_flash_equals_math(flash_standin, monkeypatch, sq, sk, causal, window, qo, ko):
    torch.manual_seed(0)
    hq, hkv, d = 8, 2, 16
    q = torch.randn(2, sq, hq, d, requires_grad=True)
    k = torch.randn(2, sk, hkv, d, requires_grad=True)
    v = torch.randn(2, sk, hkv, d, requires_grad=True)
    kw = dict(causal=causal, window=window, q_offset=qo, k_offset=ko)
    out, lse = attention_block(q, k, v, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert CALLS == [("fwd", hkv, hkv), ("bwd", hkv, hkv)]  # one call each, grouped K/V not expanded
    monkeypatch.setenv("LONGTRAIN_ATTENTION_BACKEND", "math")
    rout, rlse = attention_block(q, k, v, **kw)
    rgrads = torch.autograd.grad(rout, (q, k, v), g)
    torch.testing.assert_close(out, rout, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=1e-5, rtol=0)
    for a, b in zip(grads, rgrads):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_flash_backward_takes_the_merged_lse(flash_standin, monkeypatch):
    """A ring's block: gradients for a final out/lse that other blocks contributed to."""
    torch.manual_seed(1)
    q, dout = torch.randn(1, 32, 4, 16), torch.randn(1, 32, 4, 16)
    k, v = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    spec = make_spec(q, k, causal=True, softmax_scale=None, window=None, q_offset=0, k_offset=0, bounds=None)
    _, lse_b = block_forward(q, k, v, spec)
    final_lse = torch.logaddexp(lse_b, torch.randn_like(lse_b))
    final_out = torch.randn_like(q)
    got = block_backward(dout, q, k, v, final_out, final_lse, spec)
    monkeypatch.setenv("LONGTRAIN_ATTENTION_BACKEND", "math")
    ref = block_backward(dout, q, k, v, final_out, final_lse, spec)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [c[0] for c in CALLS] == ["fwd", "bwd"]
