"""The shipped model recipes: the three GPU recipes parse and validate (with their FILL IN paths
replaced), each CPU twin has the same structure as its GPU recipe, and the twins train for a few
steps on 2 processes with finite, falling loss. The MoH twin (moh-llama-continue-cpu.toml) is run
by tests/test_continue_tuning.py, which needs an HF folder to start from."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from helpers import REPO, cli_env, losses, run_train
from longtrain.errors import ConfigError
from longtrain.launcher.config import Recipe, load_recipe
from longtrain.models.hf import hf_model_config
from longtrain.models.spans import attention_flops_fraction, layer_plan

RECIPES = REPO / "recipes"
TWINS = {"moh-llama3-8b-continue-128k": "moh-llama-continue-cpu", "masformer-1.3b-8k": "masformer-cpu",
         "tnl-lightning-1b": "tnl-lightning-cpu", "llama3-8b-continue-4m": "llama3-long-cpu"}


def hf_config_folder(path: Path, heads: int, kv: int, dim: int, layers: int) -> Path:
    """An HF folder with only config.json: enough to validate a recipe and read the model's shape."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128256, "hidden_size": dim, "intermediate_size": 4 * dim,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "rope_theta": 500000.0, "max_position_embeddings": 8192}))
    return path


def load(name: str, tmp_path: Path) -> Recipe:
    """A recipe with its placeholder paths replaced by things that exist here."""
    sets = ["data.source=stdlib", "data.tokenizer=bytes"]
    if name.startswith(("moh-llama3-8b", "llama3-8b")):  # the shape of LLaMA-3-8B
        sets.append(f"model.init_from={hf_config_folder(tmp_path / 'llama3-8b', 32, 8, 4096, 32)}")
    elif name.startswith(("moh-llama", "llama3-long")):  # the twin: the tiny shape tests/test_continue_tuning.py builds
        sets.append(f"model.init_from={hf_config_folder(tmp_path / 'tiny', 4, 2, 64, 2)}")
    return load_recipe(RECIPES / f"{name}.toml", sets)


def model_cfg(r: Recipe):
    if r.model.init_from:
        return hf_model_config(r.model.init_from, moh=r.model_config().moh if r.model.moh else None)
    return r.model_config()


def structure(r: Recipe) -> dict:
    """What a twin must share with its GPU recipe (everything but scale)."""
    cfg = model_cfg(r)
    spans = layer_plan(cfg.attention, cfg.n_layers)
    seq0 = r.data.seq_len
    out = {
        "kinds": sorted({s.kind for s in spans}),
        "full_fraction": Fraction(sum(s.kind == "full" for s in spans), len(spans)),
        "window_over_seq": sorted({Fraction(s.window, seq0) for s in spans if s.kind == "window"}),
        "init_from": r.model.init_from is not None,
        "sp>1": r.parallel.sp > 1,
        **{k: getattr(r.parallel, k) for k in ("sp_impl", "sp_layout", "dp_engine")},
        **{k: getattr(r.training, k) for k in ("dtype", "activation_checkpointing", "schedule")},
        "mesa": r.mesa.enabled,
        "document_mask": r.data.document_mask,
        "stage_seq_ratios": [Fraction(s.seq_len, seq0) for s in r.stages],
        "stage_theta_ratios": [Fraction(s.rope_theta / r.stages[0].rope_theta).limit_denominator(1000)
                               for s in r.stages],
    }
    if cfg.moh is not None:
        m = cfg.moh
        out["moh"] = (Fraction(m.shared_heads, cfg.n_heads), Fraction(m.shared_heads + m.routed_heads, cfg.n_heads),
                      m.router)
    return out


@pytest.mark.parametrize("big,twin", list(TWINS.items()))
def test_twin_has_the_structure_of_its_gpu_recipe(big, twin, tmp_path):
    rb, rt = load(big, tmp_path), load(twin, tmp_path)
    sb, st = structure(rb), structure(rt)
    assert sb == st
    assert rt.training.device == "cpu" and rb.training.device == "cuda"


def test_moh_llama3_8b_recipe(tmp_path):
    r = load("moh-llama3-8b-continue-128k", tmp_path)
    cfg = model_cfg(r)
    assert (cfg.n_heads, cfg.n_kv_heads) == (32, 8)
    m = cfg.moh
    assert (m.shared_heads, m.routed_heads, m.router) == (16, 8, "query_norm")
    assert Fraction(m.shared_heads + m.routed_heads, cfg.n_heads) == Fraction(3, 4)
    assert r.training.lr == 2e-5 and r.training.dtype == "bf16" and r.mesa.enabled
    assert (r.parallel.sp_impl, r.parallel.dp_engine) == ("tokenring", "fsdp2") and r.parallel.sp > 1
    seqs = [s.seq_len for s in r.stages]
    thetas = [s.rope_theta for s in r.stages]
    assert seqs == [32768, 65536, 131072] and r.data.seq_len == seqs[0] and r.stages[0].start_step == 0
    assert thetas == sorted(thetas) and len(set(thetas)) == 3 and thetas[0] > cfg.rope_theta
    assert all(s % (2 * r.parallel.sp) == 0 for s in seqs)  # zigzag needs 2*sp chunks
    assert [s.start_step for s in r.stages] == sorted(s.start_step for s in r.stages)
    assert r.stages[-1].start_step < r.training.steps


def test_llama3_long_recipe_fits_one_node(tmp_path):
    """The long recipe's last stage fits 8 x H100 80 GB by the plan, at >= 512k tokens. (It was the
    longest length the plan allowed until the RMSNorms stopped saving fp32 copies; the 8m and 16m
    recipes, Mesa + offload + head groups, now hold that claim in tests/test_plan_host.py.)"""
    from longtrain.launcher.plan import make_plan

    r = load("llama3-8b-continue-4m", tmp_path)
    assert r.training.activation_checkpointing == "offload" and r.training.dtype == "bf16"
    assert (r.training.loss_chunk, r.training.mlp_chunk) == ("auto", "auto")
    pl = make_plan(r, gpus=8, gpu="h100")
    seq = pl.layout["seq_len"]
    assert seq >= 524288 and seq == r.stages[-1].seq_len
    assert pl.memory_gib["total"] <= 0.9 * 80
    # the exact-inputs baseline; the longest lengths (Mesa + offload) are the 8m / 16m recipes' (test_plan_host)
    assert pl.layout["longest_seq_fitting"] >= seq
    assert all(s.seq_len % (2 * r.parallel.sp) == 0 for s in r.stages)


@pytest.mark.parametrize("name", ["llama3-long-cpu", "llama3-long-mesa-cpu"])
def test_llama3_long_cpu_trains(tmp_path, name):
    """The twins from a tiny HF folder: 2 processes, sp = 2 ring, FSDP2 from the meta device, offload,
    loss chunks and MLP tiles (the second: Mesa's 8-bit offloaded inputs and attention in head groups, as
    the 8m / 16m recipes), through all three stages (64 -> 256 -> 1040 tokens)."""
    import torch

    from longtrain.models import Transformer, model_config
    from longtrain.models.hf import save_hf_checkpoint

    torch.manual_seed(0)
    m = Transformer(model_config(None, vocab_size=260, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                                 max_seq_len=256))
    hf = save_hf_checkpoint(m, tmp_path / "hf")
    out = tmp_path / "run"
    proc = run_train(out, f"model.init_from={hf}", recipe=RECIPES / f"{name}.toml", timeout=600)
    ls = losses(out)
    assert sorted(ls) == list(range(1, 13)) and all(math.isfinite(v) for v in ls.values())
    assert sum(ls[s] for s in (4, 5, 6)) / 3 < sum(ls[s] for s in (1, 2, 3)) / 3, ls
    assert "seq_len 256 -> 1040" in proc.stdout


def test_masformer_and_tnl_recipes(tmp_path):
    r = load("masformer-1.3b-8k", tmp_path)
    cfg = r.model_config()
    spans = [str(s) for s in layer_plan(cfg.attention, cfg.n_layers)]
    assert cfg.n_layers == 24 and spans.count("full") == 6 and spans.count("window:1024") == 18
    assert spans[::4] == ["full"] * 6
    frac = attention_flops_fraction(layer_plan(cfg.attention, cfg.n_layers), r.data.seq_len)
    assert abs(frac - (0.25 + 0.75 * (2 * 1024 / 8192 - (1024 / 8192) ** 2))) < 1e-12  # ~0.43 of dense
    assert r.data.seq_len == 8192 and 1.2e9 < cfg.n_params < 1.5e9

    r = load("tnl-lightning-1b", tmp_path)
    cfg = r.model_config()
    assert {s.kind for s in layer_plan(cfg.attention, cfg.n_layers)} == {"lightning"}
    assert 0.8e9 < cfg.n_params < 1.2e9 and r.data.seq_len % (2 * r.parallel.sp) == 0


def test_placeholders_stop_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"init_from.*--set model.init_from="):
        load_recipe(RECIPES / "moh-llama3-8b-continue-128k.toml")
    with pytest.raises(ConfigError, match="data.source"):
        load_recipe(RECIPES / "masformer-1.3b-8k.toml")
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "train",
                           str(RECIPES / "moh-llama3-8b-continue-128k.toml"), "--dry-run"],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--set model.init_from=" in err[0]


def _trains(name: str, tmp_path: Path, *sets: str) -> list[float]:
    out = tmp_path / name
    proc = run_train(out, "training.steps=8", "data.seq_len=128", *sets, recipe=RECIPES / f"{name}.toml")
    ls = [losses(out)[s] for s in range(1, 9)]
    assert all(math.isfinite(v) for v in ls)
    # measured at these settings: masformer 5.7 -> 3.4, lightning 5.8 -> 3.6
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.5, ls
    return proc.stdout


def test_masformer_cpu_trains(tmp_path):
    log = _trains("masformer-cpu", tmp_path)
    assert "(dp 2 x sp 1" in log


def test_tnl_lightning_cpu_trains(tmp_path):
    log = _trains("tnl-lightning-cpu", tmp_path)
    assert "(dp 1 x sp 2" in log


def test_bench_models_arms_and_smoke(tmp_path):
    """`longtrain bench models` builds the arms it names (tiny MHA base) and runs end to end."""
    from longtrain.bench.models import ARMS, arm_overrides

    cfgs = {a: load_recipe("tiny-cpu", arm_overrides(a, 256, 32)).model_config() for a in ARMS}
    assert all(c.n_heads == c.n_kv_heads == 4 for c in cfgs.values())
    assert cfgs["mha"].moh is None and cfgs["mha"].attention == ["full"]
    m = cfgs["moh"].moh
    assert Fraction(m.shared_heads + m.routed_heads, 4) == Fraction(3, 4) and m.router == "learned"
    assert [str(s) for s in layer_plan(cfgs["mixed"].attention, 4)] == ["full"] + ["window:32"] * 3
    assert cfgs["lightning"].attention == ["lightning"]

    out = tmp_path / "models.json"
    proc = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "bench", "models", "--arms", "mha,moh",
                           "--steps", "4", "--timing-steps", "0", "--warmup", "1", "--seq-len", "64",
                           "--micro-batch", "2", "--max-documents", "20", "--attn-seqs", "", "--attn-routers",
                           "query_norm", "--attn-repeat", "1", "--out", str(out)],
                          capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["arm"] for r in res["rows"]] == ["mha", "moh"]
    for r in res["rows"]:
        assert math.isfinite(r["final_loss"]) and r["tok_s_cpu"] > 0 and r["tok_s_wall"] > 0
    assert len(res["curves"]["moh"]) == 4 and [r["seq"] for r in res["attention"]] == [64]
