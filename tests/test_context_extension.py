"""Context extension pieces, fast: linear position interpolation against its formula, one loader for
longtrain checkpoints and HF folders with RoPE / span overrides (init_from, eval, convert), short passkey
documents in the long-context mix, and evaluation that does not import the trainer. The end-to-end
extension (base 128 -> 1024, retrieval at 1024) is in tests/test_passkey_recipe.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, cli_env
from longtrain.errors import ConfigError
from longtrain.launcher.eval import passkey as pk
from longtrain.models import ModelConfig, Transformer
from longtrain.models.layers import rope_cos_sin, rope_inv_freq


def test_linear_position_interpolation_is_positions_divided_by_factor():
    """PI (Chen et al. 2023): RoPE at position p with factor s equals plain RoPE at p / s; θ is untouched."""
    hd, theta, s = 32, 10000.0, 8.0
    pos = torch.arange(0, 1024)
    cos_pi, sin_pi = rope_cos_sin(pos, rope_inv_freq(hd, theta, {"type": "linear", "factor": s}))
    # the formula: angle(p, i) = (p / s) * theta ** (-2i / d)
    i = torch.arange(0, hd, 2, dtype=torch.float64)
    ang = (pos.double()[:, None] / s) * theta ** (-i / hd)
    ang = torch.cat([ang, ang], dim=-1)
    torch.testing.assert_close(cos_pi[0, :, 0].double(), ang.cos(), atol=2e-5, rtol=0)  # fp32 angles up to 128 rad
    torch.testing.assert_close(sin_pi[0, :, 0].double(), ang.sin(), atol=2e-5, rtol=0)  # fp32 angles up to 128 rad
    # 1024 interpolated positions span the angles 128 plain positions did
    cos_plain, _ = rope_cos_sin(torch.arange(0, 128) * 1.0, rope_inv_freq(hd, theta))
    torch.testing.assert_close(cos_pi[0, ::8], cos_plain[0], atol=1e-5, rtol=0)
    # "rope_type" spelling (HF) is the same thing
    torch.testing.assert_close(rope_inv_freq(hd, theta, {"rope_type": "linear", "factor": s}),
                               rope_inv_freq(hd, theta) / s)


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=259, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=128, **kw)
    m = Transformer(cfg)
    m.init_weights(seed=0)
    return m.eval()


def _save_run(model: Transformer, run: Path, step: int = 5) -> Path:
    """A run folder as the trainer leaves it: recipe.resolved.toml + checkpoints/step_N (DCP + meta.json)."""
    import torch.distributed.checkpoint as dcp

    ck = run / "checkpoints" / f"step_{step:08d}"
    ck.mkdir(parents=True)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ck))
    (ck / "meta.json").write_text(json.dumps({"step": step, "seq_len": 128, "model": model.cfg.to_dict()}))
    (run / "checkpoints" / "latest").write_text(ck.name)
    (run / "recipe.resolved.toml").write_text('[data]\nsource = "stdlib"\ntokenizer = "bytes"\nmax_documents = 3\n')
    return ck


def test_loader_opens_run_folder_with_rope_and_span_overrides(tmp_path):
    from longtrain.launcher.loading import describe_checkpoint, load_model, resolve_checkpoint

    base = _model()
    ck = _save_run(base, tmp_path / "run")
    assert resolve_checkpoint(tmp_path / "run") == ("dcp", ck)
    info = load_model(tmp_path / "run")
    assert info.step == 5 and info.tokenizer_spec == "bytes" and info.run_dir == tmp_path / "run"
    x = torch.randint(0, 259, (1, 64))
    torch.testing.assert_close(info.model(x), base(x))

    over = {"rope_scaling": {"type": "linear", "factor": 8.0}, "max_seq_len": 1024,
            "attention": ["full", "window:16"], "rope_theta": 20000.0}
    ext = load_model(tmp_path / "run", overrides=over).model
    assert ext.cfg.max_seq_len == 1024 and [str(s) for s in ext.spans] == ["full", "window:16"]
    torch.testing.assert_close(ext.inv_freq, rope_inv_freq(8, 20000.0) / 8)
    torch.testing.assert_close(ext.layers[1].attn.wq.weight, base.layers[1].attn.wq.weight)  # same weights
    with pytest.raises(ConfigError, match="cannot change"):
        describe_checkpoint(ck, {"dim": 64})


def test_init_from_a_longtrain_run_takes_its_config_and_the_recipes_rope(tmp_path):
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.loading import init_from_tokenizer, load_init_from

    base = _model()
    _save_run(base, tmp_path / "base")
    r = load_recipe(REPO / "recipes" / "passkey-cpu.toml",
                    [f"model.init_from={tmp_path / 'base'}", 'model.rope_scaling={type="linear", factor=8.0}',
                     "data.seq_len=1024", 'model.attention=["full", "window:128"]'])
    m = load_init_from(r)
    # the checkpoint's shape (dim 32, not the recipe's preset), the recipe's RoPE, spans and length
    assert m.cfg.dim == 32 and m.cfg.max_seq_len == r.data.seq_len == 1024
    assert m.cfg.rope_scaling == {"type": "linear", "factor": 8.0} and [str(s) for s in m.spans] == ["full", "window:128"]
    torch.testing.assert_close(m.tok_embeddings.weight, base.tok_embeddings.weight)
    assert init_from_tokenizer(tmp_path / "base") is None  # bytes: the trainer keeps data.tokenizer
    r2 = load_recipe(REPO / "recipes" / "passkey-cpu.toml", [f"model.init_from={tmp_path / 'base'}",
                                                             "model.moh={shared_heads=1, routed_heads=1}"])
    with pytest.raises(ConfigError, match="MoH|moh"):
        load_init_from(r2)


def test_hf_init_from_gets_the_recipes_rope_too(tmp_path):
    hf = pytest.importorskip("longtrain.models.hf")
    from longtrain.launcher.loading import load_model

    base = _model()
    hf.save_hf_checkpoint(base, tmp_path / "hf")
    m = load_model(tmp_path / "hf", overrides={"rope_theta": 80000.0, "max_seq_len": 1024}).model
    assert m.cfg.rope_theta == 80000.0 and m.cfg.max_seq_len == 1024
    torch.testing.assert_close(m.inv_freq, rope_inv_freq(8, 80000.0))
    plain = load_model(tmp_path / "hf").model
    x = torch.randint(0, 259, (1, 32))
    torch.testing.assert_close(plain(x), base(x))


def test_passkey_options_for_extension_data():
    """The options data.passkey_options passes to mix_passkey_documents; defaults generate what they always did."""
    docs = ["abc def ghi\n" * 300] * 5
    assert pk.mix_passkey_documents(docs, 0.9, seed=0, seq_len=256) == pk.mix_passkey_documents(
        docs, 0.9, seed=0, seq_len=256, short_share=0.0, depth_power=2.0)
    # short_share: that share of passkey documents at most short_max characters, the rest as long as before
    long = [d for d in pk.mix_passkey_documents(docs, 0.9, seed=0, seq_len=1024, short_share=0.25)[5:]
            if "pass key" in d]
    share = np.mean([len(d) <= 128 for d in long])
    assert 0.15 < share < 0.35, share
    assert max(len(d) for d in long) > 900
    # the extension recipe's setting: every document one whole sample, 90% of synthetic ones passkey documents
    al = pk.mix_passkey_documents(docs, 0.95, seed=1, seq_len=1024, align=True, copy_share=0.1)
    assert {len(d) for d in al} == {1023}
    assert 0.8 < np.mean(["pass key" in d for d in al]) < 0.92  # 0.95 * 0.9 (corpus pieces are the rest)
    # depth_power 1: needle depths uniform (mean 1/2) instead of u^2 (mean 1/3)
    def depths(p, near=0.0):
        ds = pk.mix_passkey_documents(docs * 4, 0.95, seed=2, seq_len=1024, align=True, copy_share=0.0,
                                      depth_power=p, near_share=near)
        out = []
        for d in (d for d in ds if "pass key" in d):
            i = d.index("\nThe pass key")  # filler before the needle / all filler = the drawn depth
            out.append(i / (d.index(pk.QUESTION) - len(pk.NEEDLE.format(key="00000"))))
        return np.array(out)
    assert abs(depths(1.0).mean() - 0.5) < 0.03 and abs(depths(2.0).mean() - 1 / 3) < 0.03
    # near_share: that share mirrored to 1 - u^2 (needles close to the question). P(depth > 0.9):
    # 1 - sqrt(0.9) = 5.1% for u^2 alone; 0.7 * 5.1% + 0.3 * sqrt(0.1) = 13.1% with a 30% mirror
    assert abs(depths(2.0, 1.0).mean() - 2 / 3) < 0.03
    assert abs(np.mean(depths(2.0) > 0.9) - 0.051) < 0.02 and abs(np.mean(depths(2.0, 0.3) > 0.9) - 0.131) < 0.03
    assert pk.mix_passkey_documents(docs, 0.9, seed=0, seq_len=256, near_share=0.0) == pk.mix_passkey_documents(
        docs, 0.9, seed=0, seq_len=256)
    for bad in (dict(short_share=1.5), dict(depth_power=0), dict(near_share=-0.1)):
        with pytest.raises(ValueError):
            pk.mix_passkey_documents(docs, 0.9, **bad)


def test_evaluation_does_not_import_the_trainer():
    code = ("import sys, longtrain.launcher.eval.cli, longtrain.launcher.convert, longtrain.launcher.loading; "
            "print([m for m in sys.modules if m.endswith('trainer')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


def test_ppl_between_tiles_buckets():
    from longtrain.launcher.eval.report import ppl_between

    res = {"lengths": [8], "buckets": [[{"start": 0, "end": 4, "ppl": 2.0}, {"start": 4, "end": 8, "ppl": 8.0}]]}
    assert ppl_between(res, 8, 0, 8) == pytest.approx(4.0)
    assert ppl_between(res, 8, 4, 8) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        ppl_between(res, 8, 2, 8)
    assert math.isfinite(ppl_between(res, 8, 0, 4))
