"""Who am I: rank / world / local rank and the rendezvous address, in one place.

Discovery order: torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), then Slurm (SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID, MASTER_ADDR from the first host of SLURM_JOB_NODELIST), then MPI
through mpi4py (rank, size, local rank from processor names, MASTER_ADDR
broadcast from rank 0), else a single process.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from longtrain.errors import LaunchError

log = logging.getLogger("longtrain")

DEFAULT_PORT = 29500


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | mpi | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise LaunchError(f"environment variable {name}={v!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list like 'gpu[01-03,07],login1' into host names."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.match(r"^(.*?)\[([^\]]*)\](.*)$", part)
        if not m:
            hosts.append(part)
            continue
        prefix, body, suffix = m.groups()
        for rng in body.split(","):
            if "-" in rng:
                a, b = rng.split("-", 1)
                for i in range(int(a), int(b) + 1):
                    hosts.append(f"{prefix}{str(i).zfill(len(a))}{suffix}")
            else:
                hosts.append(f"{prefix}{rng}{suffix}")
    return hosts


def _from_torchrun() -> DistEnv | None:
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        raise LaunchError("half-set launcher environment: RANK and WORLD_SIZE must both be set")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    addr = os.environ.get("MASTER_ADDR")
    if world > 1 and not addr:
        raise LaunchError("RANK/WORLD_SIZE are set but MASTER_ADDR is missing: set MASTER_ADDR (and MASTER_PORT) "
                          "to the address of rank 0, or start with torchrun")
    local = _int_env("LOCAL_RANK")
    return DistEnv(rank, world, local if local is not None else rank,
                   _int_env("LOCAL_WORLD_SIZE") or world, addr or "127.0.0.1",
                   _int_env("MASTER_PORT") or DEFAULT_PORT, "torchrun")


def _from_slurm() -> DistEnv | None:
    rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
    if rank is None or world is None:
        return None
    local = _int_env("SLURM_LOCALID")
    if local is None:
        raise LaunchError("SLURM_PROCID is set but SLURM_LOCALID is missing: launch the tasks with srun")
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    addr = os.environ.get("MASTER_ADDR") or (expand_nodelist(nodelist)[0] if nodelist else "")
    if world > 1 and not addr:
        raise LaunchError("under Slurm without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find rank 0's host")
    tasks_per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"(\d+)", tasks_per_node)
    port = _int_env("MASTER_PORT") or (DEFAULT_PORT + (_int_env("SLURM_JOB_ID") or 0) % 20000)
    return DistEnv(rank, world, local, int(m.group(1)) if m else 1, addr or "127.0.0.1", port, "slurm")


def _mpi_launched() -> bool:
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"))


def _from_mpi() -> DistEnv | None:
    if not _mpi_launched():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError("started under MPI but mpi4py is not installed: pip install 'longtrain[mpi]'") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    names = comm.allgather(MPI.Get_processor_name())
    local = sum(1 for n in names[:rank] if n == names[rank])
    local_world = sum(1 for n in names if n == names[rank])
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or _own_address()
        port = _int_env("MASTER_PORT") or _free_port()
    else:
        addr, port = "", 0
    addr, port = comm.bcast((addr, port), root=0)
    return DistEnv(rank, world, local, local_world, addr, port, "mpi")


def _own_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    """True when torchrun, Slurm (srun) or mpirun started this process."""
    return ("RANK" in os.environ or "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ
            or _mpi_launched())


def discover() -> DistEnv:
    """Find rank/world/rendezvous from the environment (torchrun > Slurm > MPI > single)."""
    for probe in (_from_torchrun, _from_slurm, _from_mpi):
        env = probe()
        if env is not None:
            return env
    return DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> tuple[DistEnv, torch.device]:
    """Discover the environment, pick the device and start the default process group.

    CPU -> gloo, CUDA -> NCCL. Raises LaunchError for inconsistent launches (e.g. more local
    ranks than visible GPUs).
    """
    env = discover()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise LaunchError("training.device = 'cuda' but no CUDA GPU is visible")
        n = torch.cuda.device_count()
        if env.local_rank >= n:
            raise LaunchError(f"local rank {env.local_rank} needs GPU {env.local_rank} but only {n} GPU(s) are visible "
                              f"(requested {env.local_world_size} processes per node)")
        torch.cuda.set_device(env.local_rank)
        dev = torch.device("cuda", env.local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = env.master_addr
        os.environ["MASTER_PORT"] = str(env.master_port)
        backend = "nccl" if use_cuda else "gloo"
        try:
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                    timeout=timedelta(seconds=timeout_s),
                                    **({"device_id": dev} if use_cuda else {}))
        except (RuntimeError, ValueError) as e:
            raise LaunchError(f"could not join the process group at {env.master_addr}:{env.master_port} "
                              f"as rank {env.rank}/{env.world_size} ({env.source}): {str(e).splitlines()[0]}") from None
    return env, dev
