"""Point-to-point helpers, extra communicators, and per-process traffic/compute counters.

`COUNTERS` is process-local: tests and the bench `reset()` it, run attention, and
read `snapshot()`. Every message the sequence-parallel code sends is counted by
kind ("kv", "dkv", "q", "partial", "qgrad_in", "dq", "a2a_q", ...) and by direction
along the ring ("up" = towards higher ranks, "down" = towards lower ranks,
"a2a" = all-to-all), and every attention block computation is counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
import torch
import torch.distributed as dist

from longtrain import ranges


@dataclass
class Counters:
    bytes_sent: dict = field(default_factory=lambda: defaultdict(int))      # direction -> bytes
    bytes_recv: dict = field(default_factory=lambda: defaultdict(int))      # direction -> bytes
    bytes_by_kind: dict = field(default_factory=lambda: defaultdict(int))   # kind -> bytes sent
    sends_by_kind: dict = field(default_factory=lambda: defaultdict(int))   # kind -> blocks sent
    bytes_by_peer: dict = field(default_factory=lambda: defaultdict(int))   # global rank -> bytes sent
    compute_blocks: int = 0   # attention_block calls (forward)
    compute_pairs: int = 0    # sum of Sq*Sk over those calls (per batch row and head)
    backward_blocks: int = 0  # block backward calls

    def reset(self) -> None:
        for d in (self.bytes_sent, self.bytes_recv, self.bytes_by_kind, self.sends_by_kind,
                  self.bytes_by_peer):
            d.clear()
        self.compute_blocks = self.compute_pairs = self.backward_blocks = 0

    def snapshot(self) -> dict:
        return {
            "bytes_sent": dict(self.bytes_sent), "bytes_recv": dict(self.bytes_recv),
            "bytes_by_kind": dict(self.bytes_by_kind), "sends_by_kind": dict(self.sends_by_kind),
            "bytes_by_peer": dict(self.bytes_by_peer), "compute_blocks": self.compute_blocks,
            "compute_pairs": self.compute_pairs, "backward_blocks": self.backward_blocks,
        }


COUNTERS = Counters()

# A stand-in for torch.distributed's point-to-point layer (None = the real one): an object with
# global_rank(group, peer) -> int and start(group, recvs, sends) -> list of objects with wait().
# parallel/simulate.py installs one that runs the ranks of a ring as threads of one process
# (a ring on one GPU); the P2P trace tests install one that records every operation.
TRANSPORT = None


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class P2P:
    """Collects receives and sends for one group and posts them receives-first.

    gloo moves data one way at a time per connection unless the receive is posted
    before the matching send (REFERENCES §7), so all receives go out first.
    """

    def __init__(self, group: dist.ProcessGroup | None, tag_offset: int = 0):
        self.group = group
        self.tag_offset = tag_offset  # keeps two streams apart when they share one communicator
        self.recvs: list[tuple[torch.Tensor, int, int]] = []
        self.sends: list[tuple[torch.Tensor, int, int]] = []

    def _global(self, peer: int) -> int:
        if TRANSPORT is not None:
            return TRANSPORT.global_rank(self.group, peer)
        return dist.get_global_rank(self.group, peer) if self.group is not None else peer

    def recv(self, t: torch.Tensor, peer: int, direction: str, tag: int = 0) -> torch.Tensor:
        self.recvs.append((t, self._global(peer), tag + self.tag_offset))
        COUNTERS.bytes_recv[direction] += nbytes(t)
        return t

    def send(self, t: torch.Tensor, peer: int, kind: str, direction: str, tag: int = 0,
             count_block: bool = True) -> None:
        t = t.contiguous()
        g = self._global(peer)
        self.sends.append((t, g, tag + self.tag_offset))
        n = nbytes(t)
        COUNTERS.bytes_sent[direction] += n
        COUNTERS.bytes_by_kind[kind] += n
        COUNTERS.bytes_by_peer[g] += n
        if count_block:
            COUNTERS.sends_by_kind[kind] += 1

    def start(self) -> "Handles":
        recvs, sends, self.recvs, self.sends = self.recvs, self.sends, [], []
        with ranges.scope("sp_comm/post"):
            if TRANSPORT is not None:
                return Handles(TRANSPORT.start(self.group, recvs, sends))
            return Handles(launch_p2p(self.group, recvs, sends))


def launch_p2p(group: dist.ProcessGroup | None, recvs: list[tuple[torch.Tensor, int, int]],
               sends: list[tuple[torch.Tensor, int, int]]) -> list:
    """Post (tensor, global peer, tag) receives, then sends, as one batch; returns the work handles."""
    ops = [dist.P2POp(dist.irecv, t, p, group, tag) for t, p, tag in recvs]
    ops += [dist.P2POp(dist.isend, t, p, group, tag) for t, p, tag in sends]
    return dist.batch_isend_irecv(ops) if ops else []


class Handles:
    """Work handles of one batch; waiting twice is a no-op (a second gloo wait() hangs)."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> None:
        works, self.works = self.works, []
        if not works:
            return
        with ranges.scope("sp_comm/wait"):
            for w in works:
                w.wait()


def wait(handles: "Handles | None") -> None:
    if handles is not None:
        handles.wait()


_GROUPS: dict = {}


def _ranks(group: dist.ProcessGroup | None) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def twin_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """A second communicator over the same ranks (cached), so two streams overlap.

    Created with local synchronisation: only the members need to call this.
    """
    key = ("twin", _ranks(group))
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(key[1]), use_local_synchronization=True)
    return _GROUPS[key]


def split_group(group: dist.ProcessGroup | None, inner: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """(inner group of `inner` consecutive ranks holding me, outer group of my peers across).

    Group ranks r = g*inner + i: inner groups fix g, outer groups fix i.
    """
    ranks = _ranks(group)
    key = ("split", ranks, inner)
    if key not in _GROUPS:
        me = ranks.index(dist.get_rank())
        g, i = divmod(me, inner)
        inner_ranks = list(ranks[g * inner:(g + 1) * inner])
        outer_ranks = list(ranks[i::inner])
        _GROUPS[key] = (dist.new_group(inner_ranks, use_local_synchronization=True),
                        dist.new_group(outer_ranks, use_local_synchronization=True))
    return _GROUPS[key]


def warm_up(group: dist.ProcessGroup | None, device: torch.device, *, one_communicator: bool = False) -> None:
    """One tiny exchange between every pair of ranks of `group` (and its twin communicator).

    NCCL creates a pair's connection lazily, on its first message, and that blocks; ring and
    TokenRing talk to every pair (TokenRing sends to r+s for every s), so doing this once
    before the first step keeps the set-up out of the first step's time.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if world < 2:
        return
    comms = [group] if one_communicator else [group, twin_group(group)]
    for g in comms:
        for s in range(1, world):
            p2p = P2P(g)
            p2p.recv(torch.empty(1, device=device), (rank - s) % world, "warmup")
            p2p.send(torch.zeros(1, device=device), (rank + s) % world, "warmup", "warmup", count_block=False)
            p2p.start().wait()
    for d in ("warmup",):
        COUNTERS.bytes_recv.pop(d, None)
        COUNTERS.bytes_sent.pop(d, None)
        COUNTERS.bytes_by_kind.pop(d, None)


_RETIRED: list = []  # the process groups of the last close_process_groups(), kept alive on purpose


def close_process_groups() -> None:
    """dist.destroy_process_group() without gloo's teardown deadlock.

    A gloo group's C++ destructor joins its worker threads while the caller holds the GIL; a worker
    that is just then releasing its last collective's tensor (one whose Python object went away
    first) waits for the GIL, and the process hangs for good (seen once in ~40 two-rank DDP runs:
    ~ProcessGroupGloo in std::thread::join, the worker in gil_scoped_acquire under ~AsyncWork).
    So the groups are kept referenced past destroy_process_group (it only shuts them down), and
    the previous call's groups, idle since then, are the ones released. Groups still alive at exit
    go with the process (torchrun workers end with os._exit) or the interpreter's teardown.
    """
    if not dist.is_initialized():
        return
    world = dist.distributed_c10d._world
    groups = list(getattr(world, "pg_map", {}))
    _RETIRED.clear()  # idle since the last run ended
    dist.destroy_process_group()
    _RETIRED.extend(groups)
