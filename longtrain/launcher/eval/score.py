"""Scoring for `longtrain eval` and the in-training evaluation: passkey accuracy and held-out
perplexity by position, on one process or split over dp x sp ranks. No plotting, no CLI, no
trainer import (the training loop's hook is eval/in_training.py). See docs/evaluation.md."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.errors import ConfigError, DataError, LongtrainError
from longtrain.models import Transformer
from longtrain.parallel.mesh import Layout, SPAttention, shard_batch, unshard_tokens

log = logging.getLogger("longtrain")


# ---- scoring (shared by the CLI and the training loop) ------------------------------------------

@dataclass
class EvalLayout:
    """How ranks split the work: dp groups take different samples, sp ranks split one sequence."""

    dp: int = 1
    dp_rank: int = 0
    sp: int = 1
    sp_rank: int = 0
    sp_group: Any = None
    attention: SPAttention = SPAttention()  # the same object training shards and attends with

    @classmethod
    def from_mesh(cls, lay: Layout, attention: SPAttention) -> "EvalLayout":
        return cls(lay.dp, lay.dp_rank, lay.sp, lay.sp_rank, lay.sp_group, attention)


class Scorer:
    """Per-token NLL and argmax of a causal LM over sequences, optionally sequence-parallel.

    A longtrain Transformer (plain, or FSDP/DDP-wrapped in the training loop: one forward call
    that every rank makes identically) forms its logits in chunks of tokens (`chunk`: training.loss_chunk's
    'auto' | 0 | tokens; None = 'auto'), so [S, vocab] logits never exist; any other module returning logits
    [B, S, V] (test oracles) is scored from its logits.
    """

    def __init__(self, model: nn.Module, layout: EvalLayout, device: torch.device, *, chunk: int | str | None = None,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.layout, self.device = model, layout, device
        self.chunk, self.autocast_dtype = chunk, autocast_dtype

    @torch.no_grad()
    def __call__(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """tokens, targets int64 [B, S] (targets -100 = not scored) -> nll fp32 [B, S] (0 where not
        scored), argmax int64 [B, S]; both on CPU, identical on every rank of the sp group."""
        dev, lay = self.device, self.layout
        b = shard_batch({"tokens": tokens, "labels": targets, "positions": torch.arange(tokens.shape[1])},
                        lay.sp_group, lay.sp, lay.attention, dev)
        tl, yl, pl, ops = b["tokens"], b["labels"], b["positions"], b["ops"]
        amp = (torch.autocast(dev.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else nullcontext())
        inner = getattr(self.model, "module", self.model)
        with amp:
            if isinstance(inner, Transformer):  # the model's chunked head: per-token NLL and argmax
                nll, pred = self.model(tl, pl, ops, yl, "none",
                                       loss_chunk=self.chunk if self.chunk is not None else "auto")
            else:
                logits = self.model(tl, pl, ops).float()
                nll, pred = self._nll(logits, yl), logits.argmax(-1)
        nll = unshard_tokens(nll, lay.sp_group, lay.sp, lay.attention)
        pred = unshard_tokens(pred, lay.sp_group, lay.sp, lay.attention)
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
    from longtrain.launcher.eval.passkey import eval_prompt

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


# ---- documents for filler and held-out perplexity -----------------------------------------------

def _load_docs(source: str, data: dict[str, Any]) -> list[str]:
    from longtrain.launcher.data.sources import load_documents

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
    elif run_data.get("sources"):
        docs, rule = _mixture_heldout(run_data, skip)
        k = 0
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


def _mixture_heldout(run_data: dict[str, Any], skip: int | None) -> tuple[list[str], str]:
    """Held-out documents of a [[data.sources]] mixture: from each raw source the documents after the
    first data.max_documents (or `skip`), which the run never read; prepared folders were read whole."""
    from longtrain.launcher.data.prepared import is_prepared

    used = int(run_data.get("max_documents") or 0) if skip is None else skip
    docs: list[str] = []
    parts = []
    for s in run_data["sources"]:
        name = s.get("name") or Path(str(s["path"]).rstrip("/")).name
        if is_prepared(s["path"]) or used == 0:
            parts.append(f"{name}: none ({'prepared folder' if is_prepared(s['path']) else 'all documents'} "
                         "read in training)")
            continue
        got = _load_docs(s["path"], {"format": s.get("format", "auto"), "text_field": s.get("text_field", "text")})
        docs += got[used:]
        parts.append(f"{name}: {len(got[used:])} documents ({used}..)")
    rule = "held out from each source of the mixture: " + "; ".join(parts)
    if not docs:
        raise ConfigError(f"no held-out documents ({rule}): pass --data PATH with held-out documents")
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
