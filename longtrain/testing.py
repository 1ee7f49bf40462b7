"""Helpers for running a function on W gloo processes (tests and benches).

`run_distributed(fn, world_size, *args)` spawns `world_size` processes, sets up
a gloo process group on a free loopback port, calls `fn(rank, world_size, *args)`
in each and returns the list of per-rank return values (must be picklable;
tensors are fine). An exception in any rank is re-raised here with its traceback.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable, Sequence

import numpy as np

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from longtrain.errors import DataError
from longtrain.launcher.data.batches import Sample


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any,
            threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        # serialise here: tensors sent through the queue as shared-memory handles die with this process
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            from longtrain.parallel.comm import close_process_groups
            close_process_groups()


def run_distributed(fn: Callable, world_size: int, *args: Any, threads: int = 1,
                    timeout: float = 300.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks; return per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


# ----------------------------------------------------------------------------- P2P traces


def _comm_name(group: "dist.ProcessGroup | None") -> str:
    if group is None or group == dist.group.WORLD:
        return "WORLD"
    return str(getattr(group, "group_name", None) or dist._get_process_group_name(group))  # noqa: SLF001


class TraceTransport:
    """Records every point-to-point operation of the sequence-parallel code, then performs it.

    Install as `longtrain.parallel.comm.TRANSPORT` in a worker; `ops` lists, in issue order,
    dicts with comm (name), ranks (global ranks of the comm), op ('send' | 'recv'), me and peer
    (global ranks), tag, numel, shape, dtype, contiguous, batch (index of the P2P.start call).
    With `deliver=False` nothing is sent (a dry run: receive buffers keep their contents).
    """

    def __init__(self, deliver: bool = True) -> None:
        self.ops: list[dict[str, Any]] = []
        self.deliver = deliver
        self.batches = 0

    def global_rank(self, group, peer: int) -> int:
        return dist.get_global_rank(group, peer) if group is not None else peer

    def start(self, group, recvs, sends) -> list:
        name = _comm_name(group)
        ranks = tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        me = dist.get_rank()
        for kind, items in (("recv", recvs), ("send", sends)):
            for t, peer, tag in items:
                self.ops.append({"comm": name, "ranks": ranks, "op": kind, "me": me, "peer": peer, "tag": tag,
                                 "numel": t.numel(), "shape": tuple(t.shape), "dtype": str(t.dtype),
                                 "contiguous": t.is_contiguous(), "batch": self.batches})
        self.batches += 1
        if not self.deliver:
            return []
        from longtrain.parallel.comm import launch_p2p

        return launch_p2p(group, recvs, sends)

    def record_collective(self, op: str, group, tensor) -> None:
        self.ops.append({"comm": _comm_name(group), "op": op, "me": dist.get_rank(), "numel": tensor.numel(),
                         "dtype": str(tensor.dtype), "contiguous": tensor.is_contiguous(),
                         "ranks": tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))})


def check_pairing(traces: list[list[dict[str, Any]]]) -> list[str]:
    """Problems that would hang or corrupt NCCL in per-rank traces (empty list = none).

    NCCL matches the point-to-point messages between two ranks on one communicator by order
    alone (no tags): the k-th send a -> b must meet the k-th receive b <- a with the same
    element count and dtype. Peers must be members of the communicator (global ranks), no
    buffer may be non-contiguous, and every member of a communicator must issue the same
    sequence of collectives.
    """
    problems: list[str] = []
    sends: dict[tuple, list[dict]] = {}
    recvs: dict[tuple, list[dict]] = {}
    colls: dict[str, dict[int, list[tuple]]] = {}
    for trace in traces:
        for o in trace:
            if not o["contiguous"]:
                problems.append(f"rank {o['me']}: non-contiguous {o['op']} buffer {o.get('shape')} on {o['comm']}")
            if o["op"] in ("send", "recv"):
                if o["peer"] not in o["ranks"]:
                    problems.append(f"rank {o['me']}: {o['op']} peer {o['peer']} is not a member "
                                    f"{o['ranks']} of {o['comm']} (a group rank passed as a global one?)")
                if o["op"] == "send":
                    sends.setdefault((o["comm"], o["me"], o["peer"]), []).append(o)
                else:
                    recvs.setdefault((o["comm"], o["peer"], o["me"]), []).append(o)
            else:
                colls.setdefault(o["comm"], {}).setdefault(o["me"], []).append((o["op"], o["numel"], o["dtype"]))
    for key in sorted(set(sends) | set(recvs)):
        s, r = sends.get(key, []), recvs.get(key, [])
        comm, a, b = key
        if len(s) != len(r):
            problems.append(f"{comm}: rank {a} sends {len(s)} messages to rank {b}, which posts {len(r)} receives")
        for i, (x, y) in enumerate(zip(s, r)):
            if (x["numel"], x["dtype"]) != (y["numel"], y["dtype"]):
                problems.append(f"{comm}: message {i} from rank {a} to {b}: sent {x['numel']} x {x['dtype']} "
                                f"(tag {x['tag']}), received into {y['numel']} x {y['dtype']} (tag {y['tag']})")
                break
    for comm, per_rank in colls.items():
        seqs = list(per_rank.values())
        if any(sq != seqs[0] for sq in seqs[1:]):
            problems.append(f"{comm}: members issue different collective sequences {per_rank}")
    return problems


# ---- the in-memory reference corpus ---------------------------------------------------------

class PackedCorpus:
    """The in-memory reference for the prepared/memory-mapped data path (launcher/data/corpus.py): all
    documents tokenized, each followed by EOS, concatenated in a seeded document order and cut into
    samples of seq_len+1 read in a seeded order per epoch. Tests compare the real path with it."""

    def __init__(self, documents: Sequence[str], tokenizer, seq_len: int, seed: int = 0,
                 shuffle: bool = True, shuffle_documents: bool = True) -> None:
        if not documents:
            raise DataError("the data source holds no documents")
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        order = np.random.default_rng(seed).permutation(len(documents)) if shuffle_documents else range(len(documents))
        pieces, starts, pos = [], [], 0
        eos = getattr(tokenizer, "eos_id", None)
        for i in order:
            ids = tokenizer.encode(documents[i])
            if eos is not None:
                ids = np.append(ids, eos)
            if len(ids) == 0:
                continue
            pieces.append(ids)
            starts.append(pos)
            pos += len(ids)
        self.tokens = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        self.doc_starts = torch.tensor(starts, dtype=torch.int64)
        self.n_samples = (len(self.tokens) - 1) // seq_len
        if self.n_samples < 1:
            raise DataError(f"the corpus has {len(self.tokens)} tokens: too few for one sample of seq_len={seq_len}")
        self._perm_cache: dict[int, Tensor] = {}

    def with_seq_len(self, seq_len: int) -> "PackedCorpus":
        """The same token stream cut into samples of another length (staged long-context training)."""
        other = object.__new__(PackedCorpus)
        other.__dict__.update(self.__dict__)
        other.seq_len = seq_len
        other.n_samples = (len(self.tokens) - 1) // seq_len
        if other.n_samples < 1:
            raise DataError(f"the corpus has {len(self.tokens)} tokens: too few for one sample of seq_len={seq_len}")
        other._perm_cache = {}
        return other

    def _perm(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n_samples)
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n_samples, generator=g)}
        return self._perm_cache[epoch]

    def sample(self, global_index: int) -> Sample:
        """The sample at position `global_index` of the global order (epochs wrap around)."""
        epoch, i = divmod(global_index, self.n_samples)
        j = int(self._perm(epoch)[i])
        a = j * self.seq_len
        window = self.tokens[a:a + self.seq_len + 1]
        lo = int(torch.searchsorted(self.doc_starts, a, right=True))
        hi = int(torch.searchsorted(self.doc_starts, a + self.seq_len, right=False))
        inner = self.doc_starts[lo:hi] - a
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), inner[inner > 0]])
        return Sample(window[:-1].clone(), window[1:].clone(), starts)

    def batch(self, start: int, count: int) -> list[Sample]:
        return [self.sample(start + i) for i in range(count)]


def train_bpe_tokenizer(out: str | os.PathLike, vocab_size: int = 384, files: Sequence[str] | None = None) -> str:
    """A byte-level BPE tokenizer.json (with <|end_of_text|>) trained on a few stdlib files; returns its path."""
    import sysconfig
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(sysconfig.get_paths()["stdlib"])
    files = list(files) if files else [str(root / f) for f in ("textwrap.py", "string.py", "bisect.py", "heapq.py",
                                                                "shlex.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = Path(out)
    if path.suffix != ".json":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "tokenizer.json"
    tok.save(str(path))
    return str(path)
