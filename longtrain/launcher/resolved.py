"""Writing recipes back as TOML: the resolved copy of a run's recipe in its run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from longtrain.launcher.config import Recipe


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Serialize a recipe dict (sections of scalars, lists, inline tables; None omitted)."""
    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items() if v is not None]
                lines.append("")
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def save_resolved(recipe: Recipe, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write the fully resolved recipe (defaults filled in) as TOML; `extra` adds a [resolved] table."""
    data = recipe.to_dict()
    text = f"# resolved recipe (from {recipe.source_path or 'defaults'})\n" + to_toml(data)
    if extra:
        text += "\n# derived values, for reading only\n" + to_toml({"resolved": extra})
    Path(path).write_text(text)
