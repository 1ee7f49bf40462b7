"""Evaluation during training (`[eval]` every N steps): passkey accuracy, held-out perplexity and a
subset of the RULER tasks, on every rank with the training model, its attention and its sharding.
This module never imports the trainer: it reads what it needs from the object it is given."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from longtrain.errors import ConfigError, LongtrainError
from longtrain.launcher.eval.score import (EvalLayout, Scorer, filler_documents, heldout_documents,
                                           heldout_windows, passkey_eval, ppl_eval)
from longtrain.parallel.rules import check_sequence_length

log = logging.getLogger("longtrain")


_TRAIN_CACHE: dict[tuple, Any] = {}


def in_training_eval(trainer: Any) -> dict[str, float]:
    """Passkey accuracy (%), held-out perplexity and RULER scores at each eval.lengths (default:
    data.seq_len).

    `trainer` is read duck-typed (recipe, model, layout, tokenizer, device, engine (wrapped,
    autocast), sp_attention, env, step, and metrics when present: the passkey heat map goes to its
    passkey_heatmap).

    Collective: every rank calls it at the same step. Keys: "eval/passkey_acc@L" (% exact),
    "eval/passkey_digit_acc@L" (% answer tokens), "eval/ppl@L" (only when the run holds documents
    out: data.max_documents > 0 with documents beyond it, in any source of a mixture),
    "eval/ruler/TASK@L" (0..100, eval.ruler_tasks; every rank generates the same prompts, so
    sharded weights are gathered in step).
    """
    r = trainer.recipe
    lengths = list(r.eval.lengths) or [r.data.seq_len]
    limit = trainer.model.cfg.max_seq_len
    lay = trainer.layout
    from longtrain.launcher.eval.passkey import min_length

    shortest = min_length(trainer.tokenizer) if r.eval.passkey else 1
    for L in lengths:
        if L > limit:
            raise ConfigError(f"eval.lengths: {L} exceeds the model's max_seq_len {limit}")
        if L < shortest:
            raise ConfigError(f"eval.lengths: {L} is shorter than the bare passkey prompt ({shortest} tokens)")
        check_sequence_length(L, lay.sp, r.parallel.sp_layout, what="eval.lengths:")
    run_data = {"source": r.data.source, "format": r.data.format, "text_field": r.data.text_field,
                "max_documents": r.data.max_documents,
                "sources": [{"path": s.path, "name": s.name, "format": s.format, "text_field": s.text_field}
                            for s in r.data.sources]}
    key = json.dumps([run_data, r.data.tokenizer, lengths, r.eval.samples], sort_keys=True)
    if key not in _TRAIN_CACHE:
        _TRAIN_CACHE.clear()
        docs, _ = filler_documents(run_data, None)
        _TRAIN_CACHE[key + "|docs"] = docs
        from longtrain.launcher.eval.passkey import filler_tokens

        filler = filler_tokens(docs, trainer.tokenizer, 4 * max(lengths) * max(1, r.eval.samples) + 100_000)
        windows = None
        if r.data.max_documents and (r.data.sources or not r.data.source.startswith("passkey")):
            try:
                held, _ = heldout_documents(run_data, None, None)
                windows = heldout_windows(held, trainer.tokenizer, lengths, max(1, r.eval.samples))
            except LongtrainError as e:
                log.warning("in-training perplexity is off: %s", e)
        _TRAIN_CACHE[key] = (filler, windows)
    filler, windows = _TRAIN_CACHE[key]
    amp = trainer.engine.autocast  # as the training forward runs (DDP + bf16: autocast)
    layout = EvalLayout.from_mesh(lay, trainer.sp_attention)  # the training attention's own settings
    scorer = Scorer(trainer.engine.wrapped, layout, trainer.device, chunk=r.training.loss_chunk, autocast_dtype=amp)
    was_training = trainer.engine.wrapped.training
    trainer.engine.wrapped.eval()
    out: dict[str, float] = {}
    try:
        if r.eval.passkey:
            res = passkey_eval(scorer, trainer.tokenizer, filler, lengths, r.eval.depths, max(1, r.eval.samples),
                               seed=r.run.seed, batch=max(1, r.training.micro_batch))
            for li, L in enumerate(lengths):
                out[f"eval/passkey_acc@{L}"] = float(np.mean(res["accuracy"][li]))
                out[f"eval/passkey_digit_acc@{L}"] = float(np.mean(res["digit_accuracy"][li]))
            if getattr(trainer, "metrics", None) is not None:  # rank 0: the heat map as a TensorBoard image
                trainer.metrics.passkey_heatmap(trainer.step, res)
        if windows is not None:
            res = ppl_eval(scorer, windows, buckets=1, batch=max(1, r.training.micro_batch))
            for L, p in zip(res["lengths"], res["ppl"]):
                out[f"eval/ppl@{L}"] = float(p)
        if r.eval.ruler_tasks:
            out.update(_ruler_scores(trainer, lengths, filler_docs=_TRAIN_CACHE.get(key + "|docs")))
    finally:
        trainer.engine.wrapped.train(was_training)
    if trainer.env.is_main and out:
        log.info("eval at step %d: %s", trainer.step, "  ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out


def _ruler_scores(trainer: Any, lengths: list[int], filler_docs: list[str] | None) -> dict[str, float]:
    """eval.ruler_tasks at each length, eval.ruler_samples prompts each, haystacks from the filler text."""
    from longtrain.launcher.eval.ruler import run_ruler

    r = trainer.recipe
    res = run_ruler(trainer.model, trainer.tokenizer, lengths=lengths, tasks=list(r.eval.ruler_tasks),
                    samples=max(1, r.eval.ruler_samples), seed=r.run.seed, device=trainer.device,
                    haystack_docs=filler_docs or "stdlib", batch_size=max(1, r.training.micro_batch))
    return {f"eval/ruler/{task}@{L}": float(v) for task, by_len in res["scores"].items() for L, v in by_len.items()
            if v is not None}
