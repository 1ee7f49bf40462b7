"""The checkpoint folder's layout, in one place and without torch (the launcher, the checkpointer and
loading all read it here):

  step_00000100/      a complete checkpoint: DCP shards + .metadata + meta.json
  step_00000150.tmp/  a save in progress (or a crashed one: removed at the next start)
  latest              text file naming the newest complete checkpoint (replaced atomically)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

STEP_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"  # the pointer file
DCP_METADATA, META = ".metadata", "meta.json"


def step_name(step: int) -> str:
    """The folder name of the checkpoint of `step`."""
    return f"step_{step:08d}"


def step_of(path: Path) -> int:
    """The step a step_N folder holds (ValueError for another name)."""
    m = STEP_RE.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a step_N folder")
    return int(m.group(1))


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder was published whole: DCP's .metadata and our meta.json are both there
    (the two last files a save writes; check_checkpoint verifies the shards against meta.json)."""
    return (path / DCP_METADATA).is_file() and (path / META).is_file()


def looks_like_checkpoint(path: Path) -> bool:
    """A step folder, complete or not (either file present)."""
    return (path / DCP_METADATA).exists() or (path / META).exists()


def step_folders(root: Path, complete: bool = True) -> list[Path]:
    """The step_N folders under `root` (only complete ones unless `complete=False`), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (is_complete(p) if complete else p.is_dir())]
    return sorted(found, key=step_of)


def newest_complete(root: Path, warn: Callable[[Path], None] | None = None) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete step_N (None: none);
    `warn(path)` is told when `latest` names an incomplete one."""
    pointer = root / LATEST
    if pointer.is_file():
        try:
            p = root / pointer.read_text().strip()
        except OSError:
            p = None
        if p is not None and p != root and is_complete(p):
            return p
        if p is not None and warn is not None:
            warn(p)
    done = step_folders(root)
    return done[-1] if done else None
