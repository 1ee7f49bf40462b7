"""`longtrain eval passkey|ppl|ruler`: does the model use its context?

passkey  accuracy of retrieving a random 5-digit key hidden at a given depth of a
         haystack of filler text, per (context length, depth): table, JSON, heat map.
ppl      perplexity of held-out documents by context length and by token-position
         bucket: table, JSON, line plot.

Both run on a training checkpoint (DCP folder, a run's checkpoints/ folder or the run
folder itself) or a Hugging Face LLaMA folder, on CPU or GPU, in one process or under
torchrun/Slurm/MPI (`--nproc N` starts torchrun itself). With `--sp N` every group of N
ranks splits each sequence (sequence-parallel attention, the same implementations as
training), the groups split the samples; results do not depend on the world size.

Scoring rule (passkey): the prompt is followed by the true answer and the whole sequence
is run once (teacher forcing); a sample is correct when the argmax at every answer
position equals the next answer token. This is exactly "greedy decoding reproduces the
answer": greedy decoding emits the answer iff each argmax given the correct prefix is the
correct token. The reported prediction is the greedy output up to its first wrong token.

Layout of the code: checkpoints are opened by `longtrain.launcher.loading` (shared with
`model.init_from` and `longtrain convert`), scoring lives in `eval_score` (also
eval/in_training.py has the hook the training loop calls), tables and plots in
`eval_report`; this module is the command line. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from longtrain.errors import ConfigError


# re-exported: the public names of `longtrain.launcher.eval.cli` before the split
from longtrain.launcher.eval.report import (fmt_length, passkey_table, plot_passkey, plot_ppl,  # noqa: F401
                                            ppl_table)
from longtrain.launcher.eval.score import (EvalLayout, Scorer, filler_documents, heldout_documents,  # noqa: F401
                                           heldout_windows, passkey_eval, ppl_eval)
from longtrain.parallel.mesh import SPAttention
from longtrain.parallel.rules import SP_IMPL_CHOICES, SP_LAYOUTS, check_sequence_length, resolve_sp_impl
from longtrain.launcher.loading import (Loaded, describe_checkpoint, load_model, pick_tokenizer,  # noqa: F401
                                        resolve_checkpoint)
from longtrain.launcher.eval.args import EvalParser, parse_depths, parse_lengths  # noqa: F401 (public names)

METRICS = ("passkey", "ppl", "ruler")


# ---- command line -------------------------------------------------------------------------------

def _parser(metric: str) -> argparse.ArgumentParser:
    p = EvalParser(prog=f"longtrain eval {metric}", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="DCP checkpoint folder (or its run / checkpoints folder) or HF folder")
    p.add_argument("--lengths", default=None,
                   help="context lengths in tokens, e.g. 1k,2k,4k (default: the trained seq_len)")
    if metric == "passkey":
        p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, fractions of the context")
        p.add_argument("--samples", type=int, default=10, help="prompts per (length, depth) (default 10)")
        p.add_argument("--batch", type=int, default=4, help="prompts per forward call")
        p.add_argument("--data", default=None, help="filler text source (default: the run's corpus, else stdlib)")
        p.add_argument("--filler", default="repeat", choices=("repeat", "corpus"),
                       help="haystack: one corpus snippet repeated (the classic test; default) or running corpus text")
    else:
        p.add_argument("--samples", type=int, default=8, help="held-out documents per length (default 8)")
        p.add_argument("--batch", type=int, default=1, help="documents per forward call")
        p.add_argument("--buckets", type=int, default=8, help="token-position buckets per length (default 8)")
        p.add_argument("--data", default=None,
                       help="held-out documents (file, folder, glob or 'stdlib'); default: the run's training "
                            "source from document data.max_documents on")
    p.add_argument("--skip-documents", type=int, default=None,
                   help="skip the first N documents of the text source (--data; for ppl also the run's)")
    p.add_argument("--tokenizer", default=None, help="'bytes' or tokenizer.json (default: as trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=None, help="start torchrun with N processes on this machine")
    p.add_argument("--sp", type=int, default=1, help="ranks that split one sequence (sequence parallelism)")
    p.add_argument("--sp-impl", default="auto", choices=SP_IMPL_CHOICES,
                   help="sequence-parallel attention (auto: as in training, TokenRing for MHA, ring for GQA)")
    p.add_argument("--sp-layout", default="zigzag", choices=SP_LAYOUTS)
    p.add_argument("--ulysses-degree", type=int, default=0,
                   help="hybrid impls: ranks per Ulysses group (0 = the default rule, as in training)")
    p.add_argument("--sp-one-communicator", action="store_true",
                   help="ring/TokenRing streams on one communicator (as parallel.sp_one_communicator)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--extrapolate", action="store_true",
                   help="allow lengths beyond the model's max_seq_len")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default: <run>/eval/<checkpoint>)")
    return p


def _check_args(args, lengths: list[int], info: Loaded, tokenizer, world: int | None) -> None:
    """Every check that needs no weights, so bad input fails once, before any rank starts."""
    limit = info.cfg.max_seq_len if info.cfg is not None else None
    if args.sp <= 0:
        raise ConfigError(f"--sp must be > 0, got {args.sp}")
    if args.samples <= 0 or args.batch <= 0:
        raise ConfigError("--samples and --batch must be > 0")
    for L in lengths:
        if limit is not None and L > limit and not args.extrapolate:
            more = ("; --sp splits a long context over devices but does not raise this limit" if args.sp > 1 else "")
            raise ConfigError(f"context length {L} exceeds the model's max_seq_len {limit} (positions beyond it "
                              f"were never trained{more}); pass --extrapolate to evaluate anyway")
        check_sequence_length(L, args.sp, args.sp_layout, what="context length")
    if world is not None and world % args.sp:
        hint = f": add --nproc {args.sp} (or run under torchrun)" if world == 1 else ""
        raise ConfigError(f"--sp {args.sp} needs a multiple of {args.sp} processes, got {world}{hint}")
    if args.metric == "passkey":
        from longtrain.launcher.eval.passkey import min_length

        parse_depths(args.depths)
        shortest = min_length(tokenizer)
        if lengths[0] < shortest:
            raise ConfigError(f"context length {lengths[0]} is shorter than the bare passkey prompt ({shortest} tokens)")
    elif args.buckets <= 0:
        raise ConfigError("--buckets must be > 0")


def _default_lengths(args, info: Loaded) -> list[int]:
    if args.lengths is not None:
        return parse_lengths(args.lengths)
    if info.trained_len:
        return [int(info.trained_len)]
    if info.cfg is not None:
        return [min(info.cfg.max_seq_len, 4096)]
    raise ConfigError("give --lengths (the model's trained length is unknown)")


def _spawn(argv: list[str], nproc: int) -> int:
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--module", "longtrain.launcher.cli", "eval", *rest]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TORCHELASTIC_ERROR_FILE", "")
    proc = subprocess.run(cmd, env=env)
    return 0 if proc.returncode == 0 else (2 if proc.returncode == 2 else proc.returncode)


def main(argv: list[str] | None = None) -> int:
    """`longtrain eval passkey|ppl CHECKPOINT [options]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: longtrain eval {passkey,ppl,ruler} CHECKPOINT [options]\n"
              "  passkey  passkey retrieval accuracy per (context length, depth): table, JSON, heat map\n"
              "  ppl      held-out perplexity by context length and token position: table, JSON, line plot\n"
              "  ruler    RULER-style synthetic tasks (needles, variable tracking, word extraction) scored by "
              "generation: table, JSON, heat map\n"
              "`longtrain eval passkey --help` lists the options.")
        return 0 if argv else 2
    metric = argv[0]
    if metric not in METRICS:
        import difflib

        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown metric {metric!r}{hint}; choose one of: {', '.join(METRICS)}")
    if metric == "ruler":
        from longtrain.launcher.eval import ruler_cli

        return ruler_cli.main(argv[1:])
    args = _parser(metric).parse_args(argv[1:])
    args.metric = metric
    from longtrain.launcher.env import under_launcher

    # validate cheaply in the parent, so bad input gives one line, not one per rank
    if args.nproc is not None and args.nproc <= 0:
        raise ConfigError(f"--nproc must be > 0, got {args.nproc}")
    info = describe_checkpoint(args.checkpoint)
    lengths = _default_lengths(args, info)
    tokenizer = pick_tokenizer(info, args.tokenizer)
    launched = under_launcher()
    _check_args(args, lengths, info, tokenizer, None if launched else (args.nproc or 1))
    if not launched and args.nproc and args.nproc > 1:
        return _spawn(argv, args.nproc)
    return _run(args, lengths, info, tokenizer)


def _run(args, lengths: list[int], info: Loaded, tokenizer) -> int:
    from longtrain.launcher.env import init_distributed
    from longtrain.launcher.metrics import setup_logging
    from longtrain.parallel.mesh import make_layout

    t0 = time.perf_counter()
    env, device = init_distributed(args.device, sp=args.sp)
    try:
        setup_logging(env.is_main)
        if env.world_size % args.sp:
            raise ConfigError(f"{env.world_size} processes are not divisible by --sp {args.sp}")
        lay = make_layout(args.sp)
        loaded = load_model(info)
        attention = SPAttention(resolve_sp_impl(args.sp_impl, loaded.cfg.n_heads, loaded.cfg.n_kv_heads),
                                args.sp_layout, args.ulysses_degree or None, args.sp_one_communicator)
        impl = attention.impl
        layout = EvalLayout.from_mesh(lay, attention)
        dtype = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) \
            else torch.float32
        model = loaded.model.to(device=device, dtype=dtype).eval()
        scorer = Scorer(model, layout, device)
        name = loaded.name
        meta = {"checkpoint": str(loaded.path), "kind": loaded.kind, "step": loaded.step,
                "world_size": env.world_size, "sp": args.sp, "sp_impl": impl if args.sp > 1 else None,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "seed": args.seed}
        if args.metric == "passkey":
            docs, src = filler_documents(loaded.run_data, args.data, args.skip_documents)
            from longtrain.launcher.eval.passkey import filler_tokens

            filler = filler_tokens(docs, tokenizer, 4 * max(lengths) * args.samples + 100_000)
            depths = parse_depths(args.depths)
            res = passkey_eval(scorer, tokenizer, filler, lengths, depths, args.samples, seed=args.seed,
                               batch=args.batch, filler_mode=args.filler)
            res.update(meta, filler=src)
            table, plot = passkey_table(res), plot_passkey
            title = f"Passkey retrieval: {name}, {args.filler} filler"
        else:
            docs, rule = heldout_documents(loaded.run_data, args.data, args.skip_documents)
            windows = heldout_windows(docs, tokenizer, lengths, args.samples)
            res = ppl_eval(scorer, windows, buckets=args.buckets, batch=args.batch)
            res.update(meta, heldout=rule)
            table, plot = ppl_table(res), plot_ppl
            title = f"Held-out perplexity by position: {name}"
        res["seconds"] = round(time.perf_counter() - t0, 2)
        if env.is_main:
            out = Path(args.out) if args.out else ((loaded.run_dir / "eval" / loaded.path.name) if loaded.run_dir
                                                   else Path("eval-results") / loaded.path.name)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{args.metric}.json").write_text(json.dumps(res, indent=1))
            plot(res, out / f"{args.metric}.png", title)
            print(table)
            print(f"{args.metric}: {loaded.kind} checkpoint {loaded.path} | {env.world_size} process(es), sp {args.sp} | "
                  f"{device} {meta['dtype']} | {res['seconds']:.1f}s | wrote {out / (args.metric + '.json')} and "
                  f"{out / (args.metric + '.png')}", flush=True)
        return 0
    finally:
        if dist.is_initialized():
            from longtrain.parallel.comm import close_process_groups
            close_process_groups()

