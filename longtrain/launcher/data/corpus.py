"""Training samples read from prepared (memory-mapped) token folders: one source or a weighted mixture.

Sampling rule (resume and reshard depend on it): a source's documents, in a seeded order,
form one token stream cut into samples of seq_len+1 tokens; a seeded permutation per epoch
fixes the source's sample order. Sources are blended by a fixed deterministic schedule, so
the whole run has ONE global order of samples, and the trainer's data position is the number
of samples consumed globally. Step t with global batch G takes samples [P, P+G), micro-batch m
on dp rank d taking P + (m*dp + d)*micro_batch + [0, micro_batch). A resume at any world size
continues the same global order from P.

Nothing here allocates in proportion to the corpus' tokens: tokens stay in the page cache
(numpy.memmap); per-document arrays (order, stream starts) are 8 bytes per document and the
per-epoch sample permutation 8 bytes per sample.

Blend: source k of normalized weight w_k emits its j-th sample at time (j + 0.5) / w_k; the
global order is all emissions sorted by (time, k). After n samples each source has drawn
w_k * n to within 0.5 + w_k (K - 2) / 2 samples (within 1 for two sources), at every prefix.
A source with `max_epochs` stops emitting after that many passes and the others fill in."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from longtrain.errors import DataError
from longtrain.launcher.data.batches import Sample
from longtrain.launcher.data.prepare import cache_key, cache_lock, cache_root, prepare, prepare_texts
from longtrain.launcher.data.prepared import is_prepared, looks_prepared, PreparedFolder, read_meta
from longtrain.launcher.data.tokenizers import tokenizer_fingerprint


log = logging.getLogger("longtrain")


@dataclass
class SourceOptions:
    """Per-source sampling options ([[data.sources]] keys besides path)."""

    name: str = "data"
    weight: float = 1.0
    max_epochs: float = 0.0  # 0 = unlimited passes over the source
    min_doc_tokens: int = 0  # drop shorter documents (0 = keep all)
    max_doc_tokens: int = 0  # drop longer documents (0 = keep all)
    long_doc_tokens: int = 0  # documents at least this long are "long"
    long_doc_upsample: float = 1.0  # draw long documents this many times as often (fractional: seeded)


class SourceStream:
    """One source (one or more prepared folders, documents concatenated) as a stream of samples."""

    def __init__(self, folders: Sequence[PreparedFolder], seq_len: int, seed: int = 0, shuffle: bool = True,
                 options: SourceOptions | None = None, index: int = 0) -> None:
        if not folders:
            raise DataError("a data source needs at least one prepared folder")
        self.folders, self.seq_len, self.seed, self.shuffle = list(folders), seq_len, seed, shuffle
        self.options = o = options or SourceOptions()
        self.index = index
        counts = np.array([f.n_documents for f in self.folders], dtype=np.int64)
        self._folder_first = np.concatenate([[0], np.cumsum(counts)])
        lengths = np.concatenate([np.diff(np.asarray(f.offsets)) for f in self.folders])
        self.doc_lengths = lengths
        reps = np.ones(len(lengths), dtype=np.int64)
        if o.min_doc_tokens:
            reps[lengths < o.min_doc_tokens] = 0
        if o.max_doc_tokens:
            reps[lengths > o.max_doc_tokens] = 0
        if o.long_doc_tokens and o.long_doc_upsample != 1.0:
            long = (lengths >= o.long_doc_tokens) & (reps > 0)
            whole, frac = int(math.floor(o.long_doc_upsample)), o.long_doc_upsample % 1.0
            extra = np.random.default_rng([seed, index, 0x10C]).random(len(lengths)) < frac
            reps[long] = whole + extra[long]
        # the same document order as a list of documents shuffled with default_rng(seed) (source 0)
        ids = np.arange(len(lengths)) if (reps == 1).all() else np.repeat(np.arange(len(lengths)), reps)
        rng = np.random.default_rng(seed if index == 0 else [seed, index])
        order = ids[rng.permutation(len(ids))] if shuffle else ids
        order = order[lengths[order] > 0]
        self.order = order
        self.starts = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths[order], out=self.starts[1:])
        self.n_tokens = int(self.starts[-1])
        self.n_documents = len(order)
        self.n_samples = (self.n_tokens - 1) // seq_len if self.n_tokens else 0
        self._perm_cache: dict[int, Tensor] = {}

    def with_seq_len(self, seq_len: int) -> "SourceStream":
        other = object.__new__(SourceStream)
        other.__dict__.update(self.__dict__)
        other.seq_len = seq_len
        other.n_samples = (self.n_tokens - 1) // seq_len if self.n_tokens else 0
        other._perm_cache = {}
        return other

    def _perm(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.n_samples)
        perm = self._perm_cache.get(epoch)
        if perm is None:  # (a dict swap, not an update: the prefetch thread may read it meanwhile)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.index * 1_000_000_007)
            perm = torch.randperm(self.n_samples, generator=g)
            self._perm_cache = {epoch: perm}
        return perm

    def _read(self, a: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [a, a+n) of the stream (int64) and the starts of documents strictly inside (relative)."""
        out = np.empty(n, dtype=np.int64)
        d = int(np.searchsorted(self.starts, a, side="right")) - 1
        pos, inner = a, []
        while pos < a + n:
            g = int(self.order[d])
            f = int(np.searchsorted(self._folder_first, g, side="right")) - 1
            doc = self.folders[f].document(g - int(self._folder_first[f]))
            lo = pos - int(self.starts[d])
            take = min(len(doc) - lo, a + n - pos)
            out[pos - a:pos - a + take] = doc[lo:lo + take]
            pos += take
            d += 1
            if pos < a + n and pos - a < self.seq_len:
                inner.append(pos - a)
        return out, np.asarray(inner, dtype=np.int64)

    def sample(self, j: int) -> Sample:
        """The source's j-th sample (epochs wrap around)."""
        epoch, i = divmod(j, self.n_samples)
        a = int(self._perm(epoch)[i]) * self.seq_len
        window, inner = self._read(a, self.seq_len + 1)
        w = torch.from_numpy(window)
        starts = torch.from_numpy(np.concatenate([[0], inner[inner > 0]]).astype(np.int64))
        return Sample(w[:-1].clone(), w[1:].clone(), starts)


@dataclass
class Blend:
    """The deterministic interleaving of K sources (see the module docstring), computed lazily."""

    weights: np.ndarray
    caps: np.ndarray  # samples each source can give (inf = unlimited)
    src: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    loc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def total(self) -> float:
        return float(self.caps.sum())

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def ensure(self, n: int) -> None:
        with self._lock:
            self._ensure(n)

    def _ensure(self, n: int) -> None:
        if n <= len(self.src):
            return
        if n > self.total:
            raise DataError(f"the data sources are exhausted after {int(self.total):,} samples (max_epochs); "
                            f"sample {n - 1:,} was asked for: raise max_epochs or lower training.steps")
        n = int(min(max(n, 2 * len(self.src), 1024), self.total))
        w = self.weights / self.weights.sum()
        horizon = n + len(w)
        while True:
            m = np.minimum(self.caps, np.ceil(horizon * w + 1)).astype(np.int64)
            times = np.concatenate([(np.arange(mk) + 0.5) / wk for mk, wk in zip(m, w)])
            srcs = np.concatenate([np.full(mk, k, np.int16) for k, mk in enumerate(m)])
            locs = np.concatenate([np.arange(mk, dtype=np.int64) for mk in m])
            keep = times <= horizon
            if keep.sum() >= n:
                break
            horizon *= 2
        times, srcs, locs = times[keep], srcs[keep], locs[keep]
        order = np.lexsort((srcs, times))[:n]
        self.src, self.loc = srcs[order], locs[order]

    def locate(self, i: int) -> tuple[int, int]:
        with self._lock:
            self._ensure(i + 1)
            return int(self.src[i]), int(self.loc[i])

    def counts(self, n: int) -> np.ndarray:
        """Samples drawn from each source among the first n."""
        if n <= 0:
            return np.zeros(len(self.weights), dtype=np.int64)
        with self._lock:
            self._ensure(n)
            return np.bincount(self.src[:n], minlength=len(self.weights)).astype(np.int64)


class Corpus:
    """The global sample order over one or more sources: sample(i), batch(start, count)."""

    def __init__(self, streams: Sequence[SourceStream]) -> None:
        self.streams = list(streams)
        for s in self.streams:
            if s.n_samples < 1:
                raise DataError(f"data source {s.options.name!r} has {s.n_tokens} tokens: too few for one sample "
                                f"of seq_len={s.seq_len}")
        self.seq_len = self.streams[0].seq_len
        weights = np.array([s.options.weight for s in self.streams], dtype=np.float64)
        caps = np.array([s.options.max_epochs * s.n_samples if s.options.max_epochs > 0 else np.inf
                         for s in self.streams], dtype=np.float64)
        caps = np.where(np.isfinite(caps), np.floor(caps), caps)
        self.blend = Blend(weights, caps) if len(self.streams) > 1 or np.isfinite(caps).any() else None

    @property
    def names(self) -> list[str]:
        return [s.options.name for s in self.streams]

    @property
    def n_samples(self) -> int:
        return sum(s.n_samples for s in self.streams)

    @property
    def n_tokens(self) -> int:
        return sum(s.n_tokens for s in self.streams)

    def with_seq_len(self, seq_len: int) -> "Corpus":
        return Corpus([s.with_seq_len(seq_len) for s in self.streams])

    def locate(self, i: int) -> tuple[int, int]:
        """(source, index within that source's order) of global sample i."""
        return (0, i) if self.blend is None else self.blend.locate(i)

    def sample(self, i: int) -> Sample:
        k, j = self.locate(i)
        return self.streams[k].sample(j)

    def batch(self, start: int, count: int) -> list[Sample]:
        return [self.sample(start + i) for i in range(count)]

    def source_counts(self, n: int) -> np.ndarray:
        """Samples drawn from each source among the first n of the global order."""
        if self.blend is None:
            return np.array([n], dtype=np.int64)
        return self.blend.counts(n)


PASSKEY_VERSION = 1  # bump when mix_passkey_documents changes what it generates
RULER_VERSION = 1  # bump when mix_ruler_documents changes what it generates


@dataclass
class _Entry:
    options: SourceOptions
    path: str
    fmt: str = "auto"
    text_field: str = "text"
    folders: list[str] = field(default_factory=list)


def _entries(data: Any) -> list[_Entry]:
    if data.sources:
        return [_Entry(SourceOptions(s.name, s.weight, s.max_epochs, s.min_doc_tokens, s.max_doc_tokens,
                                     s.long_doc_tokens, s.long_doc_upsample), s.path, s.format, s.text_field)
                for s in data.sources]
    return [_Entry(SourceOptions(name=Path(data.source.rstrip("/")).name or "data"), data.source, data.format,
                   data.text_field)]


def corpus_tokenizer(data: Any, requested: str, explicit: bool = True) -> str:
    """The tokenizer spec the corpus is (or will be) tokenized with.

    Prepared folders carry theirs: all must agree, and an `explicit` request must match them.
    Raw sources are tokenized with `requested` (the recipe's tokenizer, init_from's, or bytes).
    """
    wish = requested if explicit else None
    found: dict[str, tuple[str, str]] = {}
    for e in _entries(data):
        if e.path != "stdlib" and (is_prepared(e.path) or looks_prepared(e.path)):
            meta = read_meta(e.path)
            found[e.path] = (meta["tokenizer"]["fingerprint"], PreparedFolder(e.path).tokenizer_spec)
    fps = {fp for fp, _ in found.values()}
    if len(fps) > 1:
        listing = "; ".join(f"{p}: {fp}" for p, (fp, _) in found.items())
        raise DataError(f"the prepared sources were tokenized with different tokenizers ({listing}): prepare them "
                        "with one tokenizer")
    if wish is not None:
        want = tokenizer_fingerprint(wish)
        for p, (fp, _) in found.items():
            if fp != want:
                raise DataError(f"prepared folder {p} was tokenized with another tokenizer ({fp}) than "
                                f"data.tokenizer = {wish} ({want}): prepare it again with that tokenizer, or drop "
                                "data.tokenizer to use the folder's")
        return wish
    if found:
        return next(iter(found.values()))[1]
    return requested


def _raw_folder(e: _Entry, tokenizer: str, cache_dir: str, max_documents: int) -> Path:
    key, _ = cache_key(e.path, tokenizer, e.fmt, e.text_field, max_documents)
    return cache_root(cache_dir) / key


def _synthetic(data: Any) -> bool:
    """Whether synthetic documents (passkey, RULER-style) are mixed into every source."""
    return data.passkey_fraction > 0 or data.ruler_fraction > 0


def _passkey_folder(base: Path, data: Any, seed: int, seq_len: int, cache_dir: str) -> Path:
    opts = json.dumps(data.passkey_options or {}, sort_keys=True)
    tag = f"{base.name}|{data.passkey_fraction}|{seed}|{seq_len}|{opts}|v{PASSKEY_VERSION}"
    if data.ruler_fraction > 0:
        tag += f"|ruler {data.ruler_fraction}|{json.dumps(data.ruler_options or {}, sort_keys=True)}|v{RULER_VERSION}"
    return cache_root(cache_dir) / ("passkey-" + hashlib.sha256(tag.encode()).hexdigest()[:16])


def _make_passkey(base: Path, out: Path, data: Any, seed: int, seq_len: int, tokenizer: str, raw: str | None,
                  fmt: str = "auto", text_field: str = "text") -> None:
    with cache_lock(out):
        if not is_prepared(out):
            _make_passkey_locked(base, out, data, seed, seq_len, tokenizer, raw, fmt, text_field)


def _make_passkey_locked(base: Path, out: Path, data: Any, seed: int, seq_len: int, tokenizer: str,
                         raw: str | None, fmt: str = "auto", text_field: str = "text") -> None:
    from longtrain.launcher.data.sources import load_documents

    docs = load_documents(raw if raw is not None else str(base), fmt, text_field, data.max_documents)
    mixed = mix_synthetic(docs, data, seed, seq_len)
    kinds = " + ".join(k for k, f in (("passkey", data.passkey_fraction), ("RULER-style", data.ruler_fraction)) if f)
    # the whole mixed list (with align=True the corpus documents themselves are cut into pieces)
    prepare_texts(mixed, out, tokenizer, label=f"corpus + {kinds} documents over {base}", fingerprint=out.name,
                  stream=sys.stdout)


def mix_synthetic(docs: list[str], data: Any, seed: int, seq_len: int) -> list[str]:
    """`docs` with the recipe's passkey documents (data.passkey_fraction) and RULER-style documents
    (data.ruler_fraction) mixed in, each a share of the characters of what it is mixed into."""
    mixed = docs
    if data.passkey_fraction > 0:
        from longtrain.launcher.eval.passkey import mix_passkey_documents

        try:
            mixed = mix_passkey_documents(mixed, data.passkey_fraction, seed=seed, seq_len=seq_len,
                                          **(data.passkey_options or {}))
        except (ValueError, TypeError) as e:
            raise DataError(f"data.passkey_fraction / passkey_options: {e}") from None
    if data.ruler_fraction > 0:
        import dataclasses

        from longtrain.launcher.eval.ruler_scoring import RulerOptions
        from longtrain.launcher.eval.ruler_tasks import mix_ruler_documents

        opts = dict(data.ruler_options or {})
        direct = {k: opts.pop(k) for k in ("kinds", "min_chars") if k in opts}
        try:  # the other keys are RulerOptions fields over the compact wording the byte models learn
            options = dataclasses.replace(RulerOptions.compact(), **opts)
            mixed = mix_ruler_documents(mixed, data.ruler_fraction, seed=seed, seq_len=seq_len, options=options,
                                        **direct)
        except (ValueError, TypeError) as e:
            raise DataError(f"data.ruler_fraction / ruler_options: {e}") from None
    return mixed


def build_corpus(data: Any, *, seq_len: int, seed: int, tokenizer: str, local_main: bool,
                 sync: Callable[[str | None], str | None] | None = None) -> tuple[Corpus, list[dict[str, Any]]]:
    """Open (preparing raw sources into the cache first, on `local_main` only) the recipe's data.

    `tokenizer` is the spec from corpus_tokenizer(). `sync(error_or_None)` is called by every rank
    after the local main rank prepared; it returns the first error any rank had (None: all fine),
    so the other ranks wait and then fail with the same message. Returns the corpus and one dict
    per source for the run's records.
    """
    entries = _entries(data)
    todo: list[Callable[[], None]] = []  # what the local main rank prepares, in order
    for e in entries:
        if e.path != "stdlib" and (is_prepared(e.path) or looks_prepared(e.path)):
            e.folders = [e.path]
            continue
        base = _raw_folder(e, tokenizer, data.cache_dir, data.max_documents)
        e.folders = [str(base)]
        if not is_prepared(base) and not _synthetic(data):  # synthetic: the mixed folder replaces it
            todo.append(lambda e=e, base=base: _prepare_raw(e, base, tokenizer, data.max_documents))
    if _synthetic(data):  # into every source of a mixture, each at the same share
        for e in entries:
            base = Path(e.folders[0])
            pk = _passkey_folder(base, data, seed, seq_len, data.cache_dir)
            e.folders = [str(pk)]
            if not is_prepared(pk):
                raw = None if str(base) == e.path else e.path
                todo.append(lambda base=base, pk=pk, raw=raw, e=e: _make_passkey(
                    base, pk, data, seed, seq_len, tokenizer, raw, e.fmt, e.text_field))
    error = None
    if local_main:
        try:
            for step in todo:
                step()
        except DataError as exc:
            error = str(exc)
    if sync is not None:
        error = sync(error)
    if error:
        raise DataError(error)
    streams = [SourceStream([PreparedFolder(f) for f in e.folders], seq_len, seed=seed, shuffle=data.shuffle,
                            options=e.options, index=k) for k, e in enumerate(entries)]
    corpus = Corpus(streams)
    info = [{"name": s.options.name, "path": e.path, "folders": e.folders, "weight": s.options.weight,
             "documents": s.n_documents, "tokens": s.n_tokens, "samples": s.n_samples}
            for s, e in zip(streams, entries)]
    return corpus, info


def _prepare_raw(e: _Entry, out: Path, tokenizer: str, max_documents: int) -> None:
    with cache_lock(out):
        if not is_prepared(out):  # another node sharing the cache may have done it meanwhile
            _prepare_raw_locked(e, out, tokenizer, max_documents)


def _prepare_raw_locked(e: _Entry, out: Path, tokenizer: str, max_documents: int) -> None:
    log.info("data: preparing %s into the cache %s (once; `longtrain prepare` does this ahead of time)", e.path, out)
    prepare([e.path] if e.path == "stdlib" else [s for s in e.path.split(",") if s.strip()], out, tokenizer,
            text_field=e.text_field, fmt=e.fmt, max_documents=max_documents, progress_every=30.0, stream=sys.stdout)
