"""The passkey retrieval task: synthetic training documents and evaluation prompts.

One format serves training and evaluation, so a model trained on the mixed-in
documents is tested on exactly the pattern it learned:

    <filler> NEEDLE <filler> QUESTION ANSWER

    NEEDLE   = "\\nThe pass key is 71432. Remember it.\\n"
    QUESTION = "\\nWhat is the pass key? The pass key is"
    ANSWER   = " 71432"                      (a space, then DIGITS random digits)

Filler is ordinary text cut from the corpus (stdlib source by default). The
needle's *depth* is the fraction of the filler that comes before it: depth 0
puts the needle first, depth 1 right before the question.

Training documents are built in text space (`mix_passkey_documents`);
evaluation prompts in token space (`passkey_prompt`), so that a prompt of
context length L is exactly L tokens long (answer included) for any tokenizer.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"
DIGITS = 5


def random_key(rng: np.random.Generator, digits: int = DIGITS) -> str:
    """A random passkey of `digits` decimal digits (leading zeros allowed)."""
    return "".join(str(int(d)) for d in rng.integers(0, 10, size=digits))


def _filler_text(docs: Sequence[str], rng: np.random.Generator, n_chars: int) -> str:
    """`n_chars` characters of corpus text starting at a line start of a random document."""
    if n_chars <= 0:
        return ""
    for _ in range(8):
        doc = docs[int(rng.integers(len(docs)))]
        if len(doc) > n_chars:
            break
    if len(doc) <= n_chars:  # short corpus: repeat the document
        doc = (doc + "\n") * (n_chars // max(1, len(doc) + 1) + 2)
    start = int(rng.integers(0, len(doc) - n_chars + 1))
    nl = doc.rfind("\n", 0, start) + 1  # back up to the start of that line when it fits
    if len(doc) - nl >= n_chars:
        start = nl
    return doc[start:start + n_chars]


def _repeated_snippet(docs: Sequence[str], rng: np.random.Generator, n_chars: int) -> str:
    """A short corpus snippet (16-64 characters) repeated to `n_chars` characters."""
    if n_chars <= 0:
        return ""
    snippet = _filler_text(docs, rng, int(rng.integers(16, 65)))
    return (snippet * (n_chars // max(1, len(snippet)) + 1))[:n_chars]


def passkey_document(filler: str, key: str, depth: float) -> str:
    """One training document: filler with the needle at `depth` (0..1), then question and answer."""
    cut = int(round(depth * len(filler)))
    return filler[:cut] + NEEDLE.format(key=key) + filler[cut:] + QUESTION + ANSWER.format(key=key) + ".\n"


def mix_passkey_documents(docs: Sequence[str], fraction: float, *, seed: int = 0, seq_len: int = 256,
                          digits: int = DIGITS, min_chars: int | None = None,
                          max_chars: int | None = None, repeat_share: float = 0.0) -> list[str]:
    """`docs` plus synthetic passkey documents making up about `fraction` of all characters.

    Each synthetic document is between `min_chars` (default seq_len // 8) and `max_chars`
    (default seq_len // 2) characters long, so most of them fit inside one packed sample
    of seq_len tokens with a byte tokenizer; filler comes from `docs`, depth is uniform
    in [0, 1]. fraction = 1 replaces `docs` by as many characters of passkey documents.
    A share `repeat_share` of them uses a short corpus snippet repeated as filler: every
    repeat is a copy event, which teaches a small model to copy (induction) within a few
    hundred steps; the copy mechanism is what retrieval needs.
    Deterministic in `seed`.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not docs:
        raise ValueError("passkey documents need filler text: the corpus is empty")
    fixed = len(NEEDLE.format(key="0" * digits)) + len(QUESTION) + len(ANSWER.format(key="0" * digits)) + 2
    hi = max_chars if max_chars is not None else max(seq_len // 2, fixed + 16)
    lo = min_chars if min_chars is not None else min(hi, max(seq_len // 8, fixed + 8))
    if lo < fixed or hi < lo:
        raise ValueError(f"passkey documents need {fixed} <= min_chars <= max_chars, got {lo}, {hi}")
    total = sum(len(d) for d in docs)
    target = total if fraction >= 1 else fraction / (1 - fraction) * total
    n = max(1, int(math.ceil(target / ((lo + hi) / 2))))
    rng = np.random.default_rng([seed, 0x9A55])
    out: list[str] = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        key = random_key(rng, digits)
        make = _repeated_snippet if rng.random() < repeat_share else _filler_text
        filler = make(docs, rng, length - fixed)
        out.append(passkey_document(filler, key, float(rng.random())))
    return out if fraction >= 1 else list(docs) + out


# ---- evaluation prompts (token space) ---------------------------------------------------------

def filler_tokens(docs: Sequence[str], tokenizer, min_tokens: int) -> Tensor:
    """Token stream of documents joined by blank lines (no EOS), at least `min_tokens` long (repeats)."""
    pieces, n = [], 0
    for d in docs:
        ids = np.asarray(tokenizer.encode(d + "\n\n"), dtype=np.int64)
        pieces.append(ids)
        n += len(ids)
        if n >= min_tokens:
            break
    if n == 0:
        raise ValueError("no filler text: the documents are empty")
    stream = np.concatenate(pieces)
    if len(stream) < min_tokens:
        stream = np.tile(stream, min_tokens // len(stream) + 1)
    return torch.from_numpy(stream)


def prompt_parts(tokenizer, key: str) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids of needle, question and answer for `key`."""
    enc = lambda s: torch.as_tensor(np.asarray(tokenizer.encode(s), dtype=np.int64))  # noqa: E731
    return enc(NEEDLE.format(key=key)), enc(QUESTION), enc(ANSWER.format(key=key))


def min_length(tokenizer, digits: int = DIGITS) -> int:
    """Shortest context length (tokens, answer included) a prompt can have: no filler at all."""
    n, q, a = prompt_parts(tokenizer, "0" * digits)
    return len(n) + len(q) + len(a)


def passkey_prompt(filler: Tensor, tokenizer, length: int, depth: float, key: str,
                   offset: int) -> tuple[Tensor, int]:
    """A prompt of exactly `length` tokens: filler with the needle at `depth`, question, answer.

    Filler tokens are taken from `filler` starting at `offset` (wrapping). Returns the int64
    tokens [length] and the index where the answer tokens start (they run to the end).
    """
    needle, question, answer = prompt_parts(tokenizer, key)
    n_fill = length - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"context length {length} is shorter than the bare prompt "
                         f"({length - n_fill} tokens)")
    idx = (offset + torch.arange(n_fill)) % len(filler)
    fill = filler[idx]
    cut = int(round(depth * n_fill))
    tokens = torch.cat([fill[:cut], needle, fill[cut:], question, answer])
    return tokens, length - len(answer)
