"""RULER-style synthetic long-context tasks, offline: prompt generators, scorers, training documents.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?") tasks that need no download; the haystacks come from local text (`load_documents`).

  niah_single_1    one needle "One of the special magic numbers for {key} is: {value}." in the
                   repeated noise "The grass is green. The sky is blue. ..." (~ passkey retrieval)
  niah_single_2    the same in running text from the local corpus (RULER's "essay" haystack)
  niah_multikey    `needles` needles with different keys in corpus text; one key is asked
  niah_multivalue  `needles` needles with one key and different values; all values are asked
  niah_multiquery  `needles` needles with different keys; all keys are asked at once
  vt               variable tracking: "VAR ABCDE = 12345" then "VAR FGHIJ = VAR ABCDE" ... (`vt_hops`
                   hops) in the noise; the answer is every variable that holds 12345
  cwe              common words extraction: a numbered word list "1. w 2. w ..." where `cwe_words`
                   words appear 30 times and the others 3 times (6 and 1 below 4096 tokens; fewer when
                   that does not fit); the answer is the `cwe_words` most common words
  fwe              frequent words extraction: coded words with Zipf(alpha) counts, the most frequent
                   one being dots "..." (to be ignored); the answer is the next 3 words

Scoring (RULER's scripts/eval/synthetic/constants.py): every task here uses `string_match_all`, the
fraction of reference strings found in the prediction (case-insensitive substring match), i.e.
partial credit, averaged over samples, 0..100. `string_match_part` (100 when any reference is found)
is RULER's metric for its QA tasks, which need downloads and are not built here.

Lengths: a sample of context length L has a prompt of exactly L - B tokens of the model's tokenizer,
B = `answer_budget` (the max_new_tokens the runner generates), so prompt + answer <= L, as RULER's
max_seq_length includes tokens_to_generate. Prompts are assembled in token space from separately
encoded pieces (template, haystack units, needles), like passkey.py; the haystack is sized to fill
the rest exactly (token-cut filler for niah/vt; a binary search over the list size plus a tail of
neutral items for cwe/fwe). Too short a length raises ConfigError.

Templates: "base" = head + haystack + question + answer prefix (RULER's answer prefix, which the
model continues); "chat" = the tokenizer folder's `chat_template` rendered around head + haystack +
question as one user message, then the answer prefix (`ChatTemplate`).

Wordings: "ruler" is RULER's text; "short" (`RulerOptions.compact()`, the default for the byte
tokenizer) asks the same with few words, 5-digit values and 3-letter variables, so tiny CPU models
can learn the tasks (`mix_ruler_documents` writes training documents in the same format). RULER's
few-shot example in cwe/fwe is not included.
"""

from __future__ import annotations

import bisect
import itertools
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from longtrain.errors import ConfigError
from longtrain.launcher.eval.ruler_scoring import (ChatTemplate, METRICS, RulerOptions, TASKS, WORDINGS, answer_budget,
                                                   check_task, completion_text, task_family, worst_answer,
                                                   default_options, load_chat_template, postprocess, score_task,
                                                   string_match_all, string_match_part)


NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
DOTS = "..."

_ADJ = ("red", "blue", "green", "brave", "calm", "dark", "eager", "fair", "glad", "happy", "icy", "jolly", "kind",
        "lazy", "mild", "neat", "odd", "proud", "quick", "rich", "shy", "tall", "vast", "warm", "wild", "young",
        "bold", "cold", "dry", "fast", "gold", "huge", "old", "pale", "pink", "quiet", "rare", "soft", "tiny", "wise")
_NOUN = ("apple", "bear", "cat", "deer", "eagle", "fox", "goat", "hawk", "iris", "jam", "kite", "lamp", "moon",
         "nest", "owl", "pear", "quail", "rose", "star", "tiger", "urn", "vase", "wolf", "yak", "zebra", "boat",
         "cake", "drum", "fig", "gate", "hill", "ink", "jar", "key", "leaf", "mint", "nut", "oak", "pen", "ring",
         "sand", "tree", "van", "wave", "bell", "cup", "dove", "frog", "hat", "lime", "mask", "rope", "seal", "toad")


# ---- scoring ------------------------------------------------------------------------------------

# ---- options, chat template, budgets --------------------------------------------------------------

# ---- sample parts (text) ------------------------------------------------------------------------

@dataclass
class _Parts:
    head: str
    question: str
    prefix: str
    answers: list[str]
    filler: str  # noise | essay | cwe | fwe
    needles: list[str]  # in haystack order (niah / vt)


def _keys(rng: np.random.Generator, n: int, o: RulerOptions) -> list[str]:
    if o.wording == "short":
        return [_NOUN[i] for i in rng.choice(len(_NOUN), n, replace=False)]
    idx = rng.choice(len(_ADJ) * len(_NOUN), n, replace=False)
    return [f"{_ADJ[i // len(_NOUN)]}-{_NOUN[i % len(_NOUN)]}" for i in idx]


def _numbers(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    lo = 10 ** (digits - 1)
    return [str(v) for v in lo + rng.choice(9 * lo, n, replace=False)]


def _names(rng: np.random.Generator, n: int, k: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        s = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, k))
        if s not in out:
            out.append(s)
    return out


def _parts(task: str, rng: np.random.Generator, o: RulerOptions) -> _Parts:
    w = WORDINGS[o.wording]
    fam = task_family(task)
    if fam == "niah":
        n_keys = 1 if task in ("niah_single_1", "niah_single_2", "niah_multivalue") else o.needles
        n_vals = o.needles if task == "niah_multivalue" else n_keys
        keys = _keys(rng, n_keys, o)
        values = _numbers(rng, n_vals, o.digits)
        pairs = [(keys[i % n_keys], v) for i, v in enumerate(values)]
        asked = keys if task == "niah_multiquery" else keys[:1]
        answers = [v for k, v in pairs if k in asked]
        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        order = rng.permutation(len(pairs))
        needles = [w["needle"].format(key=pairs[i][0], value=pairs[i][1]) for i in order]
        return _Parts(w["niah_head"], w["niah_q"].format(query=query), w["niah_a"].format(query=query), answers,
                      "noise" if task == "niah_single_1" else "essay", needles)
    if fam == "vt":
        names = _names(rng, o.vt_chains * (o.vt_hops + 1), o.vt_name_len)
        values = _numbers(rng, o.vt_chains, 5)
        chains = []
        for c in range(o.vt_chains):
            v = names[c * (o.vt_hops + 1):(c + 1) * (o.vt_hops + 1)]
            chains.append([f"VAR {v[0]} = {values[c]}"] + [f"VAR {v[j + 1]} = VAR {v[j]}" for j in range(o.vt_hops)])
        # chains interleave at random, each kept in order
        owner = rng.permutation(np.repeat(np.arange(o.vt_chains), o.vt_hops + 1))
        pos = [0] * o.vt_chains
        needles = []
        for c in owner:
            needles.append(chains[c][pos[c]])
            pos[c] += 1
        return _Parts(w["vt_head"], w["vt_q"].format(query=values[0]),
                      w["vt_a"].format(n=o.vt_hops + 1, query=values[0]), names[:o.vt_hops + 1], "noise", needles)
    n = o.cwe_words if fam == "cwe" else 3
    return _Parts(w[f"{fam}_head"], w[f"{fam}_q"].format(n=n), w[f"{fam}_a"].format(n=n), [], fam, [])


# ---- token-space assembly ----------------------------------------------------------------------

class CharCodec:
    """A 'tokenizer' whose tokens are Unicode code points: prompts sized in characters (training documents)."""

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(map(chr, (int(i) for i in ids)))


class _Enc:
    """Memoized int64 encoding of text pieces."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.memo = tokenizer, {}

    def many(self, texts: Sequence[str]) -> list[np.ndarray]:
        new = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if new:
            for t, ids in zip(new, self.tok.encode_batch(new)):
                self.memo[t] = np.asarray(ids, dtype=np.int64)
        return [self.memo[t] for t in texts]

    def __call__(self, text: str) -> np.ndarray:
        return self.many([text])[0]


def _noise_units() -> Iterator[str]:
    """The noise sentences in turn, each after a space (as the needles: " " + needle)."""
    return (" " + s for s in itertools.cycle(NOISE))


def _essay_units(docs: Sequence[str], rng: np.random.Generator) -> Iterator[str]:
    """Lines (each ending in a newline) from a random line of a random document on, documents in turn."""
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError("RULER haystack: the haystack documents are empty")
    d = int(rng.integers(len(docs)))
    lines = docs[d].splitlines(keepends=True)
    start = int(rng.integers(len(lines)))
    while True:
        for line in lines[start:]:
            yield line if line.endswith("\n") else line + "\n"
        yield "\n"
        d, start = (d + 1) % len(docs), 0
        lines = docs[d].splitlines(keepends=True)


def _stream(units: Iterator[str], enc: _Enc, n: int) -> tuple[np.ndarray, list[int]]:
    """Exactly n tokens of the units in turn (the last one cut) and the offsets where units start (<= n)."""
    parts, starts, total, batch = [], [], 0, 64
    while total < n:
        texts = list(itertools.islice(units, batch))
        if not texts:
            raise AssertionError("RULER filler ran out")  # the callers give more than n tokens
        for ids in enc.many(texts):
            if total >= n:
                break
            starts.append(total)
            parts.append(ids)
            total += len(ids)
        batch = min(batch * 2, 4096)
    toks = np.concatenate(parts)[:n] if parts else np.zeros(0, np.int64)
    return toks, (starts or [0]) + ([n] if total == n else [])


def _zeta(a: float, terms: int = 10000) -> float:
    k = np.arange(1, terms + 1, dtype=np.float64)
    return float((k ** -a).sum() + terms ** (1 - a) / (a - 1))


def _word_pool(docs: Sequence[str], rng: np.random.Generator, n: int) -> list[str]:
    """n distinct lowercase words (3-8 letters): corpus words from a random document on, then made-up ones."""
    seen: dict[str, None] = {}
    if docs:
        d0 = int(rng.integers(len(docs)))
        for j in range(min(len(docs), 200)):
            for wd in re.findall(r"\b[a-z]{3,8}\b", docs[(d0 + j) % len(docs)]):
                seen.setdefault(wd)
            if len(seen) >= 2 * n:
                break
    words = list(seen)
    words = [words[i] for i in rng.permutation(len(words))][:n]
    have = set(words)
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    while len(words) < n:
        syllables = int(rng.integers(2, 4))
        s = "".join(cons[int(rng.integers(len(cons)))] + vow[int(rng.integers(5))] for _ in range(syllables))
        if s not in have:
            have.add(s)
            words.append(s)
    return words


def _cwe_list(n: int, length: int, rng: np.random.Generator, enc: _Enc, docs: Sequence[str],
              o: RulerOptions) -> tuple[np.ndarray, list[str]]:
    """Exactly n tokens "1. w 2. w ..." and its common words; ConfigError when no frequency pair fits."""
    ncw = o.cwe_words
    pool = _word_pool(docs, rng, ncw + max(n // 2, 1) + 64)
    wtok = [len(t) for t in enc.many([" " + w for w in pool])]
    freqs = ([(30, 3)] if length >= 4096 else []) + [(6, 1), (3, 1), (2, 1)]
    for fcw, fucw in freqs:
        m_hi = max(0, min(len(pool) - ncw - 64, (n // 2 - ncw * fcw) // fucw))
        n_items = ncw * fcw + m_hi * fucw + 64
        num = np.concatenate([[0], np.cumsum([len(t) for t in enc.many([f"{'' if i == 0 else ' '}{i + 1}."
                                                                       for i in range(n_items)])])])
        unc = np.concatenate([[0], np.cumsum(wtok[ncw:ncw + m_hi])])
        common = fcw * sum(wtok[:ncw])

        def total(m: int) -> int:
            return int(num[ncw * fcw + m * fucw] + common + fucw * unc[m])

        if m_hi < ncw or total(ncw) > n:
            continue
        lo, hi = ncw, m_hi  # largest m with total(m) <= n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if total(mid) <= n else (lo, mid - 1)
        words = pool[:ncw] * fcw + pool[ncw:ncw + lo] * fucw
        words = [words[i] for i in rng.permutation(len(words))]
        tail = pool[ncw + lo:ncw + lo + 64]  # fresh words, once each, fill the remainder (the last one cut)
        items = [f"{'' if i == 0 else ' '}{i + 1}." for i in range(len(words) + len(tail))]
        seq = [x for i, wd in enumerate(words + tail) for x in (items[i], " " + wd)]
        toks, _ = _stream(iter(seq), enc, n)
        return toks, pool[:ncw]
    raise ConfigError(f"the cwe word list needs more room: {n} tokens cannot hold {ncw} words twice and "
                      f"{ncw} others once; use a longer context")


def _fwe_text(n: int, length: int, rng: np.random.Generator, enc: _Enc,
              o: RulerOptions) -> tuple[np.ndarray, list[str]]:
    """Exactly n tokens of coded words with Zipf counts (rank 1 = dots), and the 3 words after the dots."""
    V = max(length // 50, 8)
    vocab: list[str] = []
    while len(vocab) < V:
        s = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, o.fwe_word_len))
        if s not in vocab:
            vocab.append(s)
    vocab[0] = DOTS
    wtok = np.array([len(t) for t in enc.many([" " + w for w in vocab])])
    zeta, ranks = _zeta(o.fwe_alpha), np.arange(1, V + 1, dtype=np.float64) ** -o.fwe_alpha

    def counts(N: int) -> np.ndarray:
        c = np.floor(N * ranks / zeta).astype(np.int64)
        c[3] = max(c[3], c[4:].max(initial=0) + 1)  # the answers (ranks 2-4) strictly above the rest, in order
        c[2] = max(c[2], c[3] + 1)
        c[1] = max(c[1], c[2] + 1)
        return c

    if int(counts(0) @ wtok) > n:
        raise ConfigError(f"the fwe coded text needs more than {n} tokens; use a longer context")
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(counts(mid) @ wtok) <= n else (lo, mid - 1)
    words = [w for w, c in zip(vocab, counts(lo)) for _ in range(int(c))]
    words = [" " + words[i] for i in rng.permutation(len(words))]
    tail = iter([*words, *([" " + DOTS] * (n + 1))])  # dots (noise, ignored) fill the remainder
    toks, _ = _stream(tail, enc, n)
    return toks, vocab[1:4]


def build_prompt(task: str, tokenizer, n_prompt: int, rng: np.random.Generator, docs: Sequence[str],
                 options: RulerOptions, chat: tuple[str, str] | None = None, length: int | None = None
                 ) -> tuple[np.ndarray, list[str]]:
    """A prompt of exactly `n_prompt` tokens (int64 [n_prompt]) and its reference answers.

    `chat`: (text before, text after) the user message (`ChatTemplate.split`), None = base template.
    `length` (default n_prompt) is the context length the sample is for (cwe/fwe sizes depend on it)."""
    check_task(task)
    if options.wording not in WORDINGS:
        raise ConfigError(f"unknown RULER wording {options.wording!r}; choose from {', '.join(WORDINGS)}")
    enc = _Enc(tokenizer)
    p = _parts(task, rng, options)
    pre, post = chat or ("", "")
    head, tail = enc(pre + p.head), enc(p.question + post + p.prefix)
    sep = (lambda s: " " + s) if p.filler == "noise" else (lambda s: s + "\n")
    needles = enc.many([sep(s) for s in p.needles])
    n_fill = n_prompt - len(head) - len(tail) - sum(len(x) for x in needles)
    if n_fill < (0 if p.filler in ("noise", "essay") else 1):
        raise ConfigError(f"RULER {task}: {n_prompt} prompt tokens are too few (the template and needles "
                          f"alone take {n_prompt - n_fill}); use a longer context")
    answers = p.answers
    if p.filler in ("noise", "essay"):
        units = _noise_units() if p.filler == "noise" else _essay_units(docs, rng)
        fill, starts = _stream(units, enc, n_fill)
        at = sorted(starts[bisect.bisect_right(starts, float(u) * n_fill) - 1] for u in rng.random(len(needles)))
        pieces, prev = [], 0
        for a, nd in zip(at, needles):
            pieces += [fill[prev:a], nd]
            prev = a
        hay = np.concatenate(pieces + [fill[prev:]])
    elif p.filler == "cwe":
        hay, answers = _cwe_list(n_fill, length or n_prompt, rng, enc, docs, options)
    else:
        hay, answers = _fwe_text(n_fill, length or n_prompt, rng, enc, options)
    toks = np.concatenate([head, hay, tail]).astype(np.int64)
    assert len(toks) == n_prompt, (task, len(toks), n_prompt)
    return toks, list(answers)


# ---- samples ------------------------------------------------------------------------------------

@dataclass
class RulerSample:
    """One evaluation prompt: `tokens` int64 [length - max_new_tokens]; prompt + answer budget = length."""

    task: str
    length: int
    index: int
    tokens: np.ndarray
    max_new_tokens: int
    answers: list[str]

    @property
    def answer_text(self) -> str:
        """A correct completion (what the oracle writes)."""
        return completion_text(self.answers)


def sample_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def ruler_samples(task: str, tokenizer, length: int, n: int, *, seed: int, docs: Sequence[str],
                  options: RulerOptions | None = None, chat: ChatTemplate | None = None) -> list[RulerSample]:
    """`n` samples of `task` at context length `length` (tokens); deterministic in (seed, task, length, i)."""
    o = options or default_options(tokenizer)
    budget = answer_budget(task, tokenizer, o)
    split = chat.split() if chat is not None else None
    out = []
    for i in range(n):
        toks, answers = build_prompt(task, tokenizer, length - budget, sample_rng(seed, task, length, i), docs, o,
                                     split, length)
        out.append(RulerSample(task, length, i, toks, budget, answers))
    return out


# ---- training documents -------------------------------------------------------------------------

TRAIN_KINDS = ("niah_multikey", "niah_multivalue", "vt")


def ruler_document(task: str, docs: Sequence[str], n_chars: int, rng: np.random.Generator,
                   options: RulerOptions | None = None) -> str:
    """One training document of about `n_chars` characters (at most): the prompt, its answer, a newline."""
    o = options or RulerOptions.compact()
    codec = CharCodec()
    toks, answers = build_prompt(task, codec, n_chars - len(worst_answer(task, o)) - 1, rng, docs, o)
    return codec.decode(toks) + completion_text(answers) + "\n"


def mix_ruler_documents(docs: Sequence[str], fraction: float, *, seed: int = 0, seq_len: int = 256,
                        kinds: Sequence[str] = TRAIN_KINDS, options: RulerOptions | None = None,
                        min_chars: int | None = None) -> list[str]:
    """`docs` plus RULER-style training documents (question followed by its answer) making up about
    `fraction` of all characters (fraction = 1: as many characters of synthetic documents only).

    Kinds are drawn uniformly from `kinds` (any of TASKS; default multi-key, multi-value and variable
    tracking); each document is at most n characters, n uniform in [`min_chars` (default
    (seq_len - 1) // 2), seq_len - 1], in the wording of `options` (default `RulerOptions.compact()`, which the
    byte tokenizer is evaluated with). Deterministic in `seed`. ValueError on bad arguments."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    bad = [k for k in kinds if k not in TASKS]
    if bad or not kinds:
        raise ValueError(f"kinds must be RULER tasks ({', '.join(TASKS)}), got {list(kinds)}")
    o = options or RulerOptions.compact()
    rng = np.random.default_rng([seed, 0x2A1E])
    total = sum(len(d) for d in docs)
    target = total if fraction >= 1 else fraction / (1 - fraction) * total
    if target <= 0:
        raise ValueError("RULER documents need filler text: the corpus is empty")
    out: list[str] = []
    made = 0
    while made < target:
        kind = kinds[int(rng.integers(len(kinds)))]
        hi = seq_len - 1
        lo = min_chars if min_chars is not None else hi // 2
        n = int(rng.integers(min(lo, hi), hi + 1))
        try:
            doc = ruler_document(kind, docs, n, rng, o)
        except ConfigError as e:
            raise ValueError(f"seq_len {seq_len} is too short for {kind} documents ({e})") from None
        out.append(doc)
        made += len(doc)
    return out if fraction >= 1 else list(docs) + out


__all__ = ["CharCodec", "ChatTemplate", "METRICS", "RulerOptions", "RulerSample", "TASKS", "TRAIN_KINDS",
           "answer_budget", "build_prompt", "default_options", "load_chat_template", "mix_ruler_documents",
           "postprocess", "ruler_document", "ruler_samples", "sample_rng", "score_task", "string_match_all",
           "string_match_part"]
