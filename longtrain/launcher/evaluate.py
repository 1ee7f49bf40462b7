"""`longtrain eval passkey|ppl`: does the model use its context?

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

`in_training_eval(trainer)` runs the same measurements inside the training loop.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import textwrap
import tomllib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.errors import CheckpointError, ConfigError, DataError, LongtrainError

log = logging.getLogger("longtrain")

METRICS = ("passkey", "ppl")
SP_IMPLS = ("auto", "ring", "tokenring", "ulysses", "hybrid", "hybrid-tokenring")


# ---- argument helpers ---------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096] (k = 1024, m = 1024**2); positive, deduplicated, ascending."""
    out: list[int] = []
    for part in str(text).split(","):
        s = part.strip().lower()
        if not s:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", s)
        if not m:
            raise ConfigError(f"bad context length {part.strip()!r}: use numbers like 512, 2k, 32k")
        n = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2)]
        if n != int(n) or n <= 0:
            raise ConfigError(f"bad context length {part.strip()!r}: must be a positive whole number of tokens")
        out.append(int(n))
    if not out:
        raise ConfigError("no context lengths given (e.g. --lengths 1k,2k,4k)")
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; every depth in [0, 1]."""
    out: list[float] = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            d = float(part)
        except ValueError:
            raise ConfigError(f"bad depth {part.strip()!r}: use fractions of the context, e.g. 0,0.25,0.5,0.75,1") from None
        if not 0 <= d <= 1:
            raise ConfigError(f"depth {d} is outside [0, 1] (fraction of the context before the needle)")
        out.append(d)
    if not out:
        raise ConfigError("no depths given (e.g. --depths 0,0.25,0.5,0.75,1)")
    return sorted(set(out))


def fmt_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ---- loading a model --------------------------------------------------------------------------

@dataclass
class Loaded:
    """A checkpoint to evaluate and what we know about how it was trained (model None until loaded)."""

    kind: str  # "dcp" | "hf"
    path: Path
    cfg: Any  # ModelConfig (None if an HF folder's config could not be read ahead)
    step: int | None = None
    trained_len: int | None = None
    run_dir: Path | None = None
    run_data: dict[str, Any] = field(default_factory=dict)  # [data] of the run's resolved recipe
    tokenizer_spec: str | None = None
    model: nn.Module | None = None

    @property
    def name(self) -> str:
        return f"{self.run_dir.name}/{self.path.name}" if self.run_dir and self.run_dir != self.path else self.path.name


def _is_hf(p: Path) -> bool:
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def resolve_checkpoint(path: str | os.PathLike) -> tuple[str, Path]:
    """('dcp' | 'hf', folder) for a DCP checkpoint, a checkpoints/ or run folder, or an HF folder."""
    from longtrain.launcher.checkpoint import Checkpointer, is_complete

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a file; give a checkpoint folder (step_N), a run folder or an HF folder")
    if _is_hf(p):
        return "hf", p
    if (p / ".metadata").exists() or (p / "meta.json").exists():
        return "dcp", p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            latest = Checkpointer(root).latest()
            if latest is not None and is_complete(latest):
                return "dcp", latest
    raise CheckpointError(f"no checkpoint in {p}: expected a DCP folder (.metadata + meta.json), a run or "
                          "checkpoints/ folder holding one, or an HF folder (config.json + *.safetensors)")


def _run_recipe(folder: Path) -> tuple[Path | None, dict[str, Any]]:
    """The resolved recipe of the run a checkpoint belongs to (run/checkpoints/step_N), if found."""
    for run in (folder.parent.parent, folder.parent, folder):
        f = run / "recipe.resolved.toml"
        if f.is_file():
            try:
                return run, tomllib.loads(f.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                return run, {}
    return None, {}


def _hf_module():
    try:
        from longtrain.models import hf
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("longtrain"):
            raise CheckpointError("reading Hugging Face folders needs longtrain.models.hf, which this build lacks") from None
        raise
    return hf


def describe_checkpoint(path: str | os.PathLike) -> Loaded:
    """Find the checkpoint, its model configuration, run recipe and tokenizer; no weights read."""
    from longtrain.models import ModelConfig

    kind, p = resolve_checkpoint(path)
    run, recipe = _run_recipe(p)
    data = dict(recipe.get("data", {}))
    if kind == "dcp":
        from longtrain.launcher.checkpoint import read_meta

        meta = read_meta(p)
        if not isinstance(meta.get("model"), dict):
            raise CheckpointError(f"checkpoint {p} has no model configuration in meta.json")
        try:
            cfg = ModelConfig(**meta["model"])
        except TypeError as e:
            raise CheckpointError(f"checkpoint {p} has a model configuration this version cannot read: {e}") from None
        tok = data.get("tokenizer")
        init_from = recipe.get("model", {}).get("init_from")
        if tok == "bytes" and init_from and (Path(init_from) / "tokenizer.json").is_file():
            tok = str(Path(init_from) / "tokenizer.json")
        return Loaded("dcp", p, cfg, int(meta["step"]), meta.get("seq_len"), run, data, tok)
    hf = _hf_module()
    try:
        cfg = hf.hf_model_config(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the Hugging Face config of {p}: {e}") from None
    tok = str(p / "tokenizer.json") if (p / "tokenizer.json").is_file() else data.get("tokenizer")
    return Loaded("hf", p, cfg, None, None, run, data, tok)


def load_model(path: str | os.PathLike | Loaded) -> Loaded:
    """Load a DCP training checkpoint or an HF folder into a plain Transformer (CPU, fp32)."""
    from longtrain.models import Transformer

    info = path if isinstance(path, Loaded) else describe_checkpoint(path)
    p = info.path
    if info.kind == "dcp":
        from longtrain.launcher.checkpoint import safe_load

        model = Transformer(info.cfg)
        state = {"model": model.state_dict()}
        try:
            safe_load(state, p)
        except (Exception, torch.distributed.checkpoint.api.CheckpointException) as e:  # noqa: BLE001
            lines = str(e).strip().splitlines()
            raise CheckpointError(f"cannot load model weights from {p}: {lines[-1] if lines else type(e).__name__}") from None
        model.load_state_dict(state["model"])
    else:
        try:
            model = _hf_module().load_hf_checkpoint(str(p))
        except LongtrainError:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load Hugging Face folder {p}: {e}") from None
    info.model = model
    return info


def pick_tokenizer(info: Loaded, override: str | None):
    """The tokenizer the model was trained with: --tokenizer, the run's recipe, the HF folder, or bytes."""
    from longtrain.launcher.data import build_tokenizer

    spec = override or info.tokenizer_spec
    vocab = info.cfg.vocab_size
    if spec is None:
        if vocab > 512:
            raise ConfigError(f"cannot tell the tokenizer of {info.path} (vocab {vocab}, no tokenizer.json, no run "
                              "recipe next to it): pass --tokenizer PATH")
        spec = "bytes"
    if spec != "bytes" and not Path(spec).exists():
        raise ConfigError(f"tokenizer not found: {spec}")
    tok = build_tokenizer(spec)
    if tok.vocab_size > vocab:
        raise ConfigError(f"tokenizer {spec} has {tok.vocab_size} ids but the model only {vocab}")
    return tok


# ---- scoring (shared by the CLI and the training loop) ------------------------------------------

@dataclass
class EvalLayout:
    """How ranks split the work: dp groups take different samples, sp ranks split one sequence."""

    dp: int = 1
    dp_rank: int = 0
    sp: int = 1
    sp_rank: int = 0
    sp_group: Any = None
    sp_impl: str = "tokenring"
    sp_layout: str = "zigzag"

    @classmethod
    def from_trainer_layout(cls, lay: Any, impl: str, layout: str) -> "EvalLayout":
        return cls(lay.dp, lay.dp_rank, lay.sp, lay.sp_rank, lay.sp_group, impl, layout)


@contextmanager
def _output_as_identity(model: nn.Module):
    """Make `model(...)` return normalized hidden states (so logits can be formed in chunks)."""
    head = model.output
    model.output = nn.Identity()
    try:
        yield head
    finally:
        model.output = head


class Scorer:
    """Per-token NLL and argmax of a causal LM over sequences, optionally sequence-parallel.

    `plain=True` (a plain Transformer): the LM head runs in chunks of `chunk` tokens, so
    logits [S, vocab] are never held at once. `plain=False` (an FSDP/DDP-wrapped model in
    the training loop): one ordinary forward call, which every rank makes identically.
    """

    def __init__(self, model: nn.Module, layout: EvalLayout, device: torch.device, *, plain: bool = True,
                 chunk: int = 2048, autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.layout, self.device = model, layout, device
        self.plain, self.chunk, self.autocast_dtype = plain, chunk, autocast_dtype

    def _ops(self):
        from longtrain.models import LocalAttention

        lay = self.layout
        if lay.sp == 1:
            return LocalAttention()
        from longtrain.parallel.ops import SequenceParallelOps

        return SequenceParallelOps(lay.sp_group, impl=lay.sp_impl, layout=lay.sp_layout)

    def _shard(self, x: Tensor, dim: int) -> Tensor:
        if self.layout.sp == 1:
            return x
        from longtrain.parallel import shard_sequence

        return shard_sequence(x, self.layout.sp_group, dim=dim, layout=self.layout.sp_layout)

    def _unshard(self, x: Tensor) -> Tensor:
        if self.layout.sp == 1:
            return x
        from longtrain.parallel import unshard_sequence

        return unshard_sequence(x, self.layout.sp_group, dim=1, layout=self.layout.sp_layout)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """tokens, targets int64 [B, S] (targets -100 = not scored) -> nll fp32 [B, S] (0 where not
        scored), argmax int64 [B, S]; both on CPU, identical on every rank of the sp group."""
        dev = self.device
        S = tokens.shape[1]
        tl = self._shard(tokens.to(dev), 1)
        yl = self._shard(targets.to(dev), 1)
        pl = self._shard(torch.arange(S, device=dev), 0)
        ops = self._ops()
        amp = (torch.autocast(dev.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else nullcontext())
        nlls, preds = [], []
        with amp:
            if self.plain:
                with _output_as_identity(self.model) as head:
                    h = self.model(tl, pl, ops)
                for a in range(0, h.shape[1], self.chunk):
                    logits = head(h[:, a:a + self.chunk].to(head.weight.dtype)).float()
                    nlls.append(self._nll(logits, yl[:, a:a + self.chunk]))
                    preds.append(logits.argmax(-1))
            else:
                logits = self.model(tl, pl, ops).float()
                nlls.append(self._nll(logits, yl))
                preds.append(logits.argmax(-1))
        nll = self._unshard(torch.cat(nlls, dim=1))
        pred = self._unshard(torch.cat(preds, dim=1))
        return nll.float().cpu(), pred.cpu()

    @staticmethod
    def _nll(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")


def _all_reduce_sum(t: Tensor, device: torch.device) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = t.to(device)
        dist.all_reduce(x)
        return x.cpu()
    return t


def _my_batches(n: int, layout: EvalLayout, batch: int) -> list[list[int | None]]:
    """Task indices of this dp rank (strided), in batches; every rank gets the same number of
    batches (None pads), so collective calls line up on all ranks."""
    per_rank = -(-n // layout.dp)
    mine: list[int | None] = [i for i in range(layout.dp_rank, n, layout.dp)]
    mine += [None] * (per_rank - len(mine))
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


# ---- passkey ------------------------------------------------------------------------------------

def passkey_eval(scorer: Scorer, tokenizer, filler: Tensor, lengths: Sequence[int], depths: Sequence[float],
                 samples: int, *, seed: int = 0, batch: int = 4, examples: int = 2,
                 filler_mode: str = "repeat") -> dict[str, Any]:
    """Passkey accuracy (%) per (length, depth) over `samples` prompts each.

    Prompts depend only on (seed, length, depth index, sample index), never on the world size.
    Returns {"lengths", "depths", "samples", "accuracy" [len][depth] %, "digit_accuracy" (share of
    answer tokens right under teacher forcing) [len][depth] %, "examples"}.
    """
    from longtrain.launcher.passkey import eval_prompt

    n_dep = len(depths)
    acc = np.zeros((len(lengths), n_dep))
    dig = np.zeros((len(lengths), n_dep))
    shown: list[dict[str, Any]] = []
    for li, L in enumerate(lengths):
        tasks = [(di, i) for di in range(n_dep) for i in range(samples)]
        correct = torch.zeros(len(tasks), dtype=torch.float64)
        digits = torch.zeros(len(tasks), dtype=torch.float64)
        preds_text: dict[int, str] = {}
        for b in _my_batches(len(tasks), scorer.layout, batch):
            real = [t for t in b if t is not None]
            rows, starts, keys = [], [], []
            for t in b:
                di, i = tasks[t if t is not None else real[0] if real else 0]
                tok, a, key = eval_prompt(filler, tokenizer, L, depths[di], [seed, L, di, i], filler_mode)
                rows.append(tok)
                starts.append(a)
                keys.append(key)
            tokens = torch.stack(rows)
            targets = torch.full_like(tokens, -100)
            for r, a in enumerate(starts):
                targets[r, a - 1:L - 1] = tokens[r, a:]
            _, pred = scorer(tokens, targets)
            for r, t in enumerate(b):
                if t is None:
                    continue
                a = starts[r]
                want, got = tokens[r, a:], pred[r, a - 1:L - 1]
                ok = got == want
                correct[t] = float(bool(ok.all()))
                digits[t] = ok.double().mean().item()
                first_bad = int((~ok).nonzero()[0]) if not ok.all() else len(want)
                preds_text[t] = tokenizer.decode(got[:first_bad + 1].tolist())
        if scorer.layout.sp_rank != 0:  # sp ranks hold the same results; count them once
            correct.zero_()
            digits.zero_()
        correct = _all_reduce_sum(correct, scorer.device)
        digits = _all_reduce_sum(digits, scorer.device)
        acc[li] = 100 * correct.view(n_dep, samples).mean(1).numpy()
        dig[li] = 100 * digits.view(n_dep, samples).mean(1).numpy()
        for t in sorted(preds_text)[:examples]:
            di, i = tasks[t]
            key = eval_prompt(filler, tokenizer, L, depths[di], [seed, L, di, i], filler_mode)[2]
            shown.append({"length": L, "depth": depths[di], "key": key, "greedy": preds_text[t].strip(),
                          "correct": bool(correct[t] > 0)})
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples, "filler_mode": filler_mode,
            "accuracy": acc.tolist(), "digit_accuracy": dig.tolist(), "examples": shown}


# ---- perplexity ---------------------------------------------------------------------------------

def heldout_windows(docs: Sequence[str], tokenizer, lengths: Sequence[int], samples: int) -> dict[int, Tensor]:
    """Per length L: up to `samples` windows [n, L+1] = the first L+1 tokens of the first documents
    (in order) that have at least L+1 tokens. Position p of a window is position p of its document."""
    need = {L: [] for L in lengths}
    for d in docs:
        if all(len(v) >= samples for v in need.values()):
            break
        ids = torch.as_tensor(np.asarray(tokenizer.encode(d), dtype=np.int64))
        for L, v in need.items():
            if len(v) < samples and len(ids) >= L + 1:
                v.append(ids[:L + 1])
    out = {}
    for L, v in need.items():
        if not v:
            raise DataError(f"no held-out document has {L + 1} tokens, needed for context length {L}: give longer "
                            "documents with --data")
        out[L] = torch.stack(v)
    return out


def ppl_eval(scorer: Scorer, windows: dict[int, Tensor], *, buckets: int = 8, batch: int = 1) -> dict[str, Any]:
    """Perplexity per context length (over all positions) and per position bucket.

    windows: L -> int64 [n, L+1]. Buckets split [0, L) into `buckets` equal ranges of token
    positions; a bucket's perplexity is exp(mean NLL of the tokens predicted at those positions).
    """
    out: dict[str, Any] = {"lengths": [], "ppl": [], "windows": [], "buckets": []}
    for L, win in sorted(windows.items()):
        n = win.shape[0]
        nll_sum = torch.zeros(n, L, dtype=torch.float64)
        for b in _my_batches(n, scorer.layout, batch):
            idx = [t if t is not None else 0 for t in b]
            w = win[idx]
            nll, _ = scorer(w[:, :-1], w[:, 1:])
            for r, t in enumerate(b):
                if t is not None:
                    nll_sum[t] = nll[r].double()
        if scorer.layout.sp_rank != 0:
            nll_sum.zero_()
        nll_sum = _all_reduce_sum(nll_sum, scorer.device)
        per_pos = nll_sum.mean(0)  # [L]
        edges = np.linspace(0, L, min(buckets, L) + 1).round().astype(int)
        bks = [{"start": int(a), "end": int(e), "ppl": math.exp(per_pos[a:e].mean().item())}
               for a, e in zip(edges[:-1], edges[1:]) if e > a]
        out["lengths"].append(L)
        out["ppl"].append(math.exp(per_pos.mean().item()))
        out["windows"].append(n)
        out["buckets"].append(bks)
    return out


# ---- plots and tables ---------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_passkey(res: dict[str, Any], path: Path, title: str) -> None:
    """Heat map: x context length (tokens), y needle depth, colour accuracy (%)."""
    plt = _pyplot()
    acc = np.asarray(res["accuracy"]).T  # [depth, length]
    width = max(4.8, 1.6 + 1.1 * len(res["lengths"]))  # wide enough for the title with one length
    fig, ax = plt.subplots(figsize=(width, 1.8 + 0.55 * len(res["depths"])), dpi=110)
    im = ax.imshow(acc, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(res["lengths"])), [fmt_length(L) for L in res["lengths"]])
    ax.set_yticks(range(len(res["depths"])), [f"{d:g}" for d in res["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey depth (fraction of context)")
    for y in range(acc.shape[0]):
        for x in range(acc.shape[1]):
            ax.text(x, y, f"{acc[y, x]:.0f}", ha="center", va="center", fontsize=9, color="black")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("accuracy (%)")
    wrapped = "\n".join(textwrap.wrap(title, width=int(width * 9)))
    ax.set_title(f"{wrapped}\n({res['samples']} samples per cell)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ppl(res: dict[str, Any], path: Path, title: str) -> None:
    """Line plot: x token position (tokens, bucket centre), y perplexity; one line per context length."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for L, bks, n in zip(res["lengths"], res["buckets"], res["windows"]):
        xs = [(b["start"] + b["end"]) / 2 for b in bks]
        ax.plot(xs, [b["ppl"] for b in bks], marker="o", label=f"context {fmt_length(L)} ({n} docs)")
    ax.set_xlabel("token position (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def passkey_table(res: dict[str, Any]) -> str:
    head = "depth \\ length | " + " | ".join(f"{fmt_length(L):>6}" for L in res["lengths"])
    lines = [head, "-" * len(head)]
    acc = np.asarray(res["accuracy"])
    for di, d in enumerate(res["depths"]):
        lines.append(f"{d:>14g} | " + " | ".join(f"{acc[li, di]:>5.1f}%" for li in range(len(res["lengths"]))))
    lines.append(f"{'all depths':>14} | " + " | ".join(f"{acc[li].mean():>5.1f}%" for li in range(len(res["lengths"]))))
    return "\n".join(lines)


def ppl_table(res: dict[str, Any]) -> str:
    lines = ["length | docs | ppl      | ppl by position bucket (start-end: ppl)", "-" * 72]
    for L, p, n, bks in zip(res["lengths"], res["ppl"], res["windows"], res["buckets"]):
        bk = "  ".join(f"{b['start']}-{b['end']}: {b['ppl']:.3g}" for b in bks)
        lines.append(f"{fmt_length(L):>6} | {n:>4} | {p:<8.4g} | {bk}")
    return "\n".join(lines)


# ---- documents for filler and held-out perplexity -----------------------------------------------

def _load_docs(source: str, data: dict[str, Any]) -> list[str]:
    from longtrain.launcher.data import load_documents

    if source != "stdlib" and not any(Path(s.strip()).exists() for s in source.split(",")) \
            and not __import__("glob").glob(source):
        raise DataError(f"data source not found: {source}")
    return load_documents(source, data.get("format", "auto"), data.get("text_field", "text"))


def heldout_documents(run_data: dict[str, Any], data: str | None, skip: int | None) -> tuple[list[str], str]:
    """Documents not used for training and a sentence saying why.

    With --data: that source (documents from --skip-documents on). Without: the run's training
    source from document data.max_documents on (the trainer reads only the first
    data.max_documents); an error when the run read them all or the run is unknown.
    """
    if data is not None:
        docs = _load_docs(data, run_data if data == run_data.get("source") else {})
        k = skip or 0
        rule = f"documents {k}.. of {data} (given with --data)"
    else:
        src = run_data.get("source")
        if src is None:
            raise ConfigError("cannot tell which documents the model trained on (no run recipe next to the "
                              "checkpoint): pass --data PATH with held-out documents")
        used = int(run_data.get("max_documents") or 0)
        if used == 0 and skip is None:
            raise ConfigError(f"the run trained on every document of {src!r} (data.max_documents = 0), so none is "
                              "held out: pass --data PATH with held-out documents")
        if src.startswith("passkey"):
            raise ConfigError("the run trained on synthetic passkey data only: pass --data PATH for perplexity")
        docs = _load_docs(src, run_data)
        k = used if skip is None else skip
        rule = f"documents {k}.. of the training source {src} (the run read the first {used})"
    docs = docs[k:]
    if not docs:
        raise DataError(f"no held-out documents: {rule} is empty")
    return docs, rule


def filler_documents(run_data: dict[str, Any], data: str | None, skip: int | None = None) -> tuple[list[str], str]:
    """Filler text for passkey haystacks and a label saying which: --data (from document `skip` on),
    else the held-out part of the run's source when there is one, else its training documents
    (filler content does not matter), else stdlib."""
    if data is not None:
        docs = _load_docs(data, {})
        k = skip or 0
        if not docs[k:]:
            raise DataError(f"no filler text: --data {data} has {len(docs)} documents, --skip-documents is {k}")
        return docs[k:], f"{data} documents {k}.." if k else data
    src = run_data.get("source")
    if src and not src.startswith("passkey"):
        try:
            docs = _load_docs(src, run_data)
        except LongtrainError:
            docs = []
        used = int(run_data.get("max_documents") or 0)
        if docs:
            return (docs[used:], f"{src} documents {used}.. (held out)") if docs[used:] else (docs, src)
    return _load_docs("stdlib", {}), "stdlib"


# ---- in-training evaluation ---------------------------------------------------------------------

_TRAIN_CACHE: dict[tuple, Any] = {}


def _resolve_impl(impl: str, cfg: Any) -> str:
    """'auto' -> the trainer's choice for this model (TokenRing for MHA, ring for GQA)."""
    if impl != "auto":
        return impl
    from longtrain.launcher.trainer import resolve_sp_impl

    return resolve_sp_impl(impl, cfg)


def in_training_eval(trainer: Any) -> dict[str, float]:
    """Passkey accuracy (%) and held-out perplexity at each eval.lengths (default: data.seq_len).

    Collective: every rank calls it at the same step. Keys: "eval/passkey_acc@L" (% exact),
    "eval/passkey_digit_acc@L" (% answer tokens), "eval/ppl@L" (only when the run holds documents
    out: data.max_documents > 0 with documents beyond it).
    """
    r = trainer.recipe
    lengths = list(r.eval.lengths) or [r.data.seq_len]
    limit = trainer.model.cfg.max_seq_len
    lay = trainer.layout
    from longtrain.launcher.passkey import min_length

    shortest = min_length(trainer.tokenizer) if r.eval.passkey else 1
    for L in lengths:
        if L > limit:
            raise ConfigError(f"eval.lengths: {L} exceeds the model's max_seq_len {limit}")
        if L < shortest:
            raise ConfigError(f"eval.lengths: {L} is shorter than the bare passkey prompt ({shortest} tokens)")
        div = 2 * lay.sp if r.parallel.sp_layout == "zigzag" else lay.sp
        if lay.sp > 1 and L % div:
            raise ConfigError(f"eval.lengths: {L} must be divisible by {div} for sp={lay.sp} ({r.parallel.sp_layout})")
    run_data = {"source": r.data.source, "format": r.data.format, "text_field": r.data.text_field,
                "max_documents": r.data.max_documents}
    key = tuple(sorted(run_data.items())) + (r.data.tokenizer, tuple(lengths), r.eval.samples)
    if key not in _TRAIN_CACHE:
        _TRAIN_CACHE.clear()
        docs, _ = filler_documents(run_data, None)
        from longtrain.launcher.passkey import filler_tokens

        filler = filler_tokens(docs, trainer.tokenizer, 4 * max(lengths) * max(1, r.eval.samples) + 100_000)
        windows = None
        if r.data.max_documents and not r.data.source.startswith("passkey"):
            try:
                held, _ = heldout_documents(run_data, None, None)
                windows = heldout_windows(held, trainer.tokenizer, lengths, max(1, r.eval.samples))
            except LongtrainError as e:
                log.warning("in-training perplexity is off: %s", e)
        _TRAIN_CACHE[key] = (filler, windows)
    filler, windows = _TRAIN_CACHE[key]
    amp = torch.bfloat16 if (trainer.dtype == torch.bfloat16 and trainer.engine == "ddp") else None
    impl = getattr(trainer, "sp_impl", None) or _resolve_impl(r.parallel.sp_impl, trainer.model.cfg)
    layout = EvalLayout.from_trainer_layout(lay, impl, r.parallel.sp_layout)
    scorer = Scorer(trainer.wrapped, layout, trainer.device, plain=False, autocast_dtype=amp)
    was_training = trainer.wrapped.training
    trainer.wrapped.eval()
    out: dict[str, float] = {}
    try:
        if r.eval.passkey:
            res = passkey_eval(scorer, trainer.tokenizer, filler, lengths, r.eval.depths, max(1, r.eval.samples),
                               seed=r.run.seed, batch=max(1, r.training.micro_batch))
            for li, L in enumerate(lengths):
                out[f"eval/passkey_acc@{L}"] = float(np.mean(res["accuracy"][li]))
                out[f"eval/passkey_digit_acc@{L}"] = float(np.mean(res["digit_accuracy"][li]))
        if windows is not None:
            res = ppl_eval(scorer, windows, buckets=1, batch=max(1, r.training.micro_batch))
            for L, p in zip(res["lengths"], res["ppl"]):
                out[f"eval/ppl@{L}"] = float(p)
    finally:
        trainer.wrapped.train(was_training)
    if trainer.env.is_main and out:
        log.info("eval at step %d: %s", trainer.step, "  ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out


# ---- command line -------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, through the CLI's error path
        raise ConfigError(f"eval {self.prog.split()[-1]}: {message}")


def _parser(metric: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"longtrain eval {metric}", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--sp-impl", default="auto", choices=SP_IMPLS,
                   help="sequence-parallel attention (auto: as in training, TokenRing for MHA, ring for GQA)")
    p.add_argument("--sp-layout", default="zigzag", choices=("zigzag", "contiguous"))
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
        div = 2 * args.sp if args.sp_layout == "zigzag" else args.sp
        if args.sp > 1 and L % div:
            raise ConfigError(f"context length {L} must be divisible by {div} for --sp {args.sp} "
                              f"({args.sp_layout} layout)")
    if world is not None and world % args.sp:
        hint = f": add --nproc {args.sp} (or run under torchrun)" if world == 1 else ""
        raise ConfigError(f"--sp {args.sp} needs a multiple of {args.sp} processes, got {world}{hint}")
    if args.metric == "passkey":
        from longtrain.launcher.passkey import min_length

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
        print("usage: longtrain eval {passkey,ppl} CHECKPOINT [options]\n"
              "  passkey  passkey retrieval accuracy per (context length, depth): table, JSON, heat map\n"
              "  ppl      held-out perplexity by context length and token position: table, JSON, line plot\n"
              "`longtrain eval passkey --help` lists the options.")
        return 0 if argv else 2
    metric = argv[0]
    if metric not in METRICS:
        import difflib

        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown metric {metric!r}{hint}; choose one of: {', '.join(METRICS)}")
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
    from longtrain.launcher.trainer import make_layout, setup_logging

    t0 = time.perf_counter()
    env, device = init_distributed(args.device, sp=args.sp)
    try:
        setup_logging(env.is_main)
        if env.world_size % args.sp:
            raise ConfigError(f"{env.world_size} processes are not divisible by --sp {args.sp}")
        lay = make_layout(args.sp)
        loaded = load_model(info)
        impl = _resolve_impl(args.sp_impl, loaded.cfg)
        layout = EvalLayout.from_trainer_layout(lay, impl, args.sp_layout)
        dtype = torch.bfloat16 if (args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")) \
            else torch.float32
        model = loaded.model.to(device=device, dtype=dtype).eval()
        scorer = Scorer(model, layout, device, plain=True)
        name = loaded.name
        meta = {"checkpoint": str(loaded.path), "kind": loaded.kind, "step": loaded.step,
                "world_size": env.world_size, "sp": args.sp, "sp_impl": impl if args.sp > 1 else None,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""), "seed": args.seed}
        if args.metric == "passkey":
            docs, src = filler_documents(loaded.run_data, args.data, args.skip_documents)
            from longtrain.launcher.passkey import filler_tokens

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
            dist.destroy_process_group()
