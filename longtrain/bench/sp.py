"""`longtrain bench sp`: sequence-parallel attention, every impl against one process.

One job of W gloo ranks times, for each impl, forward+backward of
`sequence_parallel_attention` on this rank's shard of a global problem
[batch, seq, heads, head_dim]; inside the same job rank 0 also times the single-process
run of the whole problem (`attention_block`, same thread count) while the other ranks
wait. Measurements alternate (single, impl1, impl2, ... per repetition) so machine
noise hits all alike. Reports per impl: median time per step (slowest rank), per-rank
bytes sent in each direction, and SP efficiency = T_single / (W * T_rank). On a shared
machine wall time also measures the neighbours, so `cpu_eff` = CPU seconds of the
single run / CPU seconds summed over all ranks (process time, medians) is reported too:
it shows the work SP adds, not the time ranks spend waiting.

`--netns switch|mesh` runs the ranks in Linux network namespaces joined by veth
links with a tc tbf rate limit (root only; set up and always torn down here):
switch = one NIC per node on a bridge; mesh = a veth pair per node pair with /32
routes. Addresses are 10.213.x.y inside our own namespaces only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from longtrain.bench.common import print_table, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- the timed job


def _job(rank: int, world: int, cfg: dict) -> dict:
    from longtrain.kernels import attention_block
    from longtrain.parallel import sequence_parallel_attention
    from longtrain.parallel.comm import COUNTERS

    dt = DTYPES[cfg["dtype"]]
    b, s, h, hkv, d = cfg["batch"], cfg["seq"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    sl = s // world
    gen = torch.Generator().manual_seed(rank)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dt).requires_grad_()

    q, k, v = rnd(b, sl, h, d), rnd(b, sl, hkv, d), rnd(b, sl, hkv, d)
    dout = torch.randn(b, sl, h, d, generator=gen).to(dt)
    kw = dict(causal=cfg["causal"], window=cfg["window"])

    def sp_step(impl):
        out = sequence_parallel_attention(q, k, v, impl=impl, layout=cfg["layout"],
                                          ulysses_degree=cfg["ulysses_degree"], **kw)
        torch.autograd.grad(out, (q, k, v), dout)

    single = None
    if cfg["single"] and rank == 0:
        Q, K, V = rnd(b, s, h, d), rnd(b, s, hkv, d), rnd(b, s, hkv, d)
        dO = torch.randn(b, s, h, d, generator=gen).to(dt)

        def single():
            out, _ = attention_block(Q, K, V, **kw)
            torch.autograd.grad(out, (Q, K, V), dO)

    def timed(fn) -> tuple[float, float]:
        """(wall seconds of the slowest rank, CPU seconds summed over ranks)."""
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if fn is not None:
            fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        c = torch.tensor([time.process_time() - c0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step lasts as long as the slowest rank
        dist.all_reduce(c)
        return t.item(), c.item()

    impls = cfg["impls"]
    steps: dict[str, Any] = {"single": (lambda: single()) if single else None}
    steps.update({impl: (lambda impl=impl: sp_step(impl)) for impl in impls})
    traffic = {}
    for name, fn in steps.items():  # warm-up, then one counted step per impl
        if name == "single" and not cfg["single"]:
            continue
        for _ in range(cfg["warmup"]):
            timed(fn)
        if name != "single":
            COUNTERS.reset()
            fn()
            traffic[name] = COUNTERS.snapshot()
    times: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(cfg["repeat"]):
        for name, fn in steps.items():
            if name == "single" and not cfg["single"]:
                continue
            t, c = timed(fn)
            times[name].append(t)
            cpu[name].append(c)
    return {"times": times, "cpu": cpu, "traffic": traffic, "loadavg": os.getloadavg()}


# ----------------------------------------------------------------------------- netns plumbing

NS_PREFIX = "lt-sp"
CLONE_NEWNET = 0x40000000


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


def _ns(i: int) -> str:
    return f"{NS_PREFIX}{os.getpid() % 10000}-{i}"


def _tbf(ns: str, dev: str, rate: str, burst: str) -> None:
    _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
        "burst", burst, "latency", "100ms")


def _setup_netns(world: int, topology: str, rate: str, burst: str) -> tuple[list[str], list[str], list[str]]:
    """Create namespaces and links; returns (namespaces, node addresses, gloo interface per rank)."""
    names = [_ns(i) for i in range(world)]
    created = []
    try:
        for n in names:
            _sh("ip", "netns", "add", n)
            created.append(n)
            _sh("ip", "-n", n, "link", "set", "lo", "up")
        if topology == "switch":
            sw = _ns("sw")
            _sh("ip", "netns", "add", sw)
            created.append(sw)
            _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", sw, "link", "set", "br0", "up")
            addrs = [f"10.213.1.{r + 1}" for r in range(world)]
            for r, n in enumerate(names):
                _sh("ip", "link", "add", f"ltn{r}", "netns", n, "type", "veth", "peer", "name", f"lts{r}",
                    "netns", sw)
                _sh("ip", "-n", sw, "link", "set", f"lts{r}", "master", "br0")
                _sh("ip", "-n", sw, "link", "set", f"lts{r}", "up")
                _sh("ip", "-n", n, "addr", "add", f"{addrs[r]}/24", "dev", f"ltn{r}")
                _sh("ip", "-n", n, "link", "set", f"ltn{r}", "up")
                _tbf(n, f"ltn{r}", rate, burst)      # what the node sends
                _tbf(sw, f"lts{r}", rate, burst)     # what the node receives
            return created, addrs, [f"ltn{r}" for r in range(world)]
        if topology != "mesh":
            raise ValueError(f"topology must be switch or mesh, got {topology!r}")
        addrs = [f"10.213.0.{r + 1}" for r in range(world)]
        first_dev: dict[int, str] = {}
        for a in range(world):
            for b in range(a + 1, world):
                da, db = f"lt{a}x{b}", f"lt{b}x{a}"
                _sh("ip", "link", "add", da, "netns", names[a], "type", "veth", "peer", "name", db,
                    "netns", names[b])
                for node, dev in ((a, da), (b, db)):
                    if node not in first_dev:  # the node's own address lives on its first link
                        first_dev[node] = dev
                        _sh("ip", "-n", names[node], "addr", "add", f"{addrs[node]}/32", "dev", dev)
                    _sh("ip", "-n", names[node], "link", "set", dev, "up")
                    _tbf(names[node], dev, rate, burst)
        for a in range(world):
            for b in range(world):
                if a != b:
                    _sh("ip", "-n", names[a], "route", "add", f"{addrs[b]}/32", "dev", f"lt{a}x{b}",
                        "src", addrs[a])
        return created, addrs, [first_dev[r] for r in range(world)]
    except BaseException:
        _teardown(created)
        raise


def _teardown(namespaces: list[str]) -> None:
    for n in namespaces:  # deleting a namespace deletes its veth ends (and their peers)
        subprocess.run(["ip", "netns", "delete", n], capture_output=True)


def _netns_worker(rank, world, ns, master, ifname, port, threads, cfg, queue):
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        os.close(fd)
        os.environ.update(MASTER_ADDR=master, MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=ifname)
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, "ok", _job(rank, world, cfg)))
    except BaseException:  # noqa: BLE001
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            from longtrain.parallel.comm import close_process_groups
            close_process_groups()


def _run_netns(world: int, cfg: dict, topology: str, rate: str, burst: str, threads: int) -> list[dict]:
    import torch.multiprocessing as mp

    created, addrs, ifnames = _setup_netns(world, topology, rate, burst)
    procs = []
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_netns_worker, args=(r, world, created[r], addrs[0], ifnames[r], 29500,
                                                          threads, cfg, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, dict] = {}
        for _ in range(world):
            rank, status, payload = queue.get(timeout=cfg.get("timeout", 900))
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        _teardown(created)


# ----------------------------------------------------------------------------- report


def _rows(world: int, cfg: dict, res: list[dict], extra: dict) -> list[dict]:
    times, cpu = res[0]["times"], res[0]["cpu"]  # identical on every rank (all-reduced)
    t_single = statistics.median(times["single"]) if times.get("single") else None
    c_single = statistics.median(cpu["single"]) if cpu.get("single") else None
    rows = []
    for impl in cfg["impls"]:
        t = statistics.median(times[impl])
        c = statistics.median(cpu[impl])
        per_rank = [r["traffic"][impl]["bytes_sent"] for r in res]
        mb = {d: sum(p.get(d, 0) for p in per_rank) / len(per_rank) / 2**20 for d in ("up", "down", "a2a")}
        rows.append({**extra, "impl": impl, "seq": cfg["seq"], "W": world, "heads": cfg["heads"],
                     "kv_heads": cfg["kv_heads"], "t_single_s": t_single, "t_rank_s": t,
                     "sp_eff": (t_single / (world * t)) if t_single else None,
                     "sp_eff_best": (min(times["single"]) / (world * min(times[impl]))) if t_single else None,
                     "cpu_single_s": c_single, "cpu_ranks_s": c,
                     "cpu_eff": (c_single / c) if c_single else None,
                     "MB_up": mb["up"], "MB_down": mb["down"], "MB_a2a": mb["a2a"],
                     "MB_max_rank": max(sum(p.values()) for p in per_rank) / 2**20,
                     "times_s": times[impl], "loadavg_end": res[0]["loadavg"]})
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="longtrain bench sp", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[8192], help="global sequence lengths")
    p.add_argument("--world", "-W", type=int, default=2, help="sequence-parallel ranks")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, nargs="+", default=None,
                   help="kv heads (several values: one run each; default = heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (and for the single run)")
    p.add_argument("--impls", default="ring,tokenring,ulysses,hybrid")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--ulysses-degree", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-single", action="store_true", help="skip the single-process reference")
    p.add_argument("--netns", choices=["switch", "mesh"], nargs="+", default=None,
                   help="run ranks in network namespaces with rate-limited veth links (root)")
    p.add_argument("--rate", default="1gbit", help="tc tbf rate per link direction (netns mode)")
    p.add_argument("--burst", default="256kb", help="tc tbf burst (netns mode; >= 256kb)")
    p.add_argument("--out", default=None, help="JSON path (default bench-results/sp.json)")
    a = p.parse_args(argv)

    impls = [x for x in a.impls.split(",") if x]
    rows: list[dict] = []
    for kvh in a.kv_heads or [a.heads]:
        for seq in a.seq:
            cfg = dict(seq=seq, batch=a.batch, heads=a.heads, kv_heads=kvh, head_dim=a.head_dim,
                       dtype=a.dtype, impls=impls, layout=a.layout, causal=not a.no_causal,
                       window=a.window, ulysses_degree=a.ulysses_degree, repeat=a.repeat,
                       warmup=a.warmup, single=not a.no_single and not a.netns)
            if a.netns:
                if os.geteuid() != 0:
                    print("--netns needs root", file=sys.stderr)
                    return 2
                for topo in a.netns:
                    res = _run_netns(a.world, cfg, topo, a.rate, a.burst, a.threads)
                    rows += _rows(a.world, cfg, res, {"net": f"{topo}@{a.rate}"})
            else:
                from longtrain.testing import run_distributed
                res = run_distributed(_job, a.world, cfg, threads=a.threads, timeout=1800)
                rows += _rows(a.world, cfg, res, {"net": "loopback"})
    cols = ["net", "impl", "seq", "W", "heads", "kv_heads", "t_single_s", "t_rank_s", "sp_eff", "sp_eff_best",
            "cpu_eff", "MB_up",
            "MB_down", "MB_a2a", "MB_max_rank"]
    print_table(rows, cols)
    if a.netns:  # TokenRing vs ring side by side
        ratios = []
        for net in dict.fromkeys(r["net"] for r in rows):
            for kvh in a.kv_heads or [a.heads]:
                for seq in a.seq:
                    sel = {r["impl"]: r["t_rank_s"] for r in rows
                           if r["net"] == net and r["kv_heads"] == kvh and r["seq"] == seq}
                    if "ring" in sel and "tokenring" in sel:
                        ratios.append({"net": net, "seq": seq, "kv_heads": kvh, "ring_s": sel["ring"],
                                       "tokenring_s": sel["tokenring"],
                                       "tokenring/ring": sel["tokenring"] / sel["ring"]})
        if ratios:
            print()
            print_table(ratios)
    write_json("sp", {"args": vars(a), "rows": rows}, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
