"""`longtrain prepare`: tokenize a corpus once into a folder that every rank memory-maps.

A prepared folder holds
  tokens.bin    every document's tokens (then EOS, when the tokenizer has one), concatenated;
                uint16 when the vocabulary fits, else uint32 (raw, little-endian)
  offsets.npy   int64 [n_documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
  tokenizer.json  a copy of the tokenizer (absent for the byte tokenizer)
  meta.json     format version, dtype, counts, tokenizer and source fingerprints, file sizes

It is written into `DIR.tmp-<host>-<pid>` and renamed into place at the end, so an
interrupted prepare never leaves a folder that looks complete (and two nodes preparing
the same cache entry on a shared filesystem cannot tear each other's files).

Reading (local text/JSONL/parquet files, folders, globs, a saved Hugging Face dataset)
and tokenizing (`Dataset.map(batched=True, num_proc=N)` with the fast tokenizer) go
through Hugging Face `datasets`, offline. The embedded `stdlib` source is read directly.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from longtrain.errors import DataError, LongtrainError

log = logging.getLogger("longtrain")

FORMAT = "longtrain-tokens"
VERSION = 1
TOKENS, OFFSETS, META, TOKENIZER = "tokens.bin", "offsets.npy", "meta.json", "tokenizer.json"


# ---- fingerprints -----------------------------------------------------------------------------

def tokenizer_fingerprint(spec: str) -> str:
    """'bytes-v1' for the byte tokenizer, else the sha256 (16 hex) of the tokenizer.json bytes."""
    if spec == "bytes":
        return "bytes-v1"
    p = Path(spec)
    if p.is_dir():
        p = p / TOKENIZER
    try:
        return "bpe-" + hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise DataError(f"cannot read tokenizer {p}: {e.strerror}") from None


def _files_fingerprint(files: Sequence[str | Path], extra: Sequence[Any] = ()) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(list(extra), default=str).encode())
    return h.hexdigest()[:16]


def is_prepared(path: str | os.PathLike) -> bool:
    """A folder with a meta.json written by `longtrain prepare`."""
    m = Path(path) / META
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def looks_prepared(path: str | os.PathLike) -> bool:
    """A folder that holds (part of) a prepared corpus, complete or not."""
    p = Path(path)
    return p.is_dir() and ((p / TOKENS).exists() or (p / OFFSETS).exists() or (p / META).exists())


# ---- reading sources --------------------------------------------------------------------------

@dataclass
class SourceFiles:
    """What a source spec resolves to: local files of one format, saved HF datasets, or stdlib."""

    spec: str
    files: list[str]
    fmt: str  # text | json | parquet | saved | stdlib
    fingerprint: str


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                           or (p / "state.json").is_file())


def resolve_sources(sources: Sequence[str], fmt: str = "auto", text_field: str = "text",
                    max_documents: int = 0) -> SourceFiles:
    """Expand files/folders/globs (comma-separated too) into one list of one format."""
    from longtrain.launcher.data import stdlib_files, _format_of, _local_files

    spec = ",".join(sources)
    extra = [fmt, text_field, max_documents, VERSION]
    if list(sources) == ["stdlib"]:
        files = [str(f) for f in stdlib_files()]
        if max_documents:
            files = files[:max_documents]
        return SourceFiles(spec, files, "stdlib", _files_fingerprint(files, extra + [sys.version]))
    saved = [s for s in sources if _is_saved_dataset(Path(s))]
    if saved:
        if len(saved) != len(sources):
            raise DataError("a saved Hugging Face dataset folder cannot be prepared together with plain files: "
                            "prepare them separately and mix them with [[data.sources]]")
        files = sorted(str(f) for s in saved for f in Path(s).rglob("*") if f.is_file())
        return SourceFiles(spec, list(saved), "saved", _files_fingerprint(files, extra))
    files: list[str] = []
    for s in sources:
        files += _local_files(s)
    nonempty = [f for f in files if os.path.getsize(f) > 0]  # (datasets fails on an empty JSON file)
    if not nonempty:
        raise DataError(f"{spec}: the source holds no documents ({len(files)} empty file{'s' * (len(files) > 1)})")
    files = nonempty
    if fmt == "auto":
        kinds = {_format_of([f], "auto") for f in files}
        if len(kinds) > 1:
            raise DataError(f"{spec!r} mixes file types ({', '.join(sorted(kinds))}): pass --format, or prepare "
                            "them separately and mix them with [[data.sources]]")
    fmt = _format_of(files, fmt)
    return SourceFiles(spec, files, fmt, _files_fingerprint(files, extra))


def _hf_datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    msg = str(e).strip() or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and "Error" in type(e).__name__ and "generat" in msg.lower():
        msg = str(cause).strip()  # DatasetGenerationError says little; its cause names the row
    return msg.splitlines()[0][:300]


def open_dataset(src: SourceFiles, text_field: str = "text", max_documents: int = 0, cache_dir: str | None = None):
    """A `datasets.Dataset` with one string column, and its name. Unreadable input: DataError naming the file."""
    datasets = _hf_datasets()
    if src.fmt == "stdlib":
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in src.files]
        return datasets.Dataset.from_dict({"text": texts}), "text"
    if src.fmt == "saved":
        parts = []
        for s in src.files:
            try:
                d = datasets.load_from_disk(s)
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds
                raise DataError(f"cannot read saved dataset {s}: {_first_line(e)}") from None
            if isinstance(d, datasets.DatasetDict):
                if "train" not in d:
                    raise DataError(f"saved dataset {s} has splits {list(d)} but no 'train'")
                d = d["train"]
            parts.append(d)
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    else:
        def load(files):
            if src.fmt == "text":
                return datasets.load_dataset("text", data_files=files, sample_by="document", split="train",
                                             cache_dir=cache_dir)
            return datasets.load_dataset(src.fmt, data_files=files, split="train", cache_dir=cache_dir)

        try:
            ds = load(src.files)
        except Exception as e:  # noqa: BLE001 - find the file that fails and name it
            for f in src.files:
                try:
                    load([f])
                except Exception as e1:  # noqa: BLE001
                    raise DataError(f"cannot read {f} as {src.fmt}: {_first_line(e1)}") from None
            raise DataError(f"cannot read {src.fmt} data from {src.spec!r}: {_first_line(e)}") from None
    field = "text" if src.fmt == "text" else text_field
    if field not in ds.column_names:
        raise DataError(f"{src.spec}: no column {field!r} (columns: {', '.join(ds.column_names)}); "
                        "set data.text_field / --text-field")
    if max_documents and src.fmt != "stdlib":
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds, field


# ---- tokenizing in datasets.map workers ---------------------------------------------------------

_WORKER_TOK: dict[str, Any] = {}


def _encode_batch(batch: dict[str, list], indices: list[int], *, spec: str, field: str, eos: int | None,
                  progress_dir: str) -> dict[str, list]:
    """datasets.map function: texts -> token arrays (+EOS); also bumps this worker's progress file."""
    from longtrain.launcher.data import build_tokenizer

    tok = _WORKER_TOK.get(spec)
    if tok is None:
        tok = _WORKER_TOK[spec] = build_tokenizer(spec)
    texts = batch[field]
    for i, t in zip(indices, texts):
        if t is not None and not isinstance(t, str):
            raise DataError(f"row {i}: column {field!r} holds {type(t).__name__}, not text")
    ids = tok.encode_batch(["" if t is None else t for t in texts])
    if eos is not None:
        ids = [np.append(a, eos) for a in ids]
    n_tok = sum(len(a) for a in ids)
    path = os.path.join(progress_dir, str(os.getpid()))
    try:
        done_docs, done_tok = map(int, Path(path).read_text().split())
    except (OSError, ValueError):
        done_docs = done_tok = 0
    Path(path).write_text(f"{done_docs + len(texts)} {done_tok + n_tok}")
    return {"ids": ids}


class _Progress:
    """Rank-0 progress lines while workers tokenize: documents, tokens/s, ETA (every `every` s)."""

    def __init__(self, total_docs: int, progress_dir: str, every: float, out) -> None:
        self.total, self.dir, self.every, self.out = total_docs, progress_dir, every, out
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def counts(self) -> tuple[int, int]:
        docs = tok = 0
        for f in Path(self.dir).iterdir():
            try:
                d, t = map(int, f.read_text().split())
            except (OSError, ValueError):
                continue
            docs, tok = docs + d, tok + t
        return docs, tok

    def line(self, phase: str) -> str:
        docs, tok = self.counts()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - docs) * dt / docs if docs else float("nan")
        pct = 100.0 * docs / max(self.total, 1)
        return (f"prepare: {phase} {docs:,}/{self.total:,} documents ({pct:.0f}%), {tok:,} tokens, "
                f"{tok / dt / 1e6:.2f}M tokens/s, ETA {_fmt_s(eta)}")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line("tokenizing"), file=self.out, flush=True)

    def __enter__(self) -> "_Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _fmt_s(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- writing ------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def prepare(sources: Sequence[str], out: str | os.PathLike, tokenizer: str = "bytes", *, num_proc: int = 1,
            text_field: str = "text", fmt: str = "auto", max_documents: int = 0, overwrite: bool = False,
            progress_every: float = 10.0, stream=None) -> dict[str, Any]:
    """Tokenize `sources` into the prepared folder `out`; returns its meta.json contents.

    The folder appears only when complete (tmp folder + rename). `out` existing: DataError unless
    `overwrite`, or unless it already holds exactly this source and tokenizer (then returned as is).
    """
    src = resolve_sources(list(sources), fmt, text_field, max_documents)
    return _prepare(src, out, tokenizer, lambda tmp: open_dataset(src, text_field, max_documents,
                                                                     cache_dir=str(tmp / "hf-cache")),
                    num_proc=num_proc, overwrite=overwrite, progress_every=progress_every, stream=stream,
                    text_field=text_field, max_documents=max_documents)


def prepare_texts(texts: Sequence[str], out: str | os.PathLike, tokenizer: str, *, label: str,
                  fingerprint: str, stream=None) -> dict[str, Any]:
    """Prepare documents held in memory (e.g. synthetic passkey documents) into `out`."""
    src = SourceFiles(label, [], "memory", fingerprint)

    def dataset(tmp: Path):
        return _hf_datasets().Dataset.from_dict({"text": list(texts)}), "text"

    return _prepare(src, out, tokenizer, dataset, num_proc=1, overwrite=False, progress_every=30.0,
                    stream=stream, text_field="text", max_documents=0)


def _prepare(src: SourceFiles, out: str | os.PathLike, tokenizer: str, dataset, *, num_proc: int,
             overwrite: bool, progress_every: float, stream, text_field: str, max_documents: int) -> dict[str, Any]:
    from longtrain.launcher.data import build_tokenizer

    stream = stream if stream is not None else sys.stderr
    out = Path(out)
    t0 = time.perf_counter()
    tok = build_tokenizer(tokenizer)
    tok_fp = tokenizer_fingerprint(tokenizer)
    if out.exists():
        if is_prepared(out) and not overwrite:
            meta = read_meta(out)
            if meta["source"]["fingerprint"] == src.fingerprint and meta["tokenizer"]["fingerprint"] == tok_fp:
                print(f"prepare: {out} is already prepared from this source and tokenizer", file=stream)
                return meta
        if not overwrite:
            raise DataError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_tmp(out)
    try:
        ds, field = dataset(tmp)
        meta = _write(ds, field, src, tok, tokenizer, tok_fp, tmp, num_proc=num_proc, text_field=text_field,
                      max_documents=max_documents, progress_every=progress_every, stream=stream, t0=t0)
        del ds
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"prepare: wrote {out}: {meta['n_documents']:,} documents, {meta['n_tokens']:,} tokens "
          f"({meta['dtype']}) in {meta['seconds']:.1f}s", file=stream, flush=True)
    return meta


def _publish(tmp: Path, out: Path) -> None:
    """Move the complete tmp folder into place; an existing `out` goes only once the new one is there."""
    if out.exists():
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, out)
    except OSError:
        if not is_prepared(out):  # someone else published a complete folder meanwhile: keep theirs
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _write(ds, field: str, src: SourceFiles, tok, spec: str, tok_fp: str, tmp: Path, *, num_proc: int,
           text_field: str, max_documents: int, progress_every: float, stream, t0: float) -> dict[str, Any]:
    datasets = _hf_datasets()
    n_docs = len(ds)
    if n_docs == 0:
        raise DataError(f"{src.spec}: the source holds no documents")
    dtype = token_dtype(tok.vocab_size)
    eos = getattr(tok, "eos_id", None)
    prog_dir = tmp / "progress"
    prog_dir.mkdir()
    (tmp / "hf-cache").mkdir(exist_ok=True)
    if spec != "bytes":
        shutil.copyfile(Path(spec) / TOKENIZER if Path(spec).is_dir() else spec, tmp / TOKENIZER)
    # one process per worker does the tokenizing; the Rust tokenizer's own threads would fight them
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    feats = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name))})
    kw = dict(spec=spec, field=field, eos=eos, progress_dir=str(prog_dir))
    with _Progress(n_docs, str(prog_dir), progress_every, stream) as prog:
        try:
            mapped = ds.map(_encode_batch, batched=True, batch_size=1000, with_indices=True, fn_kwargs=kw,
                            num_proc=num_proc if num_proc > 1 and n_docs >= 2 * num_proc else None,
                            remove_columns=ds.column_names, features=feats,
                            cache_file_name=str(tmp / "hf-cache" / "tokens.arrow"), desc=None)
        except LongtrainError:
            raise
        except Exception as e:  # noqa: BLE001 - a worker's DataError arrives wrapped
            msg = _first_line(e)
            raise DataError(f"{src.spec}: {msg}") from None
    tokenize_s = time.perf_counter() - prog.t0
    lengths = np.empty(n_docs, dtype=np.int64)
    n_tok, row = 0, 0
    with open(tmp / TOKENS, "wb") as f:
        for table in mapped.with_format("arrow").iter(batch_size=65536):
            col = table.column("ids").combine_chunks()
            offs = col.offsets.to_numpy()
            vals = col.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            f.write(vals[offs[0]:offs[-1]].tobytes())
            k = len(offs) - 1
            lengths[row:row + k] = np.diff(offs)
            row += k
            n_tok += int(offs[-1] - offs[0])
    del mapped
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(tmp / OFFSETS, offsets)
    shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
    shutil.rmtree(prog_dir, ignore_errors=True)
    if n_tok == 0:
        raise DataError(f"{src.spec}: the source's documents hold no text")
    seconds = time.perf_counter() - t0
    meta = {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name,
        "n_tokens": n_tok, "n_documents": n_docs, "empty_documents": int((lengths == 0).sum()),
        "tokenizer": {"spec": spec, "fingerprint": tok_fp, "vocab_size": int(tok.vocab_size),
                      "eos_id": eos, "bos_id": getattr(tok, "bos_id", None),
                      "file": TOKENIZER if spec != "bytes" else None},
        "source": {"spec": src.spec, "format": src.fmt, "fingerprint": src.fingerprint, "files": len(src.files),
                   "text_field": text_field, "max_documents": max_documents},
        "files": {TOKENS: (tmp / TOKENS).stat().st_size, OFFSETS: (tmp / OFFSETS).stat().st_size},
        "seconds": round(seconds, 3), "tokenize_seconds": round(tokenize_s, 3), "num_proc": num_proc,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ---- opening --------------------------------------------------------------------------------------

def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    p = Path(folder)
    m = p / META
    if not m.is_file():
        why = ("an interrupted `longtrain prepare`, or not a prepared folder" if looks_prepared(p)
               else "not a prepared folder")
        raise DataError(f"{p}: no {META} ({why}); run `longtrain prepare SOURCE --out {p}`")
    try:
        meta = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{m}: unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{m}: not written by `longtrain prepare` (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{p}: prepared with format version {meta.get('version')}, this longtrain reads "
                        f"{VERSION}: prepare it again")
    return meta


class PreparedFolder:
    """Read-only, memory-mapped view of a prepared folder: tokens and document offsets."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder)
        self.meta = read_meta(self.path)
        dtype = np.dtype(self.meta["dtype"])
        tok_file = self.path / TOKENS
        want = self.meta["n_tokens"] * dtype.itemsize
        size = tok_file.stat().st_size if tok_file.is_file() else -1
        if size != want:
            what = "missing" if size < 0 else f"{size:,} bytes, {META} says {want:,}"
            raise DataError(f"{tok_file}: token file is {'truncated' if 0 <= size < want else 'damaged'} ({what}); "
                            "prepare the folder again")
        try:
            self.offsets = np.load(self.path / OFFSETS, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path / OFFSETS}: unreadable ({e}); prepare the folder again") from None
        if self.offsets.shape != (self.meta["n_documents"] + 1,) or int(self.offsets[-1]) != self.meta["n_tokens"]:
            raise DataError(f"{self.path / OFFSETS}: does not match {META} ({self.offsets.shape[0] - 1} documents, "
                            f"{int(self.offsets[-1])} tokens); prepare the folder again")
        self.tokens = np.memmap(tok_file, dtype=dtype, mode="r") if want else np.zeros(0, dtype)

    @property
    def n_documents(self) -> int:
        return int(self.meta["n_documents"])

    @property
    def tokenizer_spec(self) -> str:
        t = self.meta["tokenizer"]
        return str(self.path / t["file"]) if t.get("file") else "bytes"

    def document(self, d: int) -> np.ndarray:
        return self.tokens[int(self.offsets[d]):int(self.offsets[d + 1])]


# ---- the automatic cache for raw sources ----------------------------------------------------------

def cache_root(cache_dir: str = "") -> Path:
    """data.cache_dir, else $LONGTRAIN_CACHE, else ~/.cache/longtrain."""
    root = cache_dir or os.environ.get("LONGTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "longtrain")
    return Path(root) / "prepared"


def cache_key(source: str, tokenizer: str, fmt: str, text_field: str, max_documents: int) -> tuple[str, SourceFiles]:
    src = resolve_sources([s for s in source.split(",") if s.strip()] if source != "stdlib" else ["stdlib"],
                          fmt, text_field, max_documents)
    key = hashlib.sha256(f"{src.fingerprint}|{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:20]
    return key, src


@contextlib.contextmanager
def cache_lock(out: Path):
    """An exclusive lock on one cache entry (flock on a file beside it): when several nodes share the
    cache folder, one prepares and the others wait, then find the entry complete."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: rely on tmp folder + rename alone
            pass
        yield


# ---- CLI ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="longtrain prepare",
        description="Tokenize local text/JSONL/parquet files, folders, globs or a saved Hugging Face dataset once "
                    "into a folder of memory-mapped tokens; train with data.source = \"OUT\".")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="file, folder, glob, saved dataset folder, or stdlib")
    p.add_argument("--out", required=True, help="the prepared folder to write")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizer.json / HF model folder")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--text-field", default="text", help="JSON/parquet column holding the text (default: text)")
    p.add_argument("--format", default="auto", choices=("auto", "text", "json", "parquet"))
    p.add_argument("--max-documents", type=int, default=0, help="keep only the first N documents (0 = all)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    if args.num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {args.num_proc}")
    if args.tokenizer != "bytes" and not Path(args.tokenizer).exists():
        raise DataError(f"tokenizer not found: {args.tokenizer} (use 'bytes' or a tokenizer.json / HF folder)")
    prepare(args.sources, args.out, args.tokenizer, num_proc=args.num_proc, text_field=args.text_field,
            fmt=args.format, max_documents=args.max_documents, overwrite=args.overwrite,
            progress_every=args.progress_every, stream=sys.stdout)
    return 0
