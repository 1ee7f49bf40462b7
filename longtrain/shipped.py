"""Files that ship with longtrain: the recipes and the sbatch templates.

They live at the top of the repository (recipes/, slurm/) and are built into the wheel as
longtrain/recipes and longtrain/slurm_templates (pyproject.toml). This finds them in an
installed wheel, an editable install, or a plain checkout on PYTHONPATH.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

_PACKAGES = {"recipes": "longtrain.recipes", "slurm": "longtrain.slurm_templates"}


def shipped_dir(kind: str) -> Path:
    """Folder of the shipped `kind` ("recipes" | "slurm")."""
    try:
        spec = importlib.util.find_spec(_PACKAGES[kind])
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if Path(loc).is_dir():
                return Path(loc)
    return Path(__file__).resolve().parents[1] / kind  # a checkout without installation


def recipe_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir("recipes").glob("*.toml"))


def recipe_description(path: Path) -> str:
    """First sentence of the recipe's leading comment (what `longtrain recipes` lists)."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line.startswith("#") or not line.lstrip("#").strip():
            if words or not line.startswith("#"):
                break
            continue
        words.append(line.lstrip("#").strip())
    text = " ".join(words)
    end = text.find(". ")
    return text[:end + 1] if end >= 0 else text


def shipped_recipe(name: str) -> Path | None:
    """The shipped recipe called `name` (with or without .toml), or None."""
    stem = name[:-5] if name.endswith(".toml") else name
    p = shipped_dir("recipes") / f"{stem}.toml"
    return p if p.is_file() else None


def closest_recipes(name: str, n: int = 3) -> list[str]:
    """The `n` shipped recipe names most like `name`, best first."""
    stem = Path(name).stem.lower()
    return sorted(recipe_names(), key=lambda x: -difflib.SequenceMatcher(None, stem, x).ratio())[:n]
