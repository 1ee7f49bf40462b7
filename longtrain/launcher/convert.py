"""`longtrain convert CKPT OUT [--dtype fp32|bf16] [--tokenizer PATH]`: training checkpoint -> HF folder.

CKPT is a DCP checkpoint folder (`step_N`), a run's `checkpoints/` folder or the run
folder itself (the newest complete checkpoint is taken). OUT must not exist or be
empty; it is written as `OUT.tmp` and renamed at the end, so a failed export leaves
nothing half-written behind.

A dense model becomes a plain `LlamaForCausalLM` folder; an MoH model or a mixed span
plan adds the fields `longtrain.models.hf.save_hf_checkpoint` documents. Lightning
layers have no LLaMA equivalent and are refused.

Tokenizer: `--tokenizer` (a tokenizer.json or a folder holding one), else the run's
`data.tokenizer` from `recipe.resolved.toml`, else the tokenizer.json of the run's
`model.init_from` folder. A byte-tokenizer run has no tokenizer.json; the export then
has none (ids are UTF-8 bytes, BOS 256, EOS 257, PAD 258).

`max_position_embeddings` is raised to the longest sequence the run trained on
(`seq_len` in meta.json) when that exceeds the model's `max_seq_len`, so a
continue-tuned 128k model is not exported as an 8k one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from longtrain.errors import ConfigError, LongtrainError
from longtrain.launcher.loading import find_checkpoint, load_checkpoint_model  # noqa: F401  (re-exported)
from longtrain.launcher.loading import run_recipe as _run_recipe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_recipe(ckpt: Path) -> dict[str, Any]:
    """The resolved recipe of the run a checkpoint belongs to (run/checkpoints/step_N), or {}."""
    return _run_recipe(ckpt)[1]


def _tokenizer_for(ckpt: Path, recipe: dict[str, Any], override: str | None) -> Path | None:
    if override:
        p = Path(override)
        if not p.exists():
            raise ConfigError(f"--tokenizer not found: {p}")
        if p.is_dir() and not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
            raise ConfigError(f"--tokenizer folder {p} has no tokenizer.json or tokenizer.model")
        return p
    tok = recipe.get("data", {}).get("tokenizer")
    if tok and tok != "bytes" and Path(tok).exists():
        return Path(tok)
    init_from = recipe.get("model", {}).get("init_from")
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return Path(init_from)
    return None


def convert_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                       tokenizer: str | None = None) -> dict[str, Any]:
    """Export a training checkpoint to an HF LLaMA folder `out`; returns a summary dict."""
    from longtrain.models.hf import read_hf_config, save_hf_checkpoint

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty; choose a new folder")
    ckpt_path = find_checkpoint(ckpt)
    recipe = run_recipe(ckpt_path)
    tok = _tokenizer_for(ckpt_path, recipe, tokenizer)  # before the (slow) weight load
    model, meta = load_checkpoint_model(ckpt_path, dtype)
    trained = int(meta.get("seq_len") or 0)
    if trained > model.cfg.max_seq_len:
        model.cfg.max_seq_len = trained
    init_from = recipe.get("model", {}).get("init_from")
    if init_from and (Path(init_from) / "config.json").is_file():
        model.hf_config = read_hf_config(init_from)  # bos/eos/pad ids pass through
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf_checkpoint(model, tmp, tokenizer_path=tok)
    except ValueError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"cannot export {ckpt_path}: {e}") from None
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(tmp, out)
    return {"checkpoint": str(ckpt_path), "out": str(out), "step": meta.get("step"),
            "dtype": str(dtype).replace("torch.", ""), "moh": model.cfg.moh is not None,
            "attention": list(model.cfg.attention), "max_seq_len": model.cfg.max_seq_len,
            "rope_theta": model.cfg.rope_theta, "tokenizer": str(tok) if tok else None,
            "n_params": model.cfg.n_params}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="longtrain convert",
                                 description="Export a training checkpoint (DCP) to a Hugging Face LLaMA folder.")
    ap.add_argument("checkpoint", help="checkpoint folder (step_N), a run's checkpoints/ folder, or the run folder")
    ap.add_argument("out", help="output folder (must not exist, or be empty)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="tensor dtype of the export (default fp32: lossless; bf16 halves the size)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json or folder to copy (default: the run's tokenizer or init_from's)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        s = convert_checkpoint(a.checkpoint, a.out, dtype=DTYPES[a.dtype], tokenizer=a.tokenizer)
    except LongtrainError as e:
        print(f"longtrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    kind = "MoH LLaMA" if s["moh"] else "LLaMA"
    if set(s["attention"]) != {"full"}:
        kind += f" with attention plan {s['attention']} (transformers runs every layer as full attention)"
    print(f"exported step {s['step']} of {s['checkpoint']} -> {s['out']}: {kind}, "
          f"{s['n_params'] / 1e6:.2f}M params, {s['dtype']}, max_position_embeddings {s['max_seq_len']}, "
          f"rope_theta {s['rope_theta']:g}")
    if s["tokenizer"]:
        print(f"tokenizer copied from {s['tokenizer']}")
    else:
        print("no tokenizer.json written (byte tokenizer run, or none found: pass --tokenizer PATH)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
