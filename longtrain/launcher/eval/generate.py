"""`longtrain generate`: continue a prompt with a trained model (KV-cache decoding).

    longtrain generate RUN|CHECKPOINT|HF_DIR --prompt TEXT --max-new-tokens N
        [--temperature T --top-k K --top-p P --seed S] [--dtype auto|fp32|bf16] [--device auto|cpu|cuda]
        [--tokenizer SPEC] [--bos]

The checkpoint is opened by `longtrain.launcher.loading` (a DCP checkpoint, a run or its
checkpoints/ folder, or a Hugging Face LLaMA folder), the prompt is encoded with the model's
tokenizer (as trained, or --tokenizer), and `longtrain.models.generate.generate` continues it
(temperature 0 = greedy, the default). The decoded continuation goes to stdout (up to the
tokenizer's EOS), the speed to stderr. Bad input is one line `longtrain: error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from longtrain.errors import ConfigError, LongtrainError
from longtrain.launcher.loading import describe_checkpoint, load_model, pick_tokenizer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, through the error path of main()
        raise ConfigError(f"generate: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="longtrain generate", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="DCP checkpoint folder (or its run / checkpoints folder) or HF folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file (UTF-8)")
    p.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tokenizer", default=None, help="'bytes' or tokenizer.json (default: as trained)")
    p.add_argument("--bos", action="store_true", help="start the prompt with the tokenizer's BOS token")
    return p


def _prompt_text(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        f = Path(args.prompt_file)
        if not f.is_file():
            raise ConfigError(f"prompt file not found: {f}")
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read prompt file {f}: {e}") from None
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise ConfigError("generate: give --prompt TEXT or --prompt-file FILE")
    if not text:
        raise ConfigError("the prompt is empty")
    return text


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run(argv: list[str]) -> int:
    """Parse, check, load, generate, print; raises LongtrainError on bad input."""
    from longtrain.models.generate import check_context, generate

    args = _parser().parse_args(argv)
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    text = _prompt_text(args)
    info = describe_checkpoint(args.checkpoint)
    tok = pick_tokenizer(info, args.tokenizer)
    ids = [int(i) for i in tok.encode(text)]
    bos = getattr(tok, "bos_id", None)
    if args.bos:
        if bos is None:
            raise ConfigError("--bos: the tokenizer has no BOS token")
        ids = [bos] + ids
    if not ids:
        raise ConfigError("the prompt encodes to no tokens")
    device = _device(args.device)
    dtype = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) \
        else torch.float32
    check_context(len(ids), args.max_new_tokens, info.cfg.max_seq_len)  # before reading any weights
    model = load_model(info, dtype=dtype).model.to(device=device, dtype=dtype).eval()
    eos = getattr(tok, "eos_id", None)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, generator=gen, eos_id=eos)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    new = out[0].tolist()
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    sys.stdout.write(tok.decode(new) + "\n")
    sys.stdout.flush()
    n = out.shape[1]
    print(f"generate: {len(ids)} prompt + {n} new tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tokens/s) | "
          f"{info.kind} {info.path} | {device} {str(dtype).replace('torch.', '')}", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`longtrain generate CHECKPOINT --prompt TEXT --max-new-tokens N [options]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_parser().format_help(), end="")
        return 0 if argv else 2
    try:
        return run(argv)
    except LongtrainError as e:
        print(f"longtrain: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
