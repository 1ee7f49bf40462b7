"""Prepared token folders: the on-disk format, reading it through memory maps, and the cache.

A prepared folder holds
  tokens.bin    every document's tokens (then EOS, when the tokenizer has one), concatenated;
                uint16 when the vocabulary fits, else uint32 (raw, little-endian)
  offsets.npy   int64 [n_documents + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
  tokenizer.json  a copy of the tokenizer (absent for the byte tokenizer)
  meta.json     format version, dtype, counts, tokenizer and source fingerprints, file sizes"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from longtrain.errors import DataError


log = logging.getLogger("longtrain")


FORMAT = "longtrain-tokens"


VERSION = 1


TOKENS, OFFSETS, META = "tokens.bin", "offsets.npy", "meta.json"


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


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


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


