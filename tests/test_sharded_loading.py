"""No whole-model copy on any rank: FSDP2 builds the model on the meta device, shards it, and gives
each rank only its own shards — a fresh initialisation equal to the single-process one, an HF folder
read slice by slice equal to `load_hf_checkpoint`, a DCP checkpoint read through DCP — and the host
memory a rank needs while loading a ~200M-parameter model stays far below a whole fp32 copy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY
from longtrain.testing import run_distributed


def _rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _recipe(init_from: str | None, extra: list[str]):
    from longtrain.launcher.config import load_recipe

    sets = ["data.seq_len=64", "training.device=cpu"] + extra
    if init_from:
        sets.append(f"model.init_from={init_from}")
    return load_recipe(TINY, sets)


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in sd.items()}


def _build(rank: int, world: int, init_from: str | None, extra: list[str], want_state: bool):
    from longtrain.launcher.build import build_sharded_model

    recipe = _recipe(init_from, extra)
    base = _rss_anon()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    model = build_sharded_model(recipe, 256, torch.device("cpu"), torch.float32)
    stop.set()
    t.join()
    peak[0] = max(peak[0], _rss_anon())
    local = sum(p.to_local().numel() for p in model.parameters())
    out = {"peak": peak[0] - base, "local_params": local}
    if want_state:
        out["state"] = _full_state(model)
    return out


def _build_cases(rank: int, world: int, cases: dict) -> dict:
    return {name: _build(rank, world, src, extra, True)["state"] for name, (src, extra) in cases.items()}


def _small_hf(path: Path) -> Path:
    from longtrain.models import Transformer, model_config
    from longtrain.models.hf import save_hf_checkpoint

    torch.manual_seed(1)
    m = Transformer(model_config(None, vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                                 max_seq_len=512))
    return save_hf_checkpoint(m, path)


def test_sharded_build_equals_whole_model(tmp_path):
    """World 2: a fresh sharded model equals Transformer.init_weights(seed); an HF folder (also
    converted to MoH, with seeded router weights) equals load_hf_checkpoint, parameter for parameter."""
    from longtrain.launcher.build import build_model
    from longtrain.models.config import MoHConfig
    from longtrain.models.hf import load_hf_checkpoint

    hf = str(_small_hf(tmp_path / "hf"))
    moh = ["model.moh={shared_heads=2, routed_heads=1, router='learned'}"]
    cases = {"scratch": (None, []), "hf": (hf, []), "hf-moh": (hf, moh)}
    states = run_distributed(_build_cases, 2, cases)[0]
    for name, (src, extra) in cases.items():
        got = states[name]
        if src is None:
            ref = build_model(_recipe(None, extra), 256).state_dict()
        else:
            kw = {"moh": MoHConfig(shared_heads=2, routed_heads=1, router="learned")} if extra else {}
            ref = load_hf_checkpoint(hf, router_seed=0, **kw).state_dict()
        assert set(got) == set(ref), name
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, k)


@pytest.mark.timeout(600)
def test_loading_200m_hf_model_holds_no_whole_copy(tmp_path):
    """World 4, a ~200M-parameter HF LLaMA: each rank's peak anonymous memory while building and
    loading is within half the model's fp32 size of the same build from scratch (the old path held
    the whole model, 0.8 GB, on every rank, plus a converted copy)."""
    from longtrain.models import Transformer, model_config
    from longtrain.models.hf import save_hf_checkpoint

    cfg = model_config(None, vocab_size=32000, dim=1024, n_layers=12, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                       max_seq_len=512)
    assert 1.9e8 < cfg.n_params < 2.2e8
    with torch.device("meta"):
        big = Transformer(cfg)
    big.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in big.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    hf = save_hf_checkpoint(big, tmp_path / "hf200m")
    del big
    sets = ["model.vocab_size=32000", "model.dim=1024", "model.n_layers=12", "model.n_heads=16", "model.n_kv_heads=4",
            "model.ffn_dim=2816"]
    scratch = run_distributed(_build, 4, None, sets, False, timeout=600)
    loaded = run_distributed(_build, 4, str(hf), [], False, timeout=600)
    fp32 = cfg.n_params * 4
    for r in range(4):
        assert loaded[r]["local_params"] <= cfg.n_params / 4 + 4096
        extra = loaded[r]["peak"] - scratch[r]["peak"]
        print(f"rank {r}: scratch peak {scratch[r]['peak'] / 2**20:.0f} MiB, init_from peak "
              f"{loaded[r]['peak'] / 2**20:.0f} MiB (model fp32 {fp32 / 2**20:.0f} MiB)")
        assert extra < 0.5 * fp32, (r, extra / 2**20)
        assert loaded[r]["peak"] < 0.6 * fp32  # a quarter of the model + one tensor at a time
