"""Tokenizers: byte-level (no download) or any `tokenizer.json` through `tokenizers`, and their fingerprints."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from longtrain.errors import DataError


log = logging.getLogger("longtrain")

TOKENIZER = "tokenizer.json"  # the tokenizer file inside a prepared folder or HF model folder


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
