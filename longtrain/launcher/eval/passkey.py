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

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

NEEDLE = "\nThe pass key is {key}. Remember it.\n"
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


_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz     "))


def _repeated_random(docs: Sequence[str], rng: np.random.Generator, n_chars: int) -> str:
    """8-32 random letters and spaces (no digits), repeated to `n_chars` characters.

    Nothing but copying predicts the repeats, so these documents grow a copy (induction)
    circuit quickly; the circuit then serves retrieval."""
    if n_chars <= 0:
        return ""
    snippet = "".join(rng.choice(_LETTERS, int(rng.integers(8, 33))))
    return (snippet * (n_chars // len(snippet) + 1))[:n_chars]


_DRILL = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))

def _copy_drill(rng: np.random.Generator, n_chars: int | None = None) -> str:
    """3-8 random words of 1-6 letters/digits, repeated: "k7 fxm 3a|k7 fxm 3a|k7 fxm 3a\n" (three
    times), or repeated and cut to exactly `n_chars` characters."""
    words = ["".join(rng.choice(_DRILL, int(rng.integers(1, 7)))) for _ in range(int(rng.integers(3, 9)))]
    line = " ".join(words)
    if n_chars is None:
        return "|".join([line] * 3) + "\n"
    return ("|".join([line] * (n_chars // (len(line) + 1) + 2)))[:n_chars]


FILLER_KINDS = {"corpus": _filler_text, "snippet": _repeated_snippet, "random": _repeated_random}


def passkey_document(filler: str, key: str, depth: float) -> str:
    """One training document: filler with the needle at `depth` (0..1), then question and answer."""
    cut = int(round(depth * len(filler)))
    return filler[:cut] + NEEDLE.format(key=key) + filler[cut:] + QUESTION + ANSWER.format(key=key) + ".\n"


def mix_passkey_documents(docs: Sequence[str], fraction: float, *, seed: int = 0, seq_len: int = 256,
                          digits: int = DIGITS, min_chars: int | None = None,
                          max_chars: int | None = None,
                          filler_mix: dict[str, float] | None = None, copy_share: float = 0.8,
                          align: bool = False, short_share: float = 0.0,
                          short_max: int = 128, depth_power: float = 2.0,
                          near_share: float = 0.0) -> list[str]:
    """`docs` plus synthetic passkey documents making up about `fraction` of all characters.

    align=True: every returned document is exactly seq_len - 1 characters long
    (corpus documents are cut into such pieces, the remainder dropped), so with a byte
    tokenizer a document and its EOS fill exactly one packed sample and no passkey document
    is ever split between samples: every needle-to-question distance up to the trained
    length is seen whole. (Other tokenizers: lengths in tokens differ; nothing breaks, some
    documents straddle samples.) align=False: corpus documents are kept and synthetic ones
    are between `min_chars` (default: the bare prompt + 8) and `max_chars` (default
    seq_len - 1) characters long. The needle's depth is u^depth_power for u uniform in [0, 1]
    (default 2: more needles early, far from the question; 1: uniform depths); for a share
    `near_share` of the passkey documents it is 1 - u^depth_power instead (needles close to the
    question: at long lengths a short needle-to-answer distance is the case where copying a
    repeated digit goes wrong). fraction = 1 replaces `docs` by as many characters of synthetic
    documents.

    Filler kinds, drawn per document with weights `filler_mix` (default: half "snippet",
    half "random"): "corpus" running text from `docs`; "snippet" a 16-64 character piece
    of `docs` repeated (the classic passkey haystack repeats one block); "random" 8-32
    random letters repeated. Repeats are copy events: they teach a small model to copy
    (an induction circuit) within about a thousand steps, and copying is what retrieval
    needs (learning it from the answer digits alone takes far longer).

    A share `copy_share` of the synthetic documents are copy drills instead: 3-8 random
    words of letters and digits written again and again ("k7 fxm 3a|k7 fxm 3a|..."; three
    times when not aligned). After a space the next token is ambiguous from the space alone,
    so copying it takes the preceding letters too: the prefix matching that the first answer
    digit after "The pass key is " needs. Without these drills a tiny model copies the later
    digits but not the first one, and does not retrieve at all within minutes.
    A share `short_share` of the passkey documents are short (from the bare prompt + 8 up to
    `short_max` characters, default 128 = the passkey-cpu base length; `min_chars` does not apply
    to them), lengths drawn as for seq_len = short_max. They keep the short-context skill while a
    model is continue-tuned to a long seq_len (context extension: recipes/passkey-extend-cpu.toml
    sets data.passkey_options = {short_share = ..., min_chars = ..., copy_share = ...}).
    Deterministic in `seed`.
    """
    _check_mix_args(docs, fraction, depth_power, short_share, near_share)
    fixed = len(NEEDLE.format(key="0" * digits)) + len(QUESTION) + len(ANSWER.format(key="0" * digits)) + 2
    docs, lo, hi = _document_lengths(docs, fixed, seq_len, align, min_chars, max_chars)
    if not 0 <= copy_share < 1:
        raise ValueError(f"copy_share must be in [0, 1), got {copy_share}")
    total = sum(len(d) for d in docs)
    target = total if fraction >= 1 else fraction / (1 - fraction) * total
    kinds, weights = _filler_weights(filler_mix)
    draw_length = _length_sampler(lo, hi, fixed, seq_len, align, short_share, short_max)
    rng = np.random.default_rng([seed, 0x9A55])
    out: list[str] = []
    made = 0
    while made < target:
        if rng.random() < copy_share:
            out.append(_copy_drill(rng, seq_len - 1 if align else None))
        else:
            length = draw_length(rng)
            key = random_key(rng, digits)
            make = FILLER_KINDS[kinds[int(rng.choice(len(kinds), p=weights))]]
            filler = make(docs, rng, length - fixed)
            depth = float(rng.random()) ** depth_power  # u^2 puts more needles early: far retrieval is the hard part
            if near_share > 0 and rng.random() < near_share:  # no draw at 0: the document stream stays as it was
                depth = 1.0 - depth
            out.append(passkey_document(filler, key, depth))
        made += len(out[-1])
    return out if fraction >= 1 else list(docs) + out


def _check_mix_args(docs: Sequence[str], fraction: float, depth_power: float, short_share: float,
                    near_share: float) -> None:
    if depth_power <= 0:
        raise ValueError(f"depth_power must be > 0, got {depth_power}")
    if not 0 <= short_share <= 1:
        raise ValueError(f"short_share must be in [0, 1], got {short_share}")
    if not 0 <= near_share <= 1:
        raise ValueError(f"near_share must be in [0, 1], got {near_share}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not docs:
        raise ValueError("passkey documents need filler text: the corpus is empty")


def _document_lengths(docs: Sequence[str], fixed: int, seq_len: int, align: bool, min_chars: int | None,
                      max_chars: int | None) -> tuple[Sequence[str], int, int]:
    """(docs, lo, hi): the corpus (cut into seq_len - 1 character pieces when aligned) and the range of
    synthetic document lengths; `fixed` is the characters of needle, question and answer."""
    n_align = seq_len - 1
    if align:
        if n_align < fixed + 8:
            raise ValueError(f"seq_len {seq_len} is too short for passkey documents (need >= {fixed + 9})")
        pieces = [d[i:i + n_align] for d in docs for i in range(0, len(d) - n_align + 1, n_align)]
        docs = pieces or list(docs)
        lo = hi = n_align
    else:
        hi = max_chars if max_chars is not None else max(seq_len - 1, fixed + 16)
        lo = min_chars if min_chars is not None else min(hi, fixed + 8)
    if lo < fixed or hi < lo:
        raise ValueError(f"passkey documents need {fixed} <= min_chars <= max_chars, got {lo}, {hi}")
    return docs, lo, hi


def _filler_weights(filler_mix: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    """The filler kinds (sorted) and their normalised weights (default: half snippet, half random)."""
    mix = filler_mix if filler_mix is not None else {"snippet": 0.5, "random": 0.5}
    unknown = set(mix) - set(FILLER_KINDS)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"filler_mix needs non-negative weights over {sorted(FILLER_KINDS)}, got {mix}")
    kinds = sorted(mix)
    weights = np.array([mix[k] for k in kinds], dtype=np.float64)
    weights /= weights.sum()
    return kinds, weights


def _length_sampler(lo: int, hi: int, fixed: int, seq_len: int, align: bool, short_share: float,
                    short_max: int) -> Callable[[np.random.Generator], int]:
    """draw(rng): the length of the next passkey document, short (a share `short_share`) or not."""
    # Packing splits a document of n tokens at a sample boundary with probability ~ n / seq_len,
    # so long documents are seen whole less often; drawing n with density ~ 1 / (seq_len - n + 8)
    # keeps the whole ones about evenly spread over lengths (needle distances up to seq_len).
    lengths = np.arange(lo, hi + 1)
    length_p = 1.0 / (np.maximum(seq_len - lengths, 0) + 8.0) if not align else np.ones(len(lengths))
    length_p /= length_p.sum()
    short_lo = min(lo, fixed + 8)
    short_hi = min(hi, short_max)
    if short_share > 0 and short_hi < short_lo:
        raise ValueError(f"short_max {short_max} is shorter than the shortest passkey document ({short_lo})")
    short_lengths = np.arange(short_lo, short_hi + 1)
    short_p = 1.0 / (np.maximum(short_hi + 1 - short_lengths, 0) + 8.0)
    short_p /= short_p.sum()

    def draw(rng: np.random.Generator) -> int:
        if short_share > 0 and rng.random() < short_share:
            return int(rng.choice(short_lengths, p=short_p))
        return int(rng.choice(lengths, p=length_p))

    return draw


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
    enc = lambda s: torch.as_tensor(np.asarray(tokenizer.encode(s), dtype=np.int64))
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


FILLERS = ("repeat", "corpus")


def eval_prompt(filler: Tensor, tokenizer, length: int, depth: float, seed: Sequence[int],
                mode: str = "repeat") -> tuple[Tensor, int, str]:
    """The evaluation prompt for one sample; all randomness comes from `seed` (e.g. [seed, L, depth, i]).

    mode "repeat": the haystack is one snippet of 16-64 filler tokens repeated (the classic
    passkey test repeats one fixed block of sentences); "corpus": running corpus text.
    Returns (tokens [length], answer start, key).
    """
    if mode not in FILLERS:
        raise ValueError(f"filler mode must be one of {FILLERS}, got {mode!r}")
    rng = np.random.default_rng(list(seed))
    key = random_key(rng)
    start = int(rng.integers(len(filler)))
    if mode == "repeat":
        n = int(rng.integers(16, 65))
        snippet = filler[(start + torch.arange(n)) % len(filler)]
        tokens, a = passkey_prompt(snippet, tokenizer, length, depth, key, offset=0)
    else:
        tokens, a = passkey_prompt(filler, tokenizer, length, depth, key, offset=start)
    return tokens, a, key
