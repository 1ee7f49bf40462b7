"""`longtrain prepare`: tokenize a corpus once into a folder that every rank memory-maps
(format: data/prepared.py).

It is written into `DIR.tmp-<host>-<pid>` and renamed into place at the end, so an
interrupted prepare never leaves a folder that looks complete (and two nodes preparing
the same cache entry on a shared filesystem cannot tear each other's files).

Reading goes through data/sources.py; tokenizing through `Dataset.map(batched=True,
num_proc=N)` with the fast tokenizer."""

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
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from longtrain.errors import DataError, LongtrainError
from longtrain.launcher.data.prepared import FORMAT, META, OFFSETS, TOKENS, VERSION, is_prepared, read_meta, token_dtype
from longtrain.launcher.data.sources import SourceFiles, first_line, hf_datasets, open_dataset, resolve_sources
from longtrain.launcher.data.tokenizers import TOKENIZER, tokenizer_fingerprint


log = logging.getLogger("longtrain")


_WORKER_TOK: dict[str, Any] = {}


def _encode_batch(batch: dict[str, list], indices: list[int], *, spec: str, field: str, eos: int | None,
                  progress_dir: str) -> dict[str, list]:
    """datasets.map function: texts -> token arrays (+EOS); also bumps this worker's progress file."""
    from longtrain.launcher.data.tokenizers import build_tokenizer

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
        return hf_datasets().Dataset.from_dict({"text": list(texts)}), "text"

    return _prepare(src, out, tokenizer, dataset, num_proc=1, overwrite=False, progress_every=30.0,
                    stream=stream, text_field="text", max_documents=0)


def _prepare(src: SourceFiles, out: str | os.PathLike, tokenizer: str, dataset, *, num_proc: int,
             overwrite: bool, progress_every: float, stream, text_field: str, max_documents: int) -> dict[str, Any]:
    from longtrain.launcher.data.tokenizers import build_tokenizer

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
    datasets = hf_datasets()
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
            msg = first_line(e)
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
