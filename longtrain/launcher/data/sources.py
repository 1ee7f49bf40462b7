"""The one place documents are read from a source: the embedded `stdlib` corpus (the running
interpreter's standard-library .py files), local text / JSONL / parquet files, folders, globs, a
saved Hugging Face dataset (through `datasets`, offline), or a prepared folder."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Sequence

from longtrain.errors import DataError
from longtrain.launcher.data.prepared import VERSION
from longtrain.launcher.data.tokenizers import build_tokenizer


log = logging.getLogger("longtrain")


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
    """Documents as strings, read as `longtrain prepare` reads them (resolve_sources + open_dataset);
    a prepared folder is decoded with its own tokenizer (EOS dropped)."""
    from longtrain.launcher.data.prepared import is_prepared, PreparedFolder

    if source != "stdlib" and is_prepared(source):
        folder = PreparedFolder(source)
        tok = build_tokenizer(folder.tokenizer_spec)
        eos = getattr(tok, "eos_id", None)
        n = min(max_documents or folder.n_documents, folder.n_documents)
        docs = [folder.document(d) for d in range(n)]
        return [tok.decode([int(t) for t in (d[:-1] if eos is not None and len(d) and d[-1] == eos else d)])
                for d in docs]
    src = resolve_sources([source], fmt, text_field, max_documents)
    ds, field = open_dataset(src, text_field, max_documents)
    return [str(t) for t in ds[field]]


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


def hf_datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    # errors come back to us as exceptions and are reported in one line (DataError); datasets' own
    # logger would print them once more per read attempt ("Failed to read schema ...")
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    logging.getLogger("datasets").propagate = False
    datasets.disable_progress_bars()
    return datasets


def first_line(e: BaseException) -> str:
    while e.__cause__ is not None and not str(e).strip():
        e = e.__cause__
    msg = str(e).strip() or type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip() and "Error" in type(e).__name__ and "generat" in msg.lower():
        msg = str(cause).strip()  # DatasetGenerationError says little; its cause names the row
    return msg.splitlines()[0][:300]


def open_dataset(src: SourceFiles, text_field: str = "text", max_documents: int = 0, cache_dir: str | None = None):
    """A `datasets.Dataset` with one string column, and its name. Unreadable input: DataError naming the file."""
    datasets = hf_datasets()
    if src.fmt == "stdlib":
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in src.files]
        return datasets.Dataset.from_dict({"text": texts}), "text"
    if src.fmt == "saved":
        parts = []
        for s in src.files:
            try:
                d = datasets.load_from_disk(s)
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds
                raise DataError(f"cannot read saved dataset {s}: {first_line(e)}") from None
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
                    raise DataError(f"cannot read {f} as {src.fmt}: {first_line(e1)}") from None
            raise DataError(f"cannot read {src.fmt} data from {src.spec!r}: {first_line(e)}") from None
    field = "text" if src.fmt == "text" else text_field
    if field not in ds.column_names:
        raise DataError(f"{src.spec}: no column {field!r} (columns: {', '.join(ds.column_names)}); "
                        "set data.text_field / --text-field")
    if max_documents and src.fmt != "stdlib":
        ds = ds.select(range(min(max_documents, len(ds))))
    return ds, field


def _files_fingerprint(files: Sequence[str | Path], extra: Sequence[Any] = ()) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(list(extra), default=str).encode())
    return h.hexdigest()[:16]
