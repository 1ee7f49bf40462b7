"""Zigzag / contiguous sharding of sequences and positions, and the block planner."""

import pytest
import torch

from longtrain.parallel import shard_positions, shard_sequence, unshard_sequence
from longtrain.parallel.sharding import layout_segments, plan_pair
from longtrain.testing import run_distributed


def test_positions_by_hand():
    assert shard_positions(8, rank=0, world_size=2).tolist() == [0, 1, 6, 7]
    assert shard_positions(8, rank=1, world_size=2).tolist() == [2, 3, 4, 5]
    assert shard_positions(16, rank=3, world_size=4).tolist() == [6, 7, 8, 9]
    assert shard_positions(16, rank=0, world_size=4).tolist() == [0, 1, 14, 15]
    assert shard_positions(8, rank=1, world_size=2, layout="contiguous").tolist() == [4, 5, 6, 7]
    # every position exactly once
    for layout in ("zigzag", "contiguous"):
        allpos = torch.cat([shard_positions(48, rank=r, world_size=4, layout=layout) for r in range(4)])
        assert sorted(allpos.tolist()) == list(range(48))


def test_world_of_one_is_identity():
    x = torch.randn(2, 10, 3)
    assert shard_sequence(x) is x and unshard_sequence(x) is x
    assert shard_positions(10).tolist() == list(range(10))


def test_bad_arguments():
    with pytest.raises(ValueError):
        shard_positions(10, rank=0, world_size=4)  # zigzag needs S % 8 == 0
    with pytest.raises(ValueError):
        shard_positions(16, rank=0, world_size=4, layout="striped")
    with pytest.raises(ValueError):
        shard_positions(16, rank=0)


def test_zigzag_causal_plan_is_balanced():
    """REFERENCES §1: each rank does the same causal work under zigzag, not under contiguous."""
    w, s = 4, 64
    for layout, balanced in (("zigzag", True), ("contiguous", False)):
        segs = layout_segments(s, w, layout)
        work = [sum(plan_pair(segs[o], segs[h], True, None, None).pairs for o in range(w))
                for h in range(w)]
        assert (len(set(work)) == 1) == balanced, (layout, work)
    segs = layout_segments(s, w, "zigzag")
    c = s // (2 * w)
    for o in range(w):
        for h in range(w):
            p = plan_pair(segs[o], segs[h], True, None, None)
            if o == h:
                assert [x.kind for x in p.calls] == ["local_causal"]  # one causal call
            elif h < o:  # lower-rank keys: all local queries against the first key chunk
                assert [(x.q0, x.q1, x.k0, x.k1) for x in p.calls] == [(0, 2 * c, 0, c)]
            else:        # higher-rank keys: the second query chunk against all keys
                assert [(x.q0, x.q1, x.k0, x.k1) for x in p.calls] == [(c, 2 * c, 0, 2 * c)]


def test_plan_skips_pairs_outside_window_and_documents():
    segs = layout_segments(64, 4, "contiguous")
    assert plan_pair(segs[3], segs[1], True, 16, None).empty          # >16 tokens back
    assert not plan_pair(segs[3], segs[2], True, 16, None).empty
    assert plan_pair(segs[2], segs[1], True, None, (0, 32, 64)).empty  # other document


def _dist_worker(rank, world):
    out = {}
    for layout in ("zigzag", "contiguous"):
        full = torch.arange(2 * 32 * 3, dtype=torch.float32).view(2, 32, 3)
        local = shard_sequence(full, None, 1, layout)
        pos = shard_positions(32, None, layout)
        assert torch.equal(local, full[:, pos])
        assert torch.equal(shard_sequence(full.transpose(0, 1), None, 0, layout), full[:, pos].transpose(0, 1))
        x = local.clone().requires_grad_()
        back = unshard_sequence(x, None, 1, layout)
        assert torch.equal(back, full)
        g = torch.arange(back.numel(), dtype=torch.float32).view_as(back) * (rank + 1)
        (gx,) = torch.autograd.grad(back, x, g)
        # each rank's slice of the full gradient, summed over ranks: sum_r (r+1) = W(W+1)/2
        expect = torch.arange(back.numel(), dtype=torch.float32).view_as(back)[:, pos] * world * (world + 1) / 2
        out[layout] = torch.equal(gx, expect)
    return out


def test_shard_unshard_distributed():
    res = run_distributed(_dist_worker, 4)
    assert all(all(r.values()) for r in res), res
