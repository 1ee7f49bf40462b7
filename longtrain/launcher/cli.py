"""`longtrain train|plan|slurm|eval|generate|convert|bench|recipes`: parse and dispatch.

Bad input exits with status 2 and one line `longtrain: error: ...` (no traceback). Starting and
watching the training processes (torchrun, mpirun, the worker -> launcher error files, the report of
a dead rank) is launcher/supervise.py's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from longtrain.errors import LongtrainError
from longtrain.launcher.supervise import (PEER_LOST, RunInfo, peer_lost, report_worker_error, spawn_mpirun,
                                          spawn_torchrun, worker_exit)

BENCHES = ("step", "sp", "lightning", "mesa", "memory", "models", "moh", "data", "gpu-check", "extend", "attention", "kernels",
           "peer")


def _error(msg: str) -> int:
    print(f"longtrain: error: {msg}", file=sys.stderr, flush=True)
    return 2


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train from a recipe (starts torchrun itself with --nproc)")
    p.add_argument("recipe", help="TOML recipe file, or the name of a shipped one (longtrain recipes)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override recipe values, e.g. --set training.lr=1e-3 training.steps=500 (repeatable)")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to start on this machine when not already under torchrun/Slurm/MPI")
    p.add_argument("--dry-run", action="store_true", help="validate recipe, mesh, data and model; do not train")
    p.add_argument("--torchrun", dest="torchrun_args", default=None, metavar="ARGS",
                   help="torchrun arguments for a multi-node rendezvous instead of --standalone, e.g. "
                        "'--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT' (slurm/torchrun.sbatch)")
    p.add_argument("--mpirun", dest="mpirun_args", default=None, metavar="ARGS",
                   help="start the ranks with `mpirun ARGS` (e.g. '-n 8 --hostfile hosts'); a SIGTERM then saves "
                        "a checkpoint (sent on to mpirun as SIGUSR1: mpirun ends its ranks 0.5 s after a SIGTERM)")


def cmd_train(args: argparse.Namespace) -> int:
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.env import under_launcher

    recipe = load_recipe(args.recipe, args.overrides)
    if args.nproc is not None and args.nproc <= 0:
        raise LongtrainError(f"--nproc must be > 0, got {args.nproc}")
    if recipe.checkpoint.resume not in ("auto", "none"):
        from longtrain.launcher.checkpoint import read_meta

        read_meta(recipe.checkpoint.resume)
    if args.mpirun_args is not None:
        return spawn_mpirun(args, recipe)
    if args.torchrun_args is not None or (not under_launcher() and args.nproc and args.nproc > 1):
        if args.nproc is None:
            raise LongtrainError("--torchrun needs --nproc (training processes on this node)")
        if args.torchrun_args is None and args.nproc % recipe.parallel.sp:
            raise LongtrainError(f"--nproc {args.nproc} is not divisible by parallel.sp = {recipe.parallel.sp}")
        from longtrain.launcher.devices import check_gpus

        check_gpus(args.nproc, recipe.training.device)
        return spawn_torchrun(args, recipe)
    from longtrain.errors import PeerLost
    from longtrain.launcher.trainer import train

    try:
        train(recipe, dry_run=args.dry_run)
    except PeerLost as e:
        from longtrain.launcher.env import discover

        e.run = RunInfo.of(recipe, discover().source)  # for the report of the reporting survivor
        raise
    return 0


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: longtrain bench {{{','.join(BENCHES)}}} [options]\n"
              "Each bench prints a table and writes JSON (bench-results/NAME.json by default).")
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHES:
        return _error(f"unknown bench {name!r}; choose one of: {', '.join(BENCHES)}")
    try:
        mod = importlib.import_module(f"longtrain.bench.{name.replace('-', '_')}")
    except ModuleNotFoundError as e:
        return _error(f"bench {name!r} is not available ({e})")
    return int(mod.main(argv[1:]) or 0)


def cmd_recipes(argv: list[str]) -> int:
    """`longtrain recipes` lists the shipped recipes; `longtrain recipes show NAME` prints one."""
    from longtrain.shipped import closest_recipes, recipe_description, recipe_names, shipped_dir, shipped_recipe

    if argv and argv[0] in ("-h", "--help"):
        print("usage: longtrain recipes [show NAME]\n\nList the recipes that ship with longtrain, or print one "
              "(redirect it to a file to copy and edit it).")
        return 0
    if not argv:
        names = recipe_names()
        width = max(map(len, names), default=0)
        for n in names:
            print(f"{n.ljust(width)}  {recipe_description(shipped_dir('recipes') / f'{n}.toml')}")
        print(f"\n{len(names)} recipes in {shipped_dir('recipes')}; "
              "'longtrain recipes show NAME > my.toml' to copy one, 'longtrain train NAME' to run it")
        return 0
    if argv[0] != "show" or len(argv) != 2:
        return _error("usage: longtrain recipes [show NAME]")
    path = shipped_recipe(argv[1])
    if path is None:
        close = closest_recipes(argv[1])
        return _error(f"no shipped recipe {argv[1]!r}" + (f"; closest: {', '.join(close)}" if close else "")
                      + " ('longtrain recipes' lists them)")
    sys.stdout.write(path.read_text())
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("longtrain")
    except Exception:  # noqa: BLE001 - a checkout on PYTHONPATH has no distribution metadata
        from longtrain import __version__

        return __version__


def _sub_main(module: str, argv: list[str]) -> int:
    mod = importlib.import_module(module)
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a program: `kill -USR2 PID` prints each thread's stack, the run goes on
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR2, all_threads=True)  # where a hung run waits
    argv = list(sys.argv[1:] if argv is None else argv)
    # sub-tools with their own argument parsers
    passthrough = {"bench": None, "prepare": "longtrain.launcher.data.prepare", "plan": "longtrain.launcher.plan", "slurm": "longtrain.launcher.slurm",
                   "eval": "longtrain.launcher.eval.cli", "convert": "longtrain.launcher.convert",
                   "generate": "longtrain.launcher.eval.generate"}
    try:
        if argv and argv[0] == "--version":
            print(f"longtrain {_version()}")
            return 0
        if argv and argv[0] == "recipes":
            return cmd_recipes(argv[1:])
        if argv and argv[0] in passthrough:
            if argv[0] == "bench":
                return cmd_bench(argv[1:])
            try:
                return _sub_main(passthrough[argv[0]], argv[1:])
            except ModuleNotFoundError as e:
                if e.name and e.name.startswith("longtrain"):
                    return _error(f"'longtrain {argv[0]}' is not available in this build ({e.name} missing)")
                raise
        parser = argparse.ArgumentParser(prog="longtrain", description=__doc__)
        parser.add_argument("--version", action="version", version=f"longtrain {_version()}")
        sub = parser.add_subparsers(dest="command", required=True)
        _train_parser(sub)
        for name, helptext in (("prepare", "tokenize a corpus once into memory-mapped token files"),
                               ("plan", "size a job: memory per GPU and step time"),
                               ("slurm", "print or submit an sbatch script for a recipe"),
                               ("eval", "passkey retrieval, perplexity by position, RULER tasks"),
                               ("generate", "continue a prompt with a trained model (KV cache)"),
                               ("convert", "export a training checkpoint to a Hugging Face folder"),
                               ("bench", "benchmarks: " + ", ".join(BENCHES)),
                               ("recipes", "list the shipped recipes, or 'recipes show NAME' to print one")):
            sub.add_parser(name, help=helptext, add_help=False)
        args = parser.parse_args(argv)
        if args.command == "train":
            return cmd_train(args)
        return 2
    except LongtrainError as e:
        from longtrain.errors import PeerLost

        if isinstance(e, PeerLost):  # one survivor reports which process died or hangs; the others stop
            return peer_lost(e)
        if report_worker_error(str(e)):
            return 2
        return _error(str(e))
    except Exception as e:  # noqa: BLE001 - only Preempted is handled; the rest keeps its traceback
        from longtrain.launcher.signals import PREEMPTED_EXIT, Preempted

        if not isinstance(e, Preempted):
            raise
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            if not report_worker_error(str(e), name="preempted"):
                print(f"longtrain: {e}", file=sys.stderr, flush=True)
        else:  # for the launcher of another node (slurm/torchrun.sbatch): this one stopped on the signal too
            report_worker_error(str(e), name=f"preempted-rank{rank}")
        return PREEMPTED_EXIT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    code = main()
    # torchrun workers, srun tasks (a teardown abort failed a 2-node job) unless MPI (MPI_Finalize)
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None or (
            "SLURM_STEP_ID" in os.environ and "mpi4py.MPI" not in sys.modules) or PEER_LOST:
        worker_exit(code)
    sys.exit(code)
