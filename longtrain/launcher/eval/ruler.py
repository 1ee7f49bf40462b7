"""RULER-style synthetic long-context evaluation (offline): build prompts, generate greedily, score.

The tasks, prompt format, exact token lengths and metrics are described in `ruler_tasks`
(niah_single_1/2, niah_multikey, niah_multivalue, niah_multiquery, vt, cwe, fwe; all scored with
RULER's string_match_all, 0..100). `run_ruler` evaluates a model on tasks x context lengths:

    report = run_ruler(model, tokenizer, lengths=[1024, 4096], tasks=["niah_single_1", "vt"], samples=20,
                       seed=0, haystack_docs=load_documents("stdlib"))
    report["scores"]["vt"][4096]  # -> 0..100

A context length L means: prompt of exactly L - B tokens, then up to B = max_new_tokens generated
tokens (the task's answer budget). L above the model's context raises ConfigError; nothing is cut.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from longtrain.errors import ConfigError
from longtrain.launcher.eval.ruler_tasks import (METRICS, TASKS, TRAIN_KINDS, ChatTemplate, RulerOptions,
                                                 RulerSample, answer_budget, default_options, load_chat_template,
                                                 mix_ruler_documents, postprocess, ruler_samples, score_task,
                                                 string_match_all, string_match_part)

log = logging.getLogger("longtrain")

TEMPLATES = ("base", "chat")


def model_context(model: nn.Module, max_context: int | None = None) -> int | None:
    """The longest sequence (tokens) the model takes: max_context, else model.cfg.max_seq_len, else None."""
    if max_context:
        return int(max_context)
    cfg = getattr(model, "cfg", None)
    n = getattr(cfg, "max_seq_len", None)
    return int(n) if n else None


def _decode_answer(tokenizer, row: Sequence[int], eos_id: int | None) -> str:
    ids = [int(t) for t in row]
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids)


def run_ruler(model: nn.Module, tokenizer, *, lengths: Sequence[int], tasks: Sequence[str], samples: int,
              seed: int, template: str = "base", device: torch.device | str | None = None,
              haystack_docs: Sequence[str] | str, options: RulerOptions | None = None,
              chat_template: ChatTemplate | str | Path | None = None, batch_size: int = 8,
              max_context: int | None = None) -> dict[str, Any]:
    """Score `model` on RULER `tasks` at each context length in `lengths` (tokens), `samples` prompts each.

    tokenizer: a ByteTokenizer / HFTokenizer, or its spec ("bytes" or a tokenizer.json path / folder).
    haystack_docs: the documents haystacks are cut from, or a source for `load_documents` ("stdlib", text
    files / folders / globs, a prepared folder).
    template: "base" or "chat"; "chat" renders `chat_template` (a ChatTemplate, or a tokenizer folder /
    tokenizer_config.json; default: the tokenizer spec's folder) and raises ConfigError without one.
    options: task parameters (default: compact for the byte tokenizer, RULER's otherwise).
    Generation is greedy (`longtrain.models.generate.generate`), `batch_size` prompts at a time, up to the
    task's answer budget, stopping at the tokenizer's EOS.

    A (task, length) too short to hold its task is skipped (score None, reason in "skipped", a warning);
    ConfigError when none fits.

    Returns {"scores": {task: {length: 0..100 | None}}, "average": {length: mean over scored tasks}, "metrics": {task:
    metric}, "answer_tokens": {task: {length: B}}, "samples": [{task, length, index, answers, prediction,
    score}], "template", "seed", "options", "skipped": {task: {length: reason}}}; the length keys are ints.
    """
    from longtrain.launcher.data.tokenizers import build_tokenizer
    from longtrain.models.generate import generate  # imported here: only the runner needs the model side

    _check_ruler_args(template, tasks, samples, lengths)
    spec = tokenizer if isinstance(tokenizer, str) else None
    tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    chat = _chat_template(template, chat_template, spec)
    opts = options or default_options(tok)
    if isinstance(haystack_docs, str):
        from longtrain.launcher.data.sources import load_documents

        haystack_docs = load_documents(haystack_docs)
    ctx = model_context(model, max_context)
    for n in lengths:
        if ctx is not None and n > ctx:
            raise ConfigError(f"RULER context length {n} exceeds the model's context of {ctx} tokens; "
                              "drop that length (prompts are never truncated)")
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    eos = getattr(tok, "eos_id", None)
    batches, skipped = _build_prompts(tasks, lengths, tok, samples, seed, haystack_docs, opts, chat)
    scores, budgets, rows = _score_prompts(generate, model, tok, batches, tasks, lengths, device, batch_size,
                                           eos, ctx)
    average = {}
    for n in lengths:
        done = [scores[t][int(n)] for t in tasks if scores[t][int(n)] is not None]
        average[int(n)] = round(float(np.mean(done)), 2) if done else None
    return {"scores": scores, "average": average, "metrics": {t: METRICS[t] for t in tasks},
            "answer_tokens": budgets, "samples": rows, "template": template, "seed": seed,
            "options": dict(vars(opts)), "skipped": skipped}


def _check_ruler_args(template: str, tasks: Sequence[str], samples: int, lengths: Sequence[int]) -> None:
    if template not in TEMPLATES:
        raise ConfigError(f"RULER template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ConfigError(f"unknown RULER task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TASKS)}")
    if samples < 1 or not lengths or min(lengths) < 1:
        raise ConfigError(f"RULER needs samples >= 1 and positive lengths (got {samples}, {list(lengths)})")


def _chat_template(template: str, chat_template: ChatTemplate | str | Path | None,
                   spec: str | None) -> ChatTemplate | None:
    """The chat template to render (template 'chat'), else None: `chat_template`, or the tokenizer spec's."""
    if template != "chat":
        return None
    source = chat_template if chat_template is not None else (spec if spec and spec != "bytes" else None)
    if source is None:
        raise ConfigError("template 'chat' needs a chat template: pass the tokenizer folder (its "
                          "tokenizer_config.json chat_template), or use the base template")
    return source if isinstance(source, ChatTemplate) else load_chat_template(source)


def _build_prompts(tasks: Sequence[str], lengths: Sequence[int], tok, samples: int, seed: int,
                   docs: Sequence[str], opts: RulerOptions, chat: ChatTemplate | None
                   ) -> tuple[dict[tuple[str, int], list[RulerSample]], dict[str, dict[int, str]]]:
    """Every prompt, built before any generation: a (task, length) that cannot hold its task (cwe's word
    list at a short length) is skipped with its reason (a warning), and the rest of the table is still
    measured. ConfigError when none fits."""
    batches: dict[tuple[str, int], list[RulerSample]] = {}
    skipped: dict[str, dict[int, str]] = {}
    for task in tasks:
        for n in lengths:
            try:
                batches[task, int(n)] = ruler_samples(task, tok, int(n), samples, seed=seed, docs=docs,
                                                      options=opts, chat=chat)
            except ConfigError as e:
                skipped.setdefault(task, {})[int(n)] = str(e)
    if not batches:
        raise ConfigError("no RULER task fits the given lengths: " + "; ".join(
            f"{t} @ {n}: {why}" for t, by_n in skipped.items() for n, why in by_n.items()))
    for task, by_n in skipped.items():
        for n, why in by_n.items():
            log.warning("ruler %s @ %d: skipped (%s)", task, n, why)
    return batches, skipped


def _score_prompts(generate, model: nn.Module, tok, batches: dict[tuple[str, int], list[RulerSample]],
                   tasks: Sequence[str], lengths: Sequence[int], device, batch_size: int, eos: int | None,
                   ctx: int | None) -> tuple[dict, dict, list[dict[str, Any]]]:
    """(scores {task: {length: score | None}}, answer budgets {task: {length: B}}, per-sample rows), the
    model in eval mode meanwhile."""
    scores: dict[str, dict[int, float | None]] = {t: {int(n): None for n in lengths} for t in tasks}
    budgets: dict[str, dict[int, int]] = {t: {} for t in tasks}
    rows: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    try:
        for (task, n), batch in batches.items():
            preds = _generate_all(generate, model, tok, batch, device, batch_size, eos, ctx)
            refs = [s.answers for s in batch]
            scores[task][int(n)] = score_task(task, preds, refs)
            budgets[task][int(n)] = batch[0].max_new_tokens
            for s, p in zip(batch, preds):
                rows.append({"task": task, "length": int(n), "index": s.index, "answers": s.answers,
                             "prediction": postprocess(p), "score": score_task(task, [p], [s.answers])})
            log.info("ruler %s @ %d: %.1f", task, n, scores[task][int(n)])
    finally:
        model.train(was_training)
    return scores, budgets, rows


def _generate_all(generate, model: nn.Module, tok, batch: list[RulerSample], device, batch_size: int,
                  eos: int | None, ctx: int | None) -> list[str]:
    """Greedy completions (decoded, cut at EOS) of same-length prompts, `batch_size` at a time."""
    preds: list[str] = []
    for i in range(0, len(batch), max(1, batch_size)):
        part = batch[i:i + max(1, batch_size)]
        prompt = torch.from_numpy(np.stack([s.tokens for s in part])).to(device=device, dtype=torch.long)
        with torch.no_grad():
            new = generate(model, prompt, part[0].max_new_tokens, temperature=0.0, eos_id=eos, max_context=ctx)
        preds += [_decode_answer(tok, row, eos) for row in new.cpu().tolist()]
    return preds


__all__ = ["METRICS", "TASKS", "TEMPLATES", "TRAIN_KINDS", "ChatTemplate", "RulerOptions", "RulerSample",
           "answer_budget", "load_chat_template", "mix_ruler_documents", "model_context", "ruler_samples",
           "run_ruler", "score_task", "string_match_all", "string_match_part"]
