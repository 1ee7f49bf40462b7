"""Recipe parsing, overrides, validation and the resolved copy."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from longtrain.errors import ConfigError
from longtrain.launcher.config import Recipe, load_recipe, recipe_from_dict
from longtrain.launcher.resolved import save_resolved

REPO = Path(__file__).resolve().parents[1]


def test_overrides_and_resolved_roundtrip(tmp_path):
    r = load_recipe(REPO / "recipes" / "tiny-cpu.toml",
                    ["training.lr=1e-3", "model.attention=['full','window:64']", "run.name=x", "data.shuffle=false"])
    assert r.training.lr == 1e-3 and r.model.attention == ["full", "window:64"] and r.run.name == "x"
    assert r.data.shuffle is False
    out = tmp_path / "r.toml"
    save_resolved(r, out, extra={"world_size": 2})
    data = tomllib.loads(out.read_text())
    data.pop("resolved")
    again = recipe_from_dict(data)
    assert again.to_dict() == r.to_dict()


def test_int_accepted_for_float():
    assert recipe_from_dict({"training": {"lr": 1}}).training.lr == 1.0


@pytest.mark.parametrize("data,needle", [
    ({"training": {"stepz": 3}}, "did you mean 'training.steps'"),
    ({"trainng": {}}, "did you mean 'training'"),
    ({"training": {"steps": 1.5}}, "training.steps"),
    ({"training": {"dtype": "fp8"}}, "training.dtype"),
    ({"parallel": {"sp": 0}}, "parallel.sp"),
    ({"model": {"preset": "tinyy"}}, "did you mean 'tiny'"),
    ({"model": {"n_heads": 4, "n_kv_heads": 3}}, "n_kv_heads"),
    ({"model": {"attention": ["full", "window:-3"]}}, "window"),
    ({"model": {"attention": ["full", "sparse"]}}, "unknown kind"),
    ({"model": {"attention": ["full"] * 5}}, "only 4 layers"),
    ({"model": {"attention": ["full"] * 3}}, "does not divide"),
    ({"data": {"seq_len": 10**6}}, "max_seq_len"),
    ({"mesa": {"enabled": True, "bits": 3}}, "mesa.bits"),
])
def test_validation_names_the_key(data, needle):
    with pytest.raises(ConfigError, match=None) as e:
        recipe_from_dict(data)
    assert needle in str(e.value), str(e.value)


def test_docs_cover_every_key():
    """docs/recipes.md must mention every recipe key (keeps the reference true to the code)."""
    text = (REPO / "docs" / "recipes.md").read_text()
    for section in dataclasses.fields(Recipe):
        if section.name == "source_path":
            continue
        assert f"[{section.name}]" in text or f"[[{section.name}]]" in text, section.name
        cls = section.default_factory().__class__ if section.name != "stages" else None
        if cls is None:
            from longtrain.launcher.config import StageSection as cls  # noqa: N813
        for f in dataclasses.fields(cls):
            assert f.name in text, f"{section.name}.{f.name} missing from docs/recipes.md"
