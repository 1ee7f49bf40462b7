"""Ring and TokenRing with their W ranks run as threads of one process.

NCCL cannot place two ranks on one GPU, and gloo has no send/recv for CUDA tensors
(REFERENCES §9), so on a single GPU the sequence-parallel schedules are checked here:
each rank is a thread that runs the very forward/backward functions a real rank runs
(`ring_forward`, `tokenring_backward`, ...), on whatever device the tensors are on;
their point-to-point messages go through an in-memory transport installed in
`comm.TRANSPORT` instead of torch.distributed. Used by `make gpu-check` and tests.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch

from longtrain.kernels.attention import as_bounds
from longtrain.parallel import comm
from longtrain.parallel.sharding import layout_segments, segment_positions

_TIMEOUT_S = 120.0


class SimGroup:
    """Stands for one communicator: messages on different groups never match."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Recv:
    def __init__(self, tr: "ThreadTransport", key: tuple, buf: torch.Tensor) -> None:
        self.tr, self.key, self.buf = tr, key, buf

    def wait(self) -> None:
        tr = self.tr
        with tr.cv:
            tr.baton.release()  # let another rank run while this one is blocked
            try:
                if not tr.cv.wait_for(lambda: tr.box.get(self.key) or tr.failed, timeout=_TIMEOUT_S):
                    raise TimeoutError(f"simulated receive {self.key} never matched by a send")
                if tr.failed:
                    raise RuntimeError("another simulated rank failed")
                msg = tr.box[self.key].pop(0)
            finally:
                tr.cv.release()  # never wait for the baton while holding the mailbox
                tr.baton.acquire()
                tr.cv.acquire()
        if msg.shape != self.buf.shape or msg.dtype != self.buf.dtype:
            raise RuntimeError(f"message {self.key}: sent {tuple(msg.shape)} {msg.dtype}, receive buffer "
                               f"{tuple(self.buf.shape)} {self.buf.dtype}")
        self.buf.copy_(msg)


class _Done:
    def wait(self) -> None:
        pass


class ThreadTransport:
    """In-memory point-to-point: key (group, src, dst, tag), FIFO per key (NCCL's order rule)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.box: dict[tuple, list[torch.Tensor]] = {}
        self.local = threading.local()
        self.failed = False
        # one rank computes at a time (it hands the baton over only while blocked in a receive):
        # torch.compile (FlexAttention) cannot trace from two threads at once, and the order of
        # work becomes deterministic
        self.baton = threading.Lock()

    def global_rank(self, group, peer: int) -> int:
        return peer

    def start(self, group, recvs, sends) -> list:
        me = self.local.rank
        with self.cv:
            for t, peer, tag in sends:
                self.box.setdefault((id(group), me, peer, tag), []).append(t.clone())  # sender may reuse t
            self.cv.notify_all()
        return [_Recv(self, (id(group), peer, me, tag), t) for t, peer, tag in recvs] + [_Done()]

    def fail(self) -> None:
        with self.cv:
            self.failed = True
            self.cv.notify_all()


def simulate_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, world: int, *,
                  impl: str = "ring", causal: bool = True, layout: str = "zigzag",
                  window: int | None = None, cu_seqlens: Sequence[int] | torch.Tensor | None = None,
                  softmax_scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-sequence q [B,S,Hq,D], k/v [B,S,Hkv,D], dout [B,S,Hq,D] -> (out, dq, dk, dv), full length.

    Shards along the sequence in `layout`, runs `impl` ("ring" | "tokenring") forward and
    backward on `world` thread-ranks, and puts the shards back in sequence order.
    """
    from longtrain.parallel.ring import ring_backward, ring_forward
    from longtrain.parallel.ring_common import RingSpec
    from longtrain.parallel.tokenring import tokenring_backward, tokenring_forward

    if impl not in ("ring", "tokenring"):
        raise ValueError(f"simulate_ring runs 'ring' or 'tokenring', got {impl!r}")
    fwd, bwd = (ring_forward, ring_backward) if impl == "ring" else (tokenring_forward, tokenring_backward)
    seq = q.shape[1]
    segs = layout_segments(seq, world, layout)
    bounds = as_bounds(cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    main, twin = SimGroup("ring"), SimGroup("twin")
    idx = [segment_positions(segs[r]).to(q.device) for r in range(world)]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []
    tr = ThreadTransport()

    def run(r: int) -> None:
        tr.local.rank = r
        tr.baton.acquire()
        try:
            rs = RingSpec(main, twin, r, world, segs, causal, window, bounds, scale)
            ql, kl, vl, dl = (x.index_select(1, idx[r]).contiguous() for x in (q, k, v, dout))
            out, lse = fwd(ql, kl, vl, rs)
            dq, dk, dv = bwd(dl, ql, kl, vl, out, lse, rs)
            results[r] = (out, dq, dk, dv)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)
            tr.fail()
        finally:
            tr.baton.release()

    previous, comm.TRANSPORT = comm.TRANSPORT, tr
    try:
        threads = [threading.Thread(target=run, args=(r,), name=f"sim-rank-{r}") for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        comm.TRANSPORT = previous
    if errors:
        raise errors[0]
    full = []
    for i, like in enumerate((q, q, k, v)):
        t = torch.empty(like.shape, dtype=results[0][i].dtype, device=q.device)
        for r in range(world):
            t[:, idx[r]] = results[r][i]
        full.append(t)
    return tuple(full)
