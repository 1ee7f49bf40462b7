"""Who am I: rank / world / local rank and the rendezvous address, in one place.

Discovery order (the first that applies wins):
1. torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK);
2. a Slurm job step started by srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, processes per
   node from SLURM_STEP_TASKS_PER_NODE, MASTER_ADDR = first host of the step's node list (unless
   set), MASTER_PORT = 29500 + job id % 20000 (unless set), the same rule the sbatch templates use;
3. MPI through mpi4py (mpirun / srun --mpi=pmix): rank and size from COMM_WORLD, local rank from
   processor names, MASTER_ADDR and a free port chosen by rank 0 and broadcast;
4. a single process.

Half-set environments are LaunchErrors with a one-line message, raised before any process group
is joined (a wrong world size would otherwise hang at the rendezvous).
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
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


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
    if v is None or v.strip() == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise LaunchError(f"environment variable {name}={v!r} is not an integer") from None


def _port_env() -> int | None:
    port = _int_env("MASTER_PORT")
    if port is not None and not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


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


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand Slurm's tasks-per-node notation: '4(x2),3' -> [4, 4, 3]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise LaunchError(f"cannot read Slurm tasks-per-node {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _from_torchrun() -> DistEnv | None:
    present = [v for v in _TORCHRUN_VARS if os.environ.get(v, "").strip()]
    if not present:
        return None
    rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
    if rank is None or world is None:
        missing = [v for v in ("RANK", "WORLD_SIZE") if os.environ.get(v, "").strip() == ""]
        raise LaunchError(f"half-set launcher environment: {', '.join(present)} set but {', '.join(missing)} "
                          "missing (set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together, or start with torchrun)")
    if world <= 0:
        raise LaunchError(f"WORLD_SIZE={world} must be > 0")
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is outside WORLD_SIZE={world}")
    addr = os.environ.get("MASTER_ADDR", "").strip()
    port = _port_env()
    if world > 1 and not addr:
        raise LaunchError(f"RANK={rank}/WORLD_SIZE={world} are set but MASTER_ADDR is missing: set MASTER_ADDR "
                          "(and MASTER_PORT) to the address of rank 0, or start with torchrun")
    local, local_world = _int_env("LOCAL_RANK"), _int_env("LOCAL_WORLD_SIZE")
    if local is None:
        if world > 1 and local_world is not None and local_world != world:
            raise LaunchError("LOCAL_WORLD_SIZE is set but LOCAL_RANK is missing")
        local = rank  # one node
    if local_world is None:
        local_world = world if local == rank else local + 1
    if not 0 <= local < local_world:
        raise LaunchError(f"LOCAL_RANK={local} is outside LOCAL_WORLD_SIZE={local_world}")
    return DistEnv(rank, world, local, local_world, addr or "127.0.0.1", port or DEFAULT_PORT, "torchrun")


def _from_slurm() -> DistEnv | None:
    if "SLURM_PROCID" not in os.environ and "SLURM_STEP_ID" not in os.environ:
        return None
    step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
    world = _int_env("SLURM_STEP_NUM_TASKS") or _int_env("SLURM_NTASKS")
    if step is None:
        # the batch script itself (sbatch sets SLURM_PROCID=0 there): only srun tasks are ranks
        if world and world > 1:
            raise LaunchError(f"this Slurm job has {world} tasks but the process was not started by srun: "
                              "launch it as `srun longtrain train ...` (or use slurm/*.sbatch: `longtrain slurm`)")
        return None
    rank, local = _int_env("SLURM_PROCID"), _int_env("SLURM_LOCALID")
    missing = [n for n, v in (("SLURM_PROCID", rank), ("SLURM_NTASKS", world), ("SLURM_LOCALID", local)) if v is None]
    if missing:
        raise LaunchError(f"half-set Slurm environment: {', '.join(missing)} missing in a job step "
                          "(launch the tasks with srun)")
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world}")
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
    addr = os.environ.get("MASTER_ADDR", "").strip() or (expand_nodelist(nodelist)[0] if nodelist else "")
    if world > 1 and not addr:
        raise LaunchError("under srun without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST or MASTER_ADDR: "
                          "cannot find rank 0's host")
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    per_node = expand_tasks_per_node(spec) if spec else [world]
    node = _int_env("SLURM_NODEID") or 0
    local_world = per_node[node] if node < len(per_node) else per_node[0]
    port = _port_env() or (DEFAULT_PORT + (_int_env("SLURM_JOB_ID") or 0) % 20000)
    return DistEnv(rank, world, local, local_world, addr or "127.0.0.1", port, "slurm")


def _mpi_launched() -> bool:
    return any(os.environ.get(v) for v in _MPI_VARS)


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
        one_host = len(set(names)) == 1
        addr = os.environ.get("MASTER_ADDR", "").strip() or ("127.0.0.1" if one_host else _own_address())
        try:
            port = _port_env() or _free_port()
        except LaunchError as e:
            port = -1
            addr = str(e)
    else:
        addr, port = "", 0
    addr, port = comm.bcast((addr, port), root=0)
    if port == -1:  # rank 0's error, raised everywhere
        raise LaunchError(addr)
    return DistEnv(rank, world, local, local_world, addr, port, "mpi")


def _own_address() -> str:
    """An address other hosts can reach: the host name's address unless it is loopback, else the
    address of the interface that routes outwards (no packet is sent)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _slurm_step() -> bool:
    return "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ


def under_launcher() -> bool:
    """True when torchrun, srun (a Slurm job step) or mpirun started this process."""
    return any(os.environ.get(v, "").strip() for v in _TORCHRUN_VARS) or _slurm_step() or _mpi_launched()


_DISCOVERED: DistEnv | None = None


def discover() -> DistEnv:
    """Find rank/world/rendezvous from the environment (torchrun > Slurm > MPI > single).

    Cached: MPI discovery is collective and picks a port, so it must run once per process.
    """
    global _DISCOVERED
    if _DISCOVERED is None:
        for probe in (_from_torchrun, _from_slurm, _from_mpi):
            env = probe()
            if env is not None:
                _DISCOVERED = env
                break
        else:
            _DISCOVERED = DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")
    return _DISCOVERED


def reset_discovery() -> None:
    """Forget the cached discovery (tests that change the environment)."""
    global _DISCOVERED
    _DISCOVERED = None


def _visible_gpus() -> str:
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={v!r})" if v is not None else ""


def check_gpus(procs_per_node: int, device: str = "auto") -> bool:
    """Whether the run uses CUDA; LaunchError if `procs_per_node` processes need more GPUs than visible."""
    if device == "cpu":
        return False
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise LaunchError(f"training.device = 'cuda' but no CUDA GPU is visible{_visible_gpus()}")
    if not available:
        return False
    n = torch.cuda.device_count()
    if procs_per_node > n:
        raise LaunchError(f"{procs_per_node} processes per node need {procs_per_node} GPUs but only {n} "
                          f"{'is' if n == 1 else 'are'} visible{_visible_gpus()}: start at most {n} per node "
                          "(--nproc / --gpus-per-node) or set training.device = 'cpu'")
    return True


def check_world(env: DistEnv, sp: int = 1) -> None:
    """LaunchError unless the world splits into sequence-parallel groups of `sp` ranks."""
    if sp <= 0:
        raise LaunchError(f"parallel.sp must be > 0, got {sp}")
    if env.world_size % sp:
        raise LaunchError(f"world size {env.world_size} ({env.source}) is not divisible by parallel.sp = {sp}: "
                          f"start a multiple of {sp} processes")


def init_distributed(device: str = "auto", timeout_s: int = 1800, *, sp: int = 1) -> tuple[DistEnv, torch.device]:
    """Discover the environment, check it, pick the device and start the default process group.

    CPU -> gloo, CUDA -> NCCL. Every check (half-set variables, world not divisible by `sp`,
    more local processes than visible GPUs) raises LaunchError before the rendezvous, on every rank.
    """
    env = discover()
    check_world(env, sp)
    use_cuda = check_gpus(env.local_world_size, device)
    if use_cuda:
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
