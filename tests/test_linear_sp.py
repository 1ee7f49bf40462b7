"""Sequence-parallel lightning attention on W gloo ranks equals one process:
outputs and gradients, zigzag and contiguous layouts, with documents."""

from __future__ import annotations

import pytest
import torch

from longtrain.kernels import lightning_attention, tnl_decay
from longtrain.parallel import linear_sp_attention
from longtrain.testing import run_distributed


def local_positions(rank: int, world: int, layout: str, S: int) -> torch.Tensor:
    """Global positions of a rank's tokens, in local order (written out independently)."""
    if layout == "zigzag":
        c = S // (2 * world)
        return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                          torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])
    c = S // world
    return torch.arange(rank * c, (rank + 1) * c)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def _worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    import longtrain.parallel.linear_sp as lsp

    sent: list[int] = []
    ag, rs = lsp._all_gather, lsp._reduce_scatter

    def count_ag(out, inp, group=None):
        sent.append(inp.numel())
        return ag(out, inp, group=group)

    def count_rs(out, inp, group=None):
        sent.append(out.numel())
        return rs(out, inp, group=group)

    lsp._all_gather, lsp._reduce_scatter = count_ag, count_rs
    results = []
    for case in cases:
        if case.get("layer_module"):
            results.append(_layer_case(rank, world, case))
            continue
        S, B, H, Dk, Dv, dtype = case["S"], case["B"], case["H"], case["Dk"], case["Dv"], case["dtype"]
        g = torch.Generator().manual_seed(case["seed"])
        q, k = (torch.randn(B, S, H, Dk, generator=g, dtype=dtype) for _ in range(2))
        v, do = (torch.randn(B, S, H, Dv, generator=g, dtype=dtype) for _ in range(2))
        cu = None if case["cu"] is None else torch.tensor(case["cu"])
        decay = tnl_decay(H, case["layer"], 4)
        ref = [x.clone().requires_grad_() for x in (q, k, v)]
        out_ref = lightning_attention(*ref, decay, cu_seqlens=cu)
        out_ref.backward(do)
        idx = local_positions(rank, world, case["layout"], S)
        loc = [x[:, idx].clone().requires_grad_() for x in (q, k, v)]
        sent.clear()
        out = linear_sp_attention(*loc, decay, layout=case["layout"], cu_seqlens=cu)
        out.backward(do[:, idx])
        m = 2 if case["layout"] == "zigzag" else 1
        results.append({
            "case": case,
            "out": rel(out, out_ref[:, idx]),
            "grads": [rel(a.grad, b.grad[:, idx]) for a, b in zip(loc, ref)],
            "sent": list(sent), "state_numel": m * B * H * Dk * Dv,
        })
    return results


def _layer_case(rank: int, world: int, case: dict) -> dict:
    """The model's LightningAttention layer with the SP function as its attn_fn."""
    from functools import partial

    import torch.distributed as dist

    from longtrain.models.lightning import LightningAttention

    torch.manual_seed(7)
    S, dim = case["S"], 32
    layer = LightningAttention(dim, 4, 8, layer_idx=1, n_layers=3).double()
    x = torch.randn(2, S, dim, dtype=torch.float64)
    cu = torch.tensor(case["cu"])
    ref = x.clone().requires_grad_()
    y_ref = layer(ref, attn_fn=partial(lightning_attention, cu_seqlens=cu))
    y_ref.square().sum().backward()
    ref_pgrads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    idx = local_positions(rank, world, case["layout"], S)
    xl = x[:, idx].clone().requires_grad_()
    y = layer(xl, attn_fn=partial(linear_sp_attention, layout=case["layout"], cu_seqlens=cu))
    y.square().sum().backward()
    pgrads = [p.grad.clone() for p in layer.parameters()]
    for g in pgrads:
        dist.all_reduce(g)
    return {"case": case, "out": rel(y, y_ref[:, idx]),
            "grads": [rel(xl.grad, ref.grad[:, idx])] + [rel(a, b) for a, b in zip(pgrads, ref_pgrads)]}


def _cases(world: int) -> list[dict]:
    S = 400 if world == 2 else 512            # zigzag chunks of 100 / 64, contiguous 200 / 128
    c = S // (2 * world)
    # documents: one starting exactly at a chunk start, two inside one chunk, one spanning chunks
    cu = [0, c, c + 7, c + 8, 3 * c + 5, S]
    cases = []
    for layout in ("zigzag", "contiguous"):
        for docs in (None, cu):
            cases.append(dict(layout=layout, S=S, B=2, H=3, Dk=16, Dv=8, dtype=torch.float64,
                              cu=docs, layer=1, seed=len(cases)))
    cases.append(dict(layout="zigzag", S=S, B=1, H=4, Dk=32, Dv=32, dtype=torch.float32,
                      cu=cu, layer=3, seed=99))
    cases.append(dict(layer_module=True, layout="zigzag", S=S, cu=cu, dtype=torch.float64))
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_linear_sp_equals_single_process(world):
    per_rank = run_distributed(_worker, world, _cases(world))
    for rank_results in per_rank:
        for r in rank_results:
            tol = 1e-10 if r["case"]["dtype"] == torch.float64 else 1e-5
            assert r["out"] <= tol and max(r["grads"]) <= tol, r
            if r["case"].get("layer_module"):
                continue
            # only the D x D states travel: one all-gather forward, one reduce-scatter backward
            assert r["sent"] == [r["state_numel"], r["state_numel"]], r


def test_single_process_is_plain_lightning():
    q, k, v = (torch.randn(1, 48, 2, 8) for _ in range(3))
    decay = tnl_decay(2, 0, 2)
    cu = torch.tensor([0, 20, 48])
    for layout in ("zigzag", "contiguous"):
        torch.testing.assert_close(linear_sp_attention(q, k, v, decay, layout=layout, cu_seqlens=cu),
                                   lightning_attention(q, k, v, decay, cu_seqlens=cu))
    with pytest.raises(ValueError, match="layout"):
        linear_sp_attention(q, k, v, decay, layout="stripe")
    with pytest.raises(ValueError, match="global length"):
        linear_sp_attention(q, k, v, decay, cu_seqlens=torch.tensor([0, 20]))


def test_layout_agrees_with_sharding_module():
    sharding = pytest.importorskip("longtrain.parallel.sharding")
    for world in (2, 4):
        for layout in ("zigzag", "contiguous"):
            segs = sharding.layout_segments(64 * world, world, layout)
            for rank in range(world):
                pos = torch.cat([torch.arange(a, a + n) for a, n in segs[rank]])
                assert torch.equal(pos, local_positions(rank, world, layout, 64 * world))
