"""`make gpu-check-multi` / `longtrain bench gpu-check --multi`: the checks that need >= 2 GPUs.

One process per GPU (NCCL), started here; `--cpu` runs the same on gloo with `--nproc` processes
(CI does, with 4, as a dry run of the plumbing). Phases, each a fresh set of processes:

  1, N ranks  g  sequence parallelism in a real process group: sp = 2/4/8 (those dividing N), dp = N/sp,
                 every SP impl (ring, tokenring, ulysses, hybrid, hybrid-tokenring), causal / window /
                 documents (+ lightning layers with documents), with and without sp_one_communicator:
                 the summed loss and every gradient (all-reduced over dp x sp) against sp = 1 (the
                 same batches, full sequences, on each rank); fp32, TF32 off
              h  FSDP2 vs DDP, both with sp = 2: per-step losses of real training (Trainer)
              i  DCP checkpoint written by N ranks (FSDP2, dp = N) at the middle step
  2, N/2      i  resumed by N/2 ranks (grad_accum 2: the same global batch and sample order): the
                 losses of the second half equal the N-rank run's
  3, 2 ranks  j  hang drill: rank 0 skips a collective; the other must end after the short
                 collective timeout (init_distributed(timeout_s), what training.collective_timeout_s
                 sets) with a report; on NCCL each hung rank's flight recorder
                 (TORCH_NCCL_TRACE_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT) dumps its last collectives
Every worker runs with the flight recorder on and a short collective timeout, so a hang anywhere
ends with a report (the driver also names the check each rank was in). Writes
bench-results/gpu-check-multi.json; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from longtrain.bench.gpu_table import ROWS, T0, add_row, print_table
from longtrain.parallel.rules import SP_IMPLS


def _extra_sleep(timeout_s: float) -> float:
    """How much longer than the others' timeout the drill's silent rank stays alive (leaving
    earlier would end their collective with a closed connection, not with the timeout)."""
    return min(20.0, max(5.0, timeout_s))


# ----------------------------------------------------------------------------- worker side


def _progress(work: Path, rank: int, what: str) -> None:
    with open(work / f"progress.rank{rank}", "a") as f:
        f.write(f"{time.perf_counter() - T0:.1f}s {what}\n")


def _flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in model.parameters()])


def _sizes(cuda: bool) -> dict[str, int]:
    if cuda:
        return dict(S=4096, dim=256, n_heads=8, n_kv_heads=2, head_dim=32, vocab=512, ffn=512)
    return dict(S=128, dim=32, n_heads=4, n_kv_heads=2, head_dim=8, vocab=64, ffn=64)


def _batches(n: int, S: int, vocab: int, dev: torch.device) -> list[dict[str, Any]]:
    """n fixed batches [1, S] with packed documents (positions restart per document)."""
    from longtrain.kernels.documents import DocBounds

    g = torch.Generator().manual_seed(1234)
    out = []
    for b in range(n):
        tokens = torch.randint(0, vocab, (1, S + 1), generator=g)
        cuts = sorted({int(x) for x in torch.randint(1, S, (3 + b,), generator=g)})
        bounds = DocBounds([0, *cuts, S])
        pos = torch.arange(S)
        seg = torch.searchsorted(torch.tensor(bounds[1:]), pos, right=True)
        doc_pos = pos - torch.tensor(bounds)[seg]
        out.append({"tokens": tokens[:, :S].to(dev), "labels": tokens[:, 1:].to(dev), "bounds": bounds,
                    "positions": pos.to(dev), "doc_positions": doc_pos.to(dev)})
    return out


def _mask_plans(S: int) -> dict[str, tuple[list[str], bool]]:
    """mask name -> (model attention plan, document masks?)."""
    return {"causal": (["full"], False), "window": ([f"window:{S // 5}"], False),
            "documents": (["full"], True), "lightning+documents": (["lightning", "full"], True)}


def _model(plan: list[str], sz: dict[str, int], dev: torch.device) -> torch.nn.Module:
    from longtrain.models import ModelConfig, Transformer

    torch.manual_seed(0)  # the same weights on every rank
    cfg = ModelConfig(vocab_size=sz["vocab"], dim=sz["dim"], n_layers=2, n_heads=sz["n_heads"],
                      n_kv_heads=sz["n_kv_heads"], head_dim=sz["head_dim"], ffn_dim=sz["ffn"],
                      max_seq_len=sz["S"], attention=plan)
    return Transformer(cfg).to(dev)


def _loss_and_grads(model, tokens, labels, positions, ops) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, ops)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
    loss.backward()
    return loss.detach().double(), _flat_grads(model).double()


def check_sp_parity(dev: torch.device, work: Path, rows: list) -> None:
    """g: every SP impl x sp x mask x communicator mode against sp = 1 on the same batches."""
    import torch.distributed as dist

    from longtrain.models import LocalAttention
    from longtrain.parallel import shard_sequence
    from longtrain.parallel.ops import SequenceParallelOps

    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dev.type == "cuda"
    sz = _sizes(cuda)
    S = sz["S"]
    sps = [sp for sp in (2, 4, 8) if sp <= world and world % sp == 0]
    max_dp = world // min(sps)
    batches = _batches(max_dp, S, sz["vocab"], dev)
    tol = 1e-4 if cuda else 2e-5
    groups = {}
    for sp in sps:  # once per sp, every rank creates every group in the same order
        for d in range(world // sp):
            g = dist.new_group(list(range(d * sp, (d + 1) * sp)))
            if d == rank // sp:
                groups[sp] = g
    for mask, (plan, docs) in _mask_plans(S).items():
        model = _model(plan, sz, dev)
        pos_key = "doc_positions" if docs else "positions"
        refs = []
        for b in batches:  # sp = 1: the full sequence on this rank
            refs.append(_loss_and_grads(model, b["tokens"], b["labels"], b[pos_key],
                                        LocalAttention(b["bounds"] if docs else None)))
        for sp in sps:
            dp, group = world // sp, groups[sp]
            b = batches[rank // sp]
            tok, lab = (shard_sequence(b[k], group, dim=1) for k in ("tokens", "labels"))
            pos = shard_sequence(b[pos_key], group, dim=0)
            ref_loss = sum(r[0] for r in refs[:dp])
            ref_grad = sum(r[1] for r in refs[:dp])
            impls = ["ring"] if mask.startswith("lightning") else SP_IMPLS  # lightning SP does not depend on impl
            for impl in impls:
                for one_comm in ((False,) if impl == "ulysses" or mask.startswith("lightning") else (False, True)):
                    name = f"sp={sp} dp={dp} {impl}{' one-communicator' if one_comm else ''} {mask}"
                    _progress(work, rank, f"g {name}")
                    ops = SequenceParallelOps(group, impl=impl, layout="zigzag",
                                              cu_seqlens=b["bounds"] if docs else None,
                                              one_communicator=one_comm)
                    try:
                        loss, grad = _loss_and_grads(model, tok, lab, pos, ops)
                        dist.all_reduce(loss)
                        dist.all_reduce(grad)
                        e_loss = float((loss - ref_loss).abs() / ref_loss.abs())
                        e_grad = float((grad - ref_grad).norm() / ref_grad.norm())
                        err = max(e_loss, e_grad)
                        rows.append(("g", name, err, tol, "rel err loss/grads", err <= tol,
                                     f"loss {e_loss:.2g}, grads {e_grad:.2g}"))
                    except Exception as e:  # noqa: BLE001 - one failing arm must not hide the others
                        rows.append(("g", name, "error", None, "", False,
                                     f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
                        raise  # the ranks are out of step now: end the phase with this report


def _trainer_sets(cuda: bool, out: Path) -> list[str]:
    base = ["training.dtype=fp32", "training.tf32=false", "training.warmup=2", "metrics.log_every=1",
            "metrics.tensorboard=false", "eval.every=0", "data.max_documents=60", f"run.output_dir={out}",
            "checkpoint.resume=none", "checkpoint.interval=1000"]
    if cuda:
        return base + ["training.device=cuda", "model.preset=small", "data.seq_len=2048", "model.max_seq_len=2048"]
    return base + ["training.device=cpu", "data.seq_len=128", "model.max_seq_len=512"]


def _fit(sets: list[str]) -> list[float]:
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer
    from longtrain.shipped import shipped_dir

    trainer = Trainer(load_recipe(str(shipped_dir("recipes") / "tiny-cpu.toml"), sets))
    return [float(x) for x in trainer.fit()["losses"]]


def check_engines(dev: torch.device, work: Path, rows: list) -> None:
    """h: FSDP2 and DDP, both with sp = 2, train to the same per-step losses."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    cuda = dev.type == "cuda"
    steps = 6
    got = {}
    for engine in ("fsdp2", "ddp"):
        _progress(work, rank, f"h {engine} sp=2")
        got[engine] = _fit([*_trainer_sets(cuda, work / f"engine-{engine}"), f"training.steps={steps}",
                            "parallel.sp=2", "parallel.sp_impl=tokenring", f"parallel.dp_engine={engine}",
                            "training.micro_batch=1"])
    a, b = got["fsdp2"], got["ddp"]
    diff = max(abs(x - y) / abs(y) for x, y in zip(a, b)) if len(a) == len(b) == steps else float("inf")
    tol = 1e-4 if cuda else 1e-5
    rows.append(("h", f"FSDP2 vs DDP with sp=2 (dp={world // 2}), {steps} steps", diff, tol, "max rel loss diff",
                 diff <= tol and a[-1] < a[0], f"losses {a[0]:.4f} -> {a[-1]:.4f}"))


def check_save(dev: torch.device, work: Path, rows: list) -> list[float]:
    """i (first half): FSDP2 at dp = N, checkpoints every 3 steps; returns the per-step losses."""
    import torch.distributed as dist

    _progress(work, dist.get_rank(), "i save at N ranks")
    losses = _fit([*_trainer_sets(dev.type == "cuda", work / "reshard-n"), "training.steps=6",
                   "checkpoint.interval=3", "training.micro_batch=1", "training.grad_accum=1"])
    ok = (work / "reshard-n" / "checkpoints" / "step_00000003" / "meta.json").is_file()
    rows.append(("i", f"DCP save by {dist.get_world_size()} ranks (FSDP2 dp={dist.get_world_size()})",
                 "step_00000003" if ok else "missing", None, "", ok, f"losses {losses[0]:.4f} -> {losses[-1]:.4f}"))
    return losses


def check_resume(dev: torch.device, work: Path, rows: list, ref: list[float], n_saved: int) -> None:
    """i (second half): N/2 ranks resume the N-rank checkpoint with grad_accum 2: the same losses."""
    import torch.distributed as dist

    world = dist.get_world_size()
    _progress(work, dist.get_rank(), "i resume at N/2 ranks")
    ck = work / "reshard-n" / "checkpoints" / "step_00000003"
    losses = _fit([*_trainer_sets(dev.type == "cuda", work / "reshard-half"), "training.steps=6",
                   f"checkpoint.resume={ck}", "training.micro_batch=1", f"training.grad_accum={n_saved // world}"])
    tail = ref[3:]
    diff = max(abs(x - y) / abs(y) for x, y in zip(losses, tail)) if len(losses) == len(tail) == 3 else float("inf")
    tol = 1e-4 if dev.type == "cuda" else 1e-5
    rows.append(("i", f"resume at {world} ranks (grad_accum {n_saved // world}) from {n_saved}: steps 4-6",
                 diff, tol, "max rel loss diff", diff <= tol, f"{losses} vs {tail}"))


def hang_drill(dev: torch.device, work: Path, rows: list, timeout_s: float) -> None:
    """j: rank 0 stays out of a collective; every other rank must give up after `timeout_s`."""
    import torch.distributed as dist

    rank = dist.get_rank()
    x = torch.ones(4, device=dev)
    dist.all_reduce(x)  # communicators up, the recorder has a first entry
    if dev.type == "cuda":
        torch.cuda.synchronize()
    _progress(work, rank, "j drill")
    if rank == 0:
        time.sleep(timeout_s + _extra_sleep(timeout_s))
        rows.append(("j", "rank 0 stayed out of the collective", "slept", None, "", True, ""))
        return
    t0 = time.perf_counter()
    try:
        dist.all_reduce(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()  # NCCL's watchdog ends this process after the timeout (flight recorder dump)
        rows.append(("j", f"rank {rank}: the unmatched collective returned", time.perf_counter() - t0, None, "s",
                     False, "it should have timed out"))
    except Exception as e:  # noqa: BLE001 - gloo raises on the timeout
        rows.append(("j", f"rank {rank}: unmatched collective ended", time.perf_counter() - t0, timeout_s + 15,
                     "s", time.perf_counter() - t0 <= timeout_s + 15,
                     f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"))


def _worker(rank: int, world: int, port: int, phase: str, opts: dict, queue: Any) -> None:
    work = Path(opts["work"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      TORCH_NCCL_TRACE_BUFFER_SIZE="2000", TORCH_NCCL_DUMP_ON_TIMEOUT="1",
                      TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
                      TORCH_NCCL_DEBUG_INFO_TEMP_FILE=str(work / f"nccl-trace-{phase}-rank-"),
                      TORCH_FR_DUMP_TEMP_FILE=str(work / f"nccl-trace-{phase}-rank-"))
    if not opts["cuda"]:
        torch.set_num_threads(1)
    rows: list = []
    try:
        from longtrain.launcher.devices import set_tf32
        from longtrain.launcher.env import init_distributed

        timeout = opts["hang_timeout_s"] if phase == "3" else opts["collective_timeout_s"]
        _, dev = init_distributed("cuda" if opts["cuda"] else "cpu", int(timeout))
        set_tf32(dev, False)  # parity checks in exact fp32
        extra: Any = None
        if phase == "1":
            for check in (check_sp_parity, check_engines):
                check(dev, work, rows)
            extra = check_save(dev, work, rows)
        elif phase == "2":
            check_resume(dev, work, rows, opts["ref_losses"], opts["n_saved"])
        else:
            hang_drill(dev, work, rows, timeout)
        _progress(work, rank, "done")
        queue.put((rank, "ok", rows, extra))
    except BaseException:  # noqa: BLE001 - report everything to the driver
        queue.put((rank, "error", rows, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if phase == "3":
            queue.close()
            queue.join_thread()  # the report is in the pipe before the hard exit
            os._exit(0)  # a drill's communicator is broken: no orderly teardown
        if dist.is_initialized():
            from longtrain.parallel.comm import close_process_groups
            close_process_groups()


# ----------------------------------------------------------------------------- driver side


def _run_phase(phase: str, world: int, opts: dict, deadline_s: float) -> dict[int, tuple]:
    """Spawn `world` workers; {rank: (status, rows, extra)}; ranks that never answered are missing."""
    import torch.multiprocessing as mp

    from longtrain.testing import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, phase, opts, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    end = time.time() + deadline_s
    try:
        while len(got) < world and time.time() < end:
            try:
                rank, status, rows, extra = queue.get(timeout=1.0)
                got[rank] = (status, rows, extra)
            except Exception:  # noqa: BLE001 - queue.Empty: check who is still alive
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    opts.setdefault("exitcodes", {})[phase] = [p.exitcode for p in procs]
    return got


def _report(phase: str, world: int, got: dict[int, tuple], work: Path, rank0_rows_only: bool = True) -> Any:
    """Turn the workers' rows into table rows; name the missing ranks and where they stopped."""
    for r in range(world):
        if r not in got:
            prog = work / f"progress.rank{r}"
            last = prog.read_text().strip().splitlines()[-1] if prog.is_file() else "nothing"
            add_row(phase, f"phase {phase} rank {r} did not finish", "hung/died", ok=False, note=f"last: {last}")
        elif got[r][0] == "error":
            add_row(phase, f"phase {phase} rank {r} failed", "error", ok=False,
                    note=" | ".join(str(got[r][2]).strip().splitlines()[-2:])[:300])
    seen = set()
    for r in sorted(got):
        if rank0_rows_only and r != min(got):
            continue
        for sec, check, value, limit, unit, ok, note in got[r][1]:
            if (sec, check) not in seen:
                seen.add((sec, check))
                add_row(sec, check, value, limit, unit, ok=ok, note=note)
    return got.get(0, (None, None, None))[2]


def _flight_recorder_rows(work: Path, world: int, exitcodes: list, timeout_s: float, cuda: bool) -> None:
    """j on NCCL: every rank but 0 was ended by the watchdog and left a flight-recorder dump."""
    if not cuda:
        return
    for r in range(1, world):
        dump = work / f"nccl-trace-3-rank-{r}"
        if not dump.is_file():
            add_row("j", f"rank {r}: flight recorder dump", "missing", ok=False,
                    note=f"exit code {exitcodes[r]}; expected {dump.name} (TORCH_NCCL_DUMP_ON_TIMEOUT)")
            continue
        try:
            data = pickle.loads(dump.read_bytes())
            entries = data.get("entries", [])
            last = entries[-1] if entries else {}
            note = (f"{len(entries)} entries; last {last.get('profiling_name', '?')} seq "
                    f"{last.get('collective_seq_id', '?')} state {last.get('state', '?')}; exit code {exitcodes[r]}")
            add_row("j", f"rank {r}: flight recorder dump", len(entries), unit="entries",
                    ok=bool(entries) and last.get("state") != "completed", note=note)
        except Exception as e:  # noqa: BLE001
            add_row("j", f"rank {r}: flight recorder dump", "unreadable", ok=False, note=f"{type(e).__name__}: {e}"[:200])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench gpu-check --multi", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: every visible GPU; 4 with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU: a dry run of every phase (CI)")
    ap.add_argument("--phases", default="123", help="which phases to run (default 123)")
    ap.add_argument("--collective-timeout", type=float, default=None,
                    help="seconds before a stuck collective ends a phase (default 120 on CUDA, 60 on CPU)")
    ap.add_argument("--hang-timeout", type=float, default=None,
                    help="the drill's collective timeout (default 30 s on CUDA, 5 s on CPU)")
    ap.add_argument("--out", default=None, help="JSON path (default bench-results/gpu-check-multi.json)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    n_gpus = torch.cuda.device_count() if cuda else 0
    if cuda and n_gpus < 2 and args.nproc is None:
        print(f"gpu-check --multi: {n_gpus} CUDA GPU visible; it needs >= 2 (one process per GPU). "
              "`--cpu` runs it on gloo as a dry run.")
        return 0
    if not cuda and not args.cpu:
        print("gpu-check --multi: no CUDA GPU visible; skipped. `--cpu` runs it on gloo as a dry run.")
        return 0
    world = args.nproc or (1 << (n_gpus.bit_length() - 1) if cuda else 4)  # the largest power of 2 <= GPUs
    if world < 2 or world % 2 or (cuda and world > n_gpus) or not args.phases or set(args.phases) - set("123"):
        print(f"longtrain: error: --nproc must be even, >= 2{f' and <= the {n_gpus} visible GPUs' if cuda else ''} "
              f"(got {world}), and --phases digits of 123 (got {args.phases!r})", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="longtrain-gpu-check-multi-"))
    opts: dict[str, Any] = {"work": str(work), "cuda": cuda,
                            "collective_timeout_s": args.collective_timeout or (120.0 if cuda else 60.0),
                            "hang_timeout_s": args.hang_timeout or (30.0 if cuda else 5.0)}
    from longtrain.bench.common import machine_info, write_json

    info = machine_info()
    print(f"gpu-check --multi on {world} x {info['cuda'] or 'CPU (gloo)'} | torch {info['torch']} | work {work}",
          flush=True)
    timings: dict[str, float] = {}
    deadline = 900.0 if cuda else 300.0
    ref = None
    for phase in args.phases:
        t0 = time.perf_counter()
        if phase == "1":
            print(f"--- phase 1 ({world} ranks): g SP parity, h FSDP2 vs DDP, i DCP save", flush=True)
            ref = _report("1", world, _run_phase("1", world, opts, deadline), work)
        elif phase == "2":
            half = world // 2
            if ref is None:
                add_row("i", "resume at N/2", "skipped", note="needs phase 1's checkpoint")
                continue
            print(f"--- phase 2 ({half} rank{'s' if half > 1 else ''}): i resume at N/2", flush=True)
            _report("2", half, _run_phase("2", half, {**opts, "ref_losses": ref, "n_saved": world}, deadline), work)
        else:
            t = opts["hang_timeout_s"]
            print(f"--- phase 3 (2 ranks): j hang drill, collective timeout {t:g} s", flush=True)
            limit = t + _extra_sleep(t) + 45
            got = _run_phase("3", 2, opts, limit + 15)
            codes = opts["exitcodes"]["3"]
            elapsed = time.perf_counter() - t0
            add_row("j", "drill ended (all ranks exited)", elapsed, limit, "s",
                    ok=elapsed <= limit and all(c is not None for c in codes),
                    note=f"exit codes {codes}")
            if cuda:  # the watchdog kills the hung rank before it can report: its dump is the report
                got = {r: v for r, v in got.items() if r == 0}
                _report("3", 1, got, work)
            else:
                _report("3", 2, got, work, rank0_rows_only=False)
            _flight_recorder_rows(work, 2, codes, t, cuda)
        timings[phase] = time.perf_counter() - t0
    print_table()
    failed = [r for r in ROWS if r["status"] == "FAIL"]
    print(f"\ngpu-check --multi: {len([r for r in ROWS if r['status'] == 'ok'])} ok, {len(failed)} failed, "
          f"{time.perf_counter() - T0:.0f}s ({', '.join(f'phase {k} {v:.0f}s' for k, v in timings.items())})")
    write_json("gpu-check-multi", {"rows": ROWS, "phase_seconds": timings, "world": world,
                                   "machine_extra": {**info, "work": str(work)}}, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
