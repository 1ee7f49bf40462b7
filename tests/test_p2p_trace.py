"""NCCL-safety of every sequence-parallel schedule, proven on gloo.

gloo forgives what NCCL does not (REFERENCES §9): NCCL matches the messages between two
ranks on one communicator by order alone, hangs on a send without its receive, is silently
wrong on non-contiguous buffers, and wants global ranks as peers on sub-groups. Each worker
records every point-to-point operation (and Ulysses' all-to-alls) of ring, TokenRing,
Ulysses and hybrid, forward and backward, causal / windowed / documents, at W = 2, 3, 4
(the hybrid and a plain ring on sub-groups of a world of 4), and `check_pairing` asserts
that they pair up exactly. The one-communicator switch is checked the same way and its
results must equal the two-communicator run bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from longtrain.testing import TraceTransport, check_pairing, run_distributed

S, B, D = 48, 1, 8   # S divisible by 2W for W = 2, 3, 4
DOCS = [0, 7, 20, 21, 33]


def _configs(world: int) -> list[dict]:
    cfgs = []
    for impl in ("ring", "tokenring", "ulysses", "hybrid"):
        for mask in ("causal", "window", "docs"):
            cfgs.append(dict(impl=impl, mask=mask, hq=12, hkv=12))
    for impl in ("ring", "tokenring"):
        cfgs.append(dict(impl=impl, mask="causal", hq=8, hkv=2))
        for mask in ("causal", "window", "docs"):
            cfgs.append(dict(impl=impl, mask=mask, hq=12, hkv=12, one=True))
    cfgs.append(dict(impl="ring", mask="causal", hq=12, hkv=12, layout="contiguous", one=False))
    if world == 4:
        cfgs.append(dict(impl="hybrid", mask="docs", hq=12, hkv=12, u=2, one=True))
        for impl in ("ring", "tokenring"):
            cfgs.append(dict(impl=impl, mask="window", hq=12, hkv=12, pairs=True))
    return cfgs


def _worker(rank: int, world: int, cfgs: list[dict]) -> list[dict]:
    import torch.distributed as dist

    from longtrain.parallel import comm, sequence_parallel_attention, shard_sequence, ulysses

    tr = TraceTransport()
    comm.TRANSPORT = tr
    real_a2a = dist.all_to_all_single

    def traced_a2a(out, inp, *a, group=None, **kw):
        tr.record_collective("all_to_all_single", group, inp)
        return real_a2a(out, inp, *a, group=group, **kw)

    ulysses.dist.all_to_all_single = traced_a2a
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])] if world == 4 else None
    results = []
    for cfg in cfgs:
        torch.manual_seed(7)
        q = torch.randn(B, S, cfg["hq"], D)
        k, v = (torch.randn(B, S, cfg["hkv"], D) for _ in range(2))
        g = torch.randn(B, S, cfg["hq"], D)
        group, sub_world = None, world
        if cfg.get("pairs"):
            group, sub_world = pairs[rank // 2], 2
        kw = dict(impl=cfg["impl"], causal=True, layout=cfg.get("layout", "zigzag"),
                  window=S // 5 if cfg["mask"] == "window" else None,
                  cu_seqlens=DOCS if cfg["mask"] == "docs" else None, ulysses_degree=cfg.get("u"))
        runs = {}
        for one in ([False, True] if cfg.get("one") else [False]):
            tr.ops = []
            local = [shard_sequence(t, group, 1, kw["layout"]).requires_grad_() for t in (q, k, v)]
            out = sequence_parallel_attention(*local, group, one_communicator=one, **kw)
            grads = torch.autograd.grad(out, local, shard_sequence(g, group, 1, kw["layout"]))
            runs[one] = ([out.detach(), *grads], list(tr.ops))
        same = True
        if True in runs:
            same = all(torch.equal(a, b) for a, b in zip(runs[False][0], runs[True][0]))
        results.append({"cfg": cfg, "sub_world": sub_world, "traces": {str(k): v[1] for k, v in runs.items()},
                        "one_comm_equal": same})
    comm.TRANSPORT = None
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_schedule_pairs_up_for_nccl(world):
    cfgs = _configs(world)
    per_rank = run_distributed(_worker, world, cfgs, timeout=600)
    for i, cfg in enumerate(cfgs):
        for mode in per_rank[0][i]["traces"]:
            traces = [per_rank[r][i]["traces"][mode] for r in range(world)]
            problems = check_pairing(traces)
            assert not problems, f"{cfg} one_communicator={mode}: " + "; ".join(problems[:5])
            n_p2p = sum(o["op"] in ("send", "recv") for t in traces for o in t)
            n_coll = sum(o["op"] not in ("send", "recv") for t in traces for o in t)
            if cfg["impl"] == "ulysses":
                assert n_coll > 0 and n_p2p == 0, cfg
            else:
                assert n_p2p > 0, f"{cfg}: no point-to-point traffic was traced"
            if mode == "True":  # one communicator: the traced streams use a single comm per group
                comms = {o["comm"] for t in traces for o in t if o["op"] in ("send", "recv")}
                assert len(comms) <= (2 if cfg["impl"] == "hybrid" else 1), (cfg, comms)
        assert per_rank[0][i]["one_comm_equal"], f"{cfg}: one communicator differs from two"
        if cfg.get("pairs"):  # sub-groups: peers are global ranks of the pair
            for r in range(world):
                for o in per_rank[r][i]["traces"]["False"]:
                    assert o["peer"] in ((0, 1) if r < 2 else (2, 3)), o


def _op(me, peer, op, numel, comm="g", ranks=(0, 1), contiguous=True, tag=0):
    return {"comm": comm, "ranks": ranks, "op": op, "me": me, "peer": peer, "tag": tag, "numel": numel,
            "shape": (numel,), "dtype": "torch.float32", "contiguous": contiguous, "batch": 0}


def test_a_misordered_schedule_fails_the_check():
    # rank 0 sends 4 then 8 elements; rank 1 posts its receives the other way round: gloo matches by
    # tag and would deliver, NCCL matches by order and would mix the two up
    good = [[_op(0, 1, "send", 4, tag=0), _op(0, 1, "send", 8, tag=1)],
            [_op(1, 0, "recv", 4, tag=0), _op(1, 0, "recv", 8, tag=1)]]
    assert check_pairing(good) == []
    swapped = [good[0], [good[1][1], good[1][0]]]
    problems = check_pairing(swapped)
    assert problems and "sent 4" in problems[0]
    # a send nobody receives (NCCL hangs)
    assert "posts 1 receives" in check_pairing([good[0], good[1][:1]])[0]
    # a group rank passed where NCCL wants a global rank
    assert "not a member" in check_pairing([[_op(2, 1, "send", 4, ranks=(2, 3))], []])[0]
    # a non-contiguous buffer
    assert "non-contiguous" in check_pairing([[_op(0, 1, "send", 4, contiguous=False)],
                                              [_op(1, 0, "recv", 4)]])[0]


def _misordered_worker(rank: int, world: int) -> list[dict]:
    """A real ring step whose rank 1 swaps the order of its two receives (dry run: nothing moves)."""
    from longtrain.parallel import comm

    tr = TraceTransport(deliver=False)
    comm.TRANSPORT = tr
    kv, dkv = torch.zeros(2, 4), torch.zeros(2, 6)
    peer = 1 - rank
    order = [("kv", kv), ("dkv", dkv)] if rank == 0 else [("dkv", dkv), ("kv", kv)]
    for kind, t in order:
        p2p = comm.P2P(None)
        p2p.recv(torch.empty_like(t), peer, "up")
        p2p.send(t, peer, kind, "up")
        p2p.start().wait()
    comm.TRANSPORT = None
    return tr.ops


def test_a_misordered_real_schedule_is_caught():
    traces = run_distributed(_misordered_worker, 2)
    problems = check_pairing(traces)
    assert problems and "message 0" in problems[0]
