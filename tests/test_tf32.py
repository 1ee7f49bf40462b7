"""fp32 on CUDA uses TF32 tensor cores unless training.tf32 = false; GPU recipes say bf16 (issue 23, item 6)."""

from __future__ import annotations

import tomllib

import pytest
import torch

from helpers import REPO, TINY
from longtrain.launcher.config import load_recipe
from longtrain.launcher.devices import set_tf32


@pytest.fixture
def tf32_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_default_on_and_switchable():
    assert load_recipe(str(TINY)).training.tf32 is True
    assert load_recipe(str(TINY), ["training.tf32=false"]).training.tf32 is False


def test_set_tf32_only_touches_cuda(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert set_tf32(torch.device("cpu"), True) is False
    assert torch.backends.cuda.matmul.allow_tf32 is False  # CPU runs: nothing changed
    assert set_tf32(torch.device("cuda", 0), True) is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the new API reads the same state
    assert set_tf32(torch.device("cuda", 0), False) is False
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cuda.matmul.fp32_precision == "ieee"


def _gpu_recipes() -> list:
    out = []
    for path in sorted((REPO / "recipes").glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        if "gpu" in path.stem or raw.get("training", {}).get("device") == "cuda":
            out.append((path.name, raw))
    return out


def test_gpu_recipes_state_bf16():
    recipes = _gpu_recipes()
    names = [n for n, _ in recipes]
    assert {"passkey-gpu.toml", "tnl-lightning-1b.toml", "moh-llama3-8b-continue-128k.toml",
            "masformer-1.3b-8k.toml"} <= set(names), names
    for name, raw in recipes:
        assert raw["training"].get("dtype") == "bf16", f"{name}: a GPU recipe states dtype = \"bf16\""
