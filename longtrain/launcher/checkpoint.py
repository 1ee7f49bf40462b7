"""Sharded checkpoints with torch.distributed.checkpoint (DCP), published atomically.

The folder's layout (step_N/, step_N.tmp/, latest) is launcher/ckpt_layout.py's.

A save writes into `<name>.tmp`, then rank 0 renames it to `<name>` and rewrites `latest`
(write + fsync + os.replace), so a crash at any moment leaves the previous checkpoint usable.
meta.json holds the step, the global data position, the run's shape and the size and CRC-32 of
every file of the checkpoint (each rank digests the shards it wrote); nothing is ever unpickled
(DCP reads tensors; meta is JSON). Resuming verifies them (the ranks share the files to check):
`resume = "auto"` skips a damaged or incomplete checkpoint with one warning and takes the
newest intact one; a damaged checkpoint named explicitly is an error.
"""

from __future__ import annotations

import json
import logging
import zlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pickle

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from longtrain.errors import CheckpointError
from longtrain.launcher.ckpt_layout import LATEST, is_complete, newest_complete, step_folders, step_name

log = logging.getLogger("longtrain")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a checkpoint folder; CheckpointError if it is missing or unreadable."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not is_complete(p):
        raise CheckpointError(f"checkpoint {p} is incomplete or unreadable (no .metadata/meta.json)")
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p} has an unreadable meta.json: {e}") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"checkpoint {p} has a meta.json without a step")
    try:
        with open(p / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise CheckpointError(f"checkpoint {p} has unreadable DCP metadata (.metadata): {e}") from None
    return meta


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's pickled .metadata but refuses any class outside DCP's own metadata types."""

    _ALLOWED = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem") \
                or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata load cannot run arbitrary code."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) are read with torch.load(weights_only=True).

    Mesa's running estimates of checkpointed inputs (`mesa.ranges.input<i>`) that a checkpoint
    lacks (saved without activation checkpointing, or before 8-bit inputs existed) start fresh
    instead of failing the load; every other missing key still fails it."""

    OPTIONAL = ".mesa.ranges.input"

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is None:
            return
        have = metadata.state_dict_metadata
        for k in [k for k in self.state_dict if self.OPTIONAL in k and k not in have]:
            del self.state_dict[k]

    def load_bytes(self, read_item, value) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state: dict[str, Any], path: str | os.PathLike) -> None:
    """dcp.load without unpickling arbitrary objects (metadata allow-list, weights_only bytes)."""
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())


def file_digest(path: Path) -> dict[str, int]:
    """{"size": bytes, "crc32": CRC-32} of one file, read in 8 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(8 << 20)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def _my_files(folder: Path, rank: int, world: int, dcp_layout: bool) -> list[Path]:
    """The files this rank digests after a save: the DCP shards it wrote (__RANK_*.distcp; rank 0
    also .metadata), or with another layout a round-robin share of all files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "meta.json")
    if dcp_layout:
        mine = [p for p in files if p.name.startswith(f"__{rank}_")]
        if rank == 0:
            mine += [p for p in files if not p.name.startswith("__")]
        return mine
    return files[rank::world]


def verify_files(folder: Path, meta: dict[str, Any], rank: int = 0, world: int = 1) -> list[str]:
    """Problems with this rank's round-robin share of the files listed in meta.json (empty: intact)."""
    listed = sorted((meta.get("files") or {}).items())
    problems = []
    for name, want in listed[rank::world]:
        f = folder / name
        if not f.is_file():
            problems.append(f"missing file {name}")
            continue
        size = f.stat().st_size
        if size != want["size"]:
            problems.append(f"{name} is {size} bytes, {want['size']} were written (truncated or overwritten)")
            continue
        if file_digest(f)["crc32"] != want["crc32"]:
            problems.append(f"{name} fails its checksum (damaged)")
    return problems


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_checkpoint(path: Path) -> list[str]:
    """Collective: what is wrong with checkpoint `path` (empty list: complete and intact)."""
    problems: list[str] = []
    meta = None
    if _rank() == 0:
        try:
            meta = read_meta(path)
        except CheckpointError as e:
            problems.append(str(e).replace(f"checkpoint {path} ", ""))
    meta = _gather(meta)[0]
    if meta is None:
        problems = _gather(problems)[0]
        return problems or ["unreadable"]
    world = dist.get_world_size() if dist.is_initialized() else 1
    mine = verify_files(path, meta, _rank(), world)
    return [p for part in _gather(mine) for p in part]


class Checkpointer:
    def __init__(self, root: str | os.PathLike, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.pending = None

    def prepare(self) -> None:
        """Create the folder and remove partial saves left by a crash (rank 0)."""
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for p in self.root.glob("*.tmp"):
                log.warning("removing partial checkpoint %s (a save was interrupted)", p)
                shutil.rmtree(p, ignore_errors=True)
        _barrier()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return step_folders(self.root)

    def latest(self) -> Path | None:
        """The checkpoint named by `latest` if complete, else the newest complete one."""
        return newest_complete(self.root, warn=lambda p: log.warning(
            "'latest' names %s, which is incomplete; using the newest complete checkpoint", p))

    def steps(self) -> list[Path]:
        """Every published step_N folder (complete or not), newest first."""
        return step_folders(self.root, complete=False)[::-1]

    def resume_point(self) -> Path | None:
        """Collective: the newest checkpoint that is complete and intact, for resume = "auto".

        Newer ones that are damaged or incomplete are skipped with one warning each (rank 0)."""
        for p in self.steps():
            problems = check_checkpoint(p)
            if not problems:
                return p
            if _rank() == 0:
                log.warning("checkpoint %s is unusable (%s); trying the one before it", p,
                            "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else ""))
        return None

    def save(self, step: int, state: dict[str, Any] | None, meta: dict[str, Any],
             write: Callable[[Path], None] | None = None, *, background: bool = False,
             group: "dist.ProcessGroup | None" = None) -> Path | None:
        """Collective: every rank calls it. Writes `state` with DCP (or calls `write(tmp_dir)`, e.g. an
        engine with its own format), adds meta.json, then publishes. Returns the published folder.

        background=True: DCP's asynchronous save (state staged to CPU memory now, files written by a
        thread over `group`, a gloo group); returns None at once, and `poll()` / `wait()` publish it
        once every rank's write has finished. At most one save is in flight: a new one first waits
        for the previous."""
        self.wait()
        name = step_name(step)
        tmp = self.root / f"{name}.tmp"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        t0 = time.perf_counter()
        if background and write is None:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)
            self.pending = (step, meta, future, t0)  # (step, meta, future, start time)
            _fault("crash_during_async_save", step)
            return None
        if write is not None:
            write(tmp)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
        return self._publish(step, meta, t0, dcp_layout=write is None)

    def poll(self) -> Path | None:
        """Collective, once per step: publish the background save if every rank's write is done."""
        if self.pending is None:
            return None
        done = torch.tensor([1.0 if self.pending[2].done() else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=_cpu_group())
        return self.wait() if done.item() > 0 else None

    def wait(self) -> Path | None:
        """Collective: finish and publish the background save in flight, if any."""
        if self.pending is None:
            return None
        step, meta, future, t0 = self.pending
        self.pending = None
        future.result()  # re-raises a failed write
        return self._publish(step, meta, t0, dcp_layout=True)

    def _publish(self, step: int, meta: dict[str, Any], t0: float, dcp_layout: bool) -> Path:
        name = step_name(step)
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        _barrier()  # every rank's files are written
        world = dist.get_world_size() if dist.is_initialized() else 1
        digests = {p.relative_to(tmp).as_posix(): file_digest(p)
                   for p in _my_files(tmp, _rank(), world, dcp_layout=dcp_layout)}
        files = {k: v for part in _gather(digests) for k, v in part.items()}
        if _rank() == 0:
            with open(tmp / "meta.json", "w") as f:
                json.dump({**meta, "step": step, "saved_at": time.time(), "files": files}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
        _fault("crash_during_save", step)
        _barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ptr_tmp = self.root / "latest.tmp"
            with open(ptr_tmp, "w") as f:
                f.write(name)
                f.flush()
                os.fsync(f.fileno())
            os.replace(ptr_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            for old in self.complete()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s saved in %.2fs", final, time.perf_counter() - t0)
        _barrier()
        _fault("pause_after_save", step)
        return final

    @staticmethod
    def load(path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load DCP shards into `state` in place (any world size); return meta."""
        meta = read_meta(path)
        try:
            safe_load(state, path)
        except (Exception, dcp.api.CheckpointException) as e:  # DCP's exception is a BaseException
            first = str(e).strip().splitlines()
            raise CheckpointError(f"cannot load checkpoint {path}: {first[-1] if first else type(e).__name__}") from None
        return meta


_CPU_GROUP: list = []


def _cpu_group():
    """A gloo group over all ranks for the checkpoint's own small CPU collectives (cached)."""
    if not _CPU_GROUP:
        _CPU_GROUP.append(dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None)
    return _CPU_GROUP[0]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fault(kind: str, step: int) -> None:
    """Test hooks, set by LONGTRAIN_FAULT:
    'crash_during_save:STEP'  rank 0 kills itself (SIGKILL) after writing shards, before publishing;
    'pause_after_save:STEP'   every rank sleeps after publishing STEP (the test then SIGKILLs the job);
    'crash_during_async_save:STEP'  rank 0 kills itself while the background write of STEP runs.
    """
    spec = os.environ.get("LONGTRAIN_FAULT", "")
    if spec != f"{kind}:{step}":
        return
    if kind in ("crash_during_save", "crash_during_async_save") and _rank() == 0:
        log.error("fault injection: %s at step %d", kind, step)
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "pause_after_save":
        log.error("fault injection: %s at step %d", kind, step)
        piddir = os.environ.get("LONGTRAIN_FAULT_PIDDIR")
        if piddir:  # torchrun starts workers in sessions of their own: tell the test whom to kill
            Path(piddir, f"rank{_rank()}.pid").write_text(str(os.getpid()))
        from longtrain.launcher import signals

        while signals.requested is None:  # a save-on-signal signal ends the pause (the step loop then exits)
            time.sleep(0.2)
