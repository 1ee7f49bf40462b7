"""Who am I: rank / world / local rank and the rendezvous address, in one place.

Discovery order (the first that applies wins):
1. torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK);
2. a Slurm job step started by srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, processes per
   node from SLURM_STEP_TASKS_PER_NODE, MASTER_ADDR = first host of the step's node list (unless
   set), MASTER_PORT = 29500 + job id % 20000 (unless set), the same rule the sbatch templates use;
3. MPI through mpi4py (mpirun / srun --mpi=pmix): rank and size from COMM_WORLD, local rank from
   processor names, MASTER_ADDR and a free port chosen by rank 0 and broadcast;
4. a single process.

Whatever found them, srun and mpirun ranks then EXPORT the result (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) before any engine starts: DeepSpeed reads LOCAL_RANK
itself. Per-task GPU binding (srun --gpus-per-task=1, --gpu-bind=single:1, an mpirun wrapper that
sets CUDA_VISIBLE_DEVICES per rank) leaves each task fewer visible GPUs than tasks on its node: the
task then uses its own first device instead of `cuda:LOCAL_RANK` (`cuda_device_index`).

Half-set environments are LaunchErrors with a one-line message, raised before any process group
is joined (a wrong world size would otherwise hang at the rendezvous). So are the rendezvous
mistakes met on real clusters (`check_rendezvous`): a job script made for N nodes running on an
allocation of another size, a MASTER_ADDR that does not resolve, a rendezvous port already in use.
The sbatch templates run the same checks once before launching (`python -m longtrain.launcher.env
preflight`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

from longtrain.launcher.devices import GPU_DEVICE_NODES, check_gpus, cuda_device_index, per_task_binding  # noqa: F401
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
    addr = os.environ.get("MASTER_ADDR", "").strip() or (node_addr(expand_nodelist(nodelist)[0]) if nodelist else "")
    if world > 1 and not addr:
        raise LaunchError("under srun without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST or MASTER_ADDR: "
                          "cannot find rank 0's host")
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    per_node = expand_tasks_per_node(spec) if spec else [world]
    node = _int_env("SLURM_NODEID") or 0
    local_world = per_node[node] if node < len(per_node) else per_node[0]
    port = _port_env() or (DEFAULT_PORT + (_int_env("SLURM_JOB_ID") or 0) % 20000)
    return DistEnv(rank, world, local, local_world, addr or "127.0.0.1", port, "slurm")


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        return True
    except (OSError, UnicodeError):
        return False


def node_addr(node: str) -> str:
    """The address of Slurm node `node`: its name when that resolves, else its NodeAddr from
    `scontrol show node` (clusters, and the local multi-node test cluster, whose node names are not
    in DNS); the name itself when neither helps (check_rendezvous then says it does not resolve)."""
    if _resolves(node):
        return node
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else node


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
    # the ranks on this host: MPI's own node split (right even where host names repeat, e.g. network
    # namespaces or containers), processor names as a fallback
    try:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local, local_world = node.Get_rank(), node.Get_size()
        node.Free()
    except Exception:  # noqa: BLE001 - an MPI without MPI-3 shared-memory splits
        names = comm.allgather(MPI.Get_processor_name())
        local = sum(1 for n in names[:rank] if n == names[rank])
        local_world = sum(1 for n in names if n == names[rank])
    one_host = comm.allreduce(local_world) == world * world if world > 1 else True
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR", "").strip() or ("127.0.0.1" if one_host else _own_address())
        try:
            port = _port_env() or _free_port()
            if world > 1:
                check_rendezvous(addr, port, host=True)
        except LaunchError as e:
            port = -1
            addr = str(e)
    else:
        addr, port = "", 0
    addr, port = comm.bcast((addr, port), root=0)
    if port == -1:  # rank 0's error, raised everywhere
        raise LaunchError(addr)
    return DistEnv(rank, world, local, local_world, addr, port, "mpi")


def _iface_address(name: str) -> str | None:
    """IPv4 address of network interface `name` (Linux), None if it has none."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
        return socket.inet_ntoa(res[20:24])
    except (OSError, ValueError):
        return None


def _own_address() -> str:
    """An address other hosts can reach: the interface named by GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
    (the one the process group will use), else the host name's address unless it is loopback, else
    the interface that routes outwards (no packet is sent), else the first non-loopback interface."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        for name in os.environ.get(var, "").split(","):
            name = name.strip()
            if name and not name.startswith("^") and (a := _iface_address(name.lstrip("="))):
                return a
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
        pass
    for _, name in socket.if_nameindex():
        a = _iface_address(name)
        if a and not a.startswith("127."):
            return a
    return "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def check_nodes() -> None:
    """LaunchError when the job script was made for another node count than the allocation has
    (`longtrain slurm --nodes N` exports LONGTRAIN_NODES; `sbatch --nodes M` can override it)."""
    planned = _int_env("LONGTRAIN_NODES")
    got = _int_env("SLURM_JOB_NUM_NODES") or _int_env("SLURM_NNODES")
    if planned is not None and got is not None and planned != got:
        raise LaunchError(f"this job was made for {planned} node(s) (longtrain slurm --nodes {planned}) but its "
                          f"allocation has {got} (SLURM_JOB_NUM_NODES={got}): submit it without overriding the node "
                          f"count, or regenerate the script with --nodes {got}")


def check_rendezvous(addr: str, port: int, *, host: bool) -> None:
    """LaunchError when rank 0's address `addr` does not resolve, or (`host`: this process will listen
    there, i.e. rank 0 or the rendezvous host) when `port` is already taken on this machine. Both
    would otherwise surface as a rendezvous timeout, or as joining a stranger's rendezvous."""
    if not _resolves(addr):
        raise LaunchError(f"MASTER_ADDR {addr!r} does not resolve on {socket.gethostname()}: set MASTER_ADDR to an "
                          "address of rank 0's node that every node can reach (under Slurm: its NodeAddr, "
                          "`scontrol show node NAME`)")
    if not host:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does: TIME_WAIT is no conflict
        try:
            s.bind(("", port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise LaunchError(f"cannot listen on rendezvous port {port} on {socket.gethostname()}: "
                                  f"{e.strerror}") from None
            raise LaunchError(f"rendezvous port {port} on {socket.gethostname()} ({addr}) is already in use "
                              "(another job or a stale process?): choose another with MASTER_PORT "
                              "(RDZV_PORT for slurm/torchrun.sbatch)") from None


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
                export_env(env)
                _DISCOVERED = env
                break
        else:
            _DISCOVERED = DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")
    return _DISCOVERED


def export_env(env: DistEnv) -> None:
    """Export the discovered identity as the torchrun variables, so that code reading them directly
    (DeepSpeed's engine needs LOCAL_RANK; torch's env:// rendezvous) agrees with longtrain under srun
    and mpirun. Under torchrun only what it left unset is filled in."""
    values = {"RANK": env.rank, "WORLD_SIZE": env.world_size, "LOCAL_RANK": env.local_rank,
              "LOCAL_WORLD_SIZE": env.local_world_size, "MASTER_ADDR": env.master_addr,
              "MASTER_PORT": env.master_port}
    for name, value in values.items():
        if env.source == "torchrun":
            os.environ.setdefault(name, str(value))
        else:
            os.environ[name] = str(value)


def reset_discovery() -> None:
    """Forget the cached discovery (tests that change the environment)."""
    global _DISCOVERED
    _DISCOVERED = None


def check_world(env: DistEnv, sp: int = 1) -> None:
    """LaunchError unless the world splits into sequence-parallel groups of `sp` ranks."""
    if sp <= 0:
        raise LaunchError(f"parallel.sp must be > 0, got {sp}")
    if env.world_size % sp:
        raise LaunchError(f"world size {env.world_size} ({env.source}) is not divisible by parallel.sp = {sp}: "
                          f"start a multiple of {sp} processes")


def init_distributed(device: str = "auto", timeout_s: int = 1800, *, sp: int = 1,
                     cpu_collectives: bool = False) -> tuple[DistEnv, torch.device]:
    """Discover the environment, check it, pick the device and start the default process group.

    CPU -> gloo, CUDA -> NCCL. Every check (half-set variables, world not divisible by `sp`,
    more local processes than visible GPUs) raises LaunchError before the rendezvous, on every rank.
    """
    import torch
    import torch.distributed as dist

    env = discover()
    check_world(env, sp)
    use_cuda = check_gpus(env.local_world_size, device, env.source)
    if env.world_size > 1 and not dist.is_initialized():
        check_nodes()
        if env.source != "mpi":  # MPI discovery checked it on rank 0 and told everyone
            # under torchrun the agent already listens on MASTER_PORT (its store is shared with the workers)
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            check_rendezvous(env.master_addr, env.master_port, host=env.rank == 0 and not agent_store)
    if use_cuda:
        index = cuda_device_index(env.local_rank, env.local_world_size, torch.cuda.device_count(), env.source)
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = env.master_addr
        os.environ["MASTER_PORT"] = str(env.master_port)
        # cpu_collectives: host-resident DTensors (FSDP2's CPU offload: the gradient norm of CPU shards)
        # reduce over gloo, everything else over NCCL
        backend = ("cpu:gloo,cuda:nccl" if cpu_collectives else "nccl") if use_cuda else "gloo"
        try:
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                    timeout=timedelta(seconds=timeout_s),
                                    **({"device_id": dev} if use_cuda else {}))
        except (RuntimeError, ValueError) as e:
            hint = ""
            if use_cuda and per_task_binding(torch.cuda.device_count(), env.local_world_size, env.source):
                hint = (" (each task sees only its own GPUs here: if two tasks were given the same GPU, bind "
                        "one per task with srun --gpus-per-task=1 or --gpu-bind=single:1)")
            raise LaunchError(f"could not join the process group at {env.master_addr}:{env.master_port} "
                              f"as rank {env.rank}/{env.world_size} ({env.source}): {str(e).splitlines()[0]}"
                              f"{hint}") from None
        if env.world_size > 1:
            _report_placement(env)
    return env, dev


def _node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


_PEERS: list[tuple[str, int, str]] = []


def process_space() -> str:
    """Which process table this process lives in (boot id + pid namespace): a pid names the same
    process only within one (faults.py kills a stuck rank by pid only there)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"{socket.gethostname()}:?"


def peers() -> list[tuple[str, int, str]]:
    """(node name, pid, process_space) of every rank, gathered when the process group started."""
    return _PEERS


def _report_placement(env: DistEnv) -> None:
    """Every rank learns where the others run (peers()); rank 0 prints which node each rank runs on
    when the ranks span several nodes."""
    import torch.distributed as dist

    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, (_node_name(), os.getpid(), process_space()))
    _PEERS[:] = [tuple(g) for g in gathered]
    names = [g[0] for g in gathered]
    if env.rank != 0 or len(set(names)) < 2:
        return
    by_node: dict[str, list[int]] = {}
    for r, n in enumerate(names):
        by_node.setdefault(str(n), []).append(r)
    parts = [f"{n} (rank{'s' if len(rs) > 1 else ''} {_ranges(rs)})" for n, rs in by_node.items()]
    shown = ", ".join(parts[:16]) + (f", ... {len(parts) - 16} more" if len(parts) > 16 else "")
    print(f"ranks on {len(by_node)} nodes: {shown}", flush=True)


def _ranges(ranks: list[int]) -> str:
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def preflight(argv: list[str]) -> int:
    """`python -m longtrain.launcher.env preflight --addr A --port P`: the sbatch templates' checks on
    the first node before anything starts (node count vs allocation, A resolves, P free here)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m longtrain.launcher.env preflight")
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    try:
        check_nodes()
        check_rendezvous(a.addr, a.port, host=True)
    except LaunchError as e:
        print(f"longtrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["preflight"]:
        sys.exit("usage: python -m longtrain.launcher.env preflight --addr ADDR --port PORT")
    sys.exit(preflight(sys.argv[2:]))
