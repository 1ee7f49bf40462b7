"""Documents -> tokens -> packed sequences that remember document boundaries.

Sources: the embedded default corpus `stdlib` (the running interpreter's
standard-library .py files, present on every machine) or local text / json /
parquet files read with Hugging Face `datasets` (offline). Tokenizers:
byte-level (no download) or any `tokenizer.json` via `tokenizers`.

Training never holds documents: sources are tokenized once into prepared folders
(launcher/prepare.py) and read through memory maps (launcher/corpus.py, which also
states the sampling rule that exact resume depends on).
"""

from __future__ import annotations

import glob
import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from longtrain.errors import DataError
from longtrain.kernels.documents import DocBounds

log = logging.getLogger("longtrain")


# ---- tokenizers -------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS=256, EOS=257, PAD=258."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json (e.g. from a Hugging Face LLaMA folder)."""

    _EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|eot_id|>")

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer file not found: {p}")
        try:
            self.tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"cannot read tokenizer {p}: {e}") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for n in self._EOS_NAMES if (i := self.tok.token_to_id(n)) is not None), None)
        self.bos_id = next((i for n in ("<|begin_of_text|>", "<s>", "<bos>") if (i := self.tok.token_to_id(n)) is not None), None)
        self.pad_id = self.eos_id if self.eos_id is not None else 0

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))


def build_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if spec == "bytes" else HFTokenizer(spec)


# ---- documents --------------------------------------------------------------------------------

def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files)


def _local_files(source: str) -> list[str]:
    files: list[str] = []
    for part in source.split(","):
        part = part.strip()
        p = Path(part)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(str(p))
        else:
            files += sorted(glob.glob(part, recursive=True))
    if not files:
        raise DataError(f"data source {source!r} matched no files")
    return files


def _format_of(files: Sequence[str], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = {Path(f).suffix.lower() for f in files}
    if ext <= {".json", ".jsonl"}:
        return "json"
    if ext <= {".parquet"}:
        return "parquet"
    return "text"


def load_documents(source: str, fmt: str = "auto", text_field: str = "text",
                   max_documents: int = 0) -> list[str]:
    """Documents as strings. `stdlib` reads files directly; local files go through `datasets` offline;
    a prepared folder is decoded with its own tokenizer (EOS dropped)."""
    from longtrain.launcher.prepare import PreparedFolder, is_prepared

    if source != "stdlib" and is_prepared(source):
        folder = PreparedFolder(source)
        tok = build_tokenizer(folder.tokenizer_spec)
        eos = getattr(tok, "eos_id", None)
        n = min(max_documents or folder.n_documents, folder.n_documents)
        docs = [folder.document(d) for d in range(n)]
        return [tok.decode([int(t) for t in (d[:-1] if eos is not None and len(d) and d[-1] == eos else d)])
                for d in docs]
    if source == "stdlib":
        files = stdlib_files()
        if max_documents:
            files = files[:max_documents]
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    files = _local_files(source)
    fmt = _format_of(files, fmt)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if fmt == "text":
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
        else:
            ds = datasets.load_dataset(fmt, data_files=files, split="train")
    except Exception as e:  # datasets raises many types; report the first line
        raise DataError(f"cannot read {fmt} data from {source!r}: {str(e).splitlines()[0]}") from None
    field = "text" if fmt == "text" else text_field
    if field not in ds.column_names:
        raise DataError(f"data files have no column {field!r} (columns: {', '.join(ds.column_names)}); "
                        "set data.text_field")
    if max_documents:
        ds = ds.select(range(min(max_documents, len(ds))))
    return [str(t) for t in ds[field]]


# ---- packing ----------------------------------------------------------------------------------

@dataclass
class Sample:
    tokens: Tensor  # [S] input ids
    labels: Tensor  # [S] next-token targets
    doc_starts: Tensor  # starts of documents inside the sample (always includes 0), ascending


def collate(samples: Sequence[Sample], document_mask: bool) -> dict[str, Tensor | DocBounds | None]:
    """Stack samples into tokens/labels [B,S] and positions.

    With document_mask the rows are joined into one row [1, B*S] whose `cu_seqlens` marks every
    document (and row) boundary and whose positions restart at 0 in each document; this is exact
    for attention that honours cu_seqlens and lets one boundary list serve the whole micro-batch.
    `cu_seqlens` is host data (a DocBounds of Python ints), computed here once per micro-batch:
    attention plans with it and copies it to the device at most once, so no layer syncs.
    """
    tokens = torch.stack([s.tokens for s in samples])
    labels = torch.stack([s.labels for s in samples])
    S = tokens.shape[1]
    if not document_mask:
        return {"tokens": tokens, "labels": labels, "positions": torch.arange(S), "cu_seqlens": None}
    starts = np.concatenate([np.asarray(s.doc_starts, dtype=np.int64) + r * S for r, s in enumerate(samples)])
    cu = np.append(np.unique(starts), len(samples) * S)
    seg = np.searchsorted(cu[1:], np.arange(len(samples) * S), side="right")
    positions = torch.from_numpy(np.arange(len(samples) * S) - cu[seg])
    return {"tokens": tokens.reshape(1, -1), "labels": labels.reshape(1, -1), "positions": positions,
            "cu_seqlens": DocBounds(cu.tolist())}
