"""`longtrain eval ruler CHECKPOINT|RUN|HF_DIR --lengths 1k,4k --tasks ... --samples N`: the RULER-style
synthetic suite (launcher/eval/ruler_tasks.py) scored by greedy generation with a KV cache; a table
per task x length, JSON and a heat map PNG. One process (generation is not split over ranks)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from longtrain.errors import ConfigError
from longtrain.launcher.eval.args import EvalParser, parse_lengths
from longtrain.launcher.eval.report import plot_ruler, ruler_table
from longtrain.launcher.eval.ruler_scoring import TASKS
from longtrain.launcher.loading import describe_checkpoint, load_model, pick_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = EvalParser(prog="longtrain eval ruler", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="DCP checkpoint folder (or its run / checkpoints folder) or HF folder")
    p.add_argument("--lengths", default=None, help="context lengths in tokens, e.g. 1k,4k (default: the trained "
                   "seq_len); each must fit the model's max_seq_len")
    p.add_argument("--tasks", default="all", help=f"comma-separated tasks or 'all': {', '.join(TASKS)}")
    p.add_argument("--samples", type=int, default=20, help="prompts per (task, length) (default 20)")
    p.add_argument("--template", default="base", choices=("base", "chat"),
                   help="base: plain text; chat: the tokenizer folder's chat_template")
    p.add_argument("--haystack", default="stdlib",
                   help="text the haystacks are cut from: 'stdlib', text files / folder / glob, a prepared folder")
    p.add_argument("--batch", type=int, default=8, help="prompts generated together")
    p.add_argument("--tokenizer", default=None, help="'bytes' or tokenizer.json (default: as trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", default=None, help="folder for ruler.json / ruler.png (default: <run>/eval/<checkpoint>)")
    return p


def parse_tasks(text: str) -> list[str]:
    """'all' or 'vt,cwe' -> task names; ConfigError naming an unknown one."""
    if text.strip() == "all":
        return list(TASKS)
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ConfigError(f"unknown RULER task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}")
    return tasks


def main(argv: list[str]) -> int:
    from longtrain.launcher.eval.ruler import run_ruler
    from longtrain.launcher.metrics import setup_logging

    args = _parser().parse_args(argv)
    if args.samples <= 0 or args.batch <= 0:
        raise ConfigError("--samples and --batch must be > 0")
    tasks = parse_tasks(args.tasks)
    info = describe_checkpoint(args.checkpoint)
    if info.cfg is None:
        raise ConfigError(f"{args.checkpoint}: cannot tell the model's configuration")
    lengths = parse_lengths(args.lengths) if args.lengths else [info.cfg.max_seq_len]
    for L in lengths:  # before loading any weights: one line, never a truncated prompt
        if L > info.cfg.max_seq_len:
            raise ConfigError(f"context length {L} exceeds the model's max_seq_len {info.cfg.max_seq_len}; RULER "
                              "prompts are never truncated (drop that length)")
    tokenizer = pick_tokenizer(info, args.tokenizer)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) else torch.float32
    setup_logging(True)
    t0 = time.perf_counter()
    loaded = load_model(info, dtype=dtype)
    model = loaded.model.to(device=device, dtype=dtype).eval()
    spec = args.tokenizer or info.tokenizer_spec
    chat = (str(Path(spec).parent if Path(spec).is_file() else spec) if spec and spec != "bytes" else None) \
        if args.template == "chat" else None
    res = run_ruler(model, tokenizer, lengths=lengths, tasks=tasks, samples=args.samples, seed=args.seed,
                    template=args.template, device=device, haystack_docs=args.haystack, chat_template=chat,
                    batch_size=args.batch)
    res.update(lengths=lengths, samples_per_cell=args.samples, checkpoint=str(loaded.path), kind=loaded.kind,
               step=loaded.step, haystack=args.haystack, device=str(device), dtype=str(dtype).replace("torch.", ""),
               seconds=round(time.perf_counter() - t0, 2))
    out = Path(args.out) if args.out else ((loaded.run_dir / "eval" / loaded.path.name) if loaded.run_dir
                                           else Path("eval-results") / loaded.path.name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ruler.json").write_text(json.dumps(res, indent=1))
    plot_ruler(res, out / "ruler.png", f"RULER ({args.template} template): {loaded.name}")
    print(ruler_table(res))
    print(f"ruler: {loaded.kind} checkpoint {loaded.path} | {device} {res['dtype']} | {res['seconds']:.1f}s | wrote "
          f"{out / 'ruler.json'} and {out / 'ruler.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
