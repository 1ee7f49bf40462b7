"""`longtrain bench peer` without torchtitan: the one-line refusal, and its pure helpers (recipe ->
torchtitan settings, the weight layout handed to torchtitan, the summary of a run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longtrain.bench import peer
from longtrain.launcher.config import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_bench_is_registered():
    from longtrain.launcher.cli import BENCHES

    assert "peer" in BENCHES


def test_missing_torchtitan_is_one_line_and_exit_2(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "LONGTRAIN_PEER_SITE": str(tmp_path / "elsewhere")}
    r = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "bench", "peer", "--peer-site", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(tmp_path) in lines[0] and "make peer-setup" in lines[0]


def test_site_option_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv(peer.SITE_ENV, str(tmp_path))
    assert peer.peer_site(None) == tmp_path.resolve()
    assert peer.peer_site("/x/y") == Path("/x/y")
    monkeypatch.delenv(peer.SITE_ENV)
    assert peer.peer_site(None) == Path(peer.DEFAULT_SITE).resolve()
    assert not peer.has_torchtitan(tmp_path)


@pytest.mark.parametrize("cp", [False, True])
def test_settings_have_longtrains_shape_and_tokens_per_step(tmp_path, cp):
    sets = peer.bench_sets(12, tmp_path, cp, 2, ["data.seq_len=128", "training.micro_batch=3", "training.warmup=4"])
    r = load_recipe("tiny-cpu", sets)
    s = peer.titan_settings(r, 2, cp)
    m = r.model_config()
    for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps", "rope_theta"):
        assert s["model"][k] == getattr(m, k)
    dp = 1 if cp else 2
    assert (s["dp"], s["cp"]) == ((1, 2) if cp else (2, 1))
    assert r.parallel.sp == (2 if cp else 1)
    # longtrain's tokens per step: dp ranks x micro_batch x grad_accum samples of seq_len
    assert peer.tokens_per_step(s) == dp * 3 * r.training.grad_accum * 128
    assert s["training"]["steps"] == r.training.steps == 12
    assert s["lr_scheduler"] == {"warmup_steps": 4, "decay_ratio": None, "decay_type": "cosine",
                                 "min_lr_factor": r.training.min_lr_ratio}
    assert s["optimizer"]["weight_decay"] == r.training.weight_decay
    assert "checkpoint.resume=none" in sets


def test_settings_refuse_what_torchtitans_llama_lacks(tmp_path):
    r = load_recipe("tiny-cpu", ["model.tie_embeddings=true"])
    with pytest.raises(ValueError, match="plain LLaMA"):
        peer.titan_settings(r, 2, False)


def test_fused_qkv_layout_groups_query_heads_with_their_kv_head():
    H, KV, hd, dim = 4, 2, 3, 5
    q = torch.arange(H * hd * dim, dtype=torch.float32).view(H * hd, dim)
    k, v = -q[: KV * hd] - 1, q[: KV * hd] + 1000
    ours = {"layers.0.attn.wq.weight": q, "layers.0.attn.wk.weight": k, "layers.0.attn.wv.weight": v,
            "layers.0.attn.wo.weight": q.T, "layers.0.attn_norm.weight": torch.ones(dim),
            "layers.0.mlp.w1.weight": q, "layers.0.mlp_norm.weight": torch.ones(dim),
            "output.weight": q, "tok_embeddings.weight": q, "norm.weight": torch.ones(dim)}
    out = peer.titan_state_dict(ours, H, KV)
    assert set(out) == {"layers.0.attention.qkv_linear.wqkv.weight", "layers.0.attention.wo.weight",
                        "layers.0.attention_norm.weight", "layers.0.feed_forward.w1.weight",
                        "layers.0.ffn_norm.weight", "lm_head.weight", "tok_embeddings.weight", "norm.weight"}
    fused = out["layers.0.attention.qkv_linear.wqkv.weight"].view(KV, H // KV + 2, hd, dim)
    for g in range(KV):  # kv group g: its query heads 2g, 2g+1, then its k head, then its v head
        assert torch.equal(fused[g, 0], q[(2 * g) * hd:(2 * g + 1) * hd])
        assert torch.equal(fused[g, 1], q[(2 * g + 1) * hd:(2 * g + 2) * hd])
        assert torch.equal(fused[g, 2], k[g * hd:(g + 1) * hd])
        assert torch.equal(fused[g, 3], v[g * hd:(g + 1) * hd])


def test_summary_median_after_warmup_and_peak_over_ranks():
    ranks = [{"step_times_s": [9.0, 0.5, 0.3, 0.4], "losses": [5.0, 4.0, 3.5, 3.0], "train_hwm_mb": 100.0,
              "setup_hwm_mb": 80.0},
             {"step_times_s": [9.0, 0.5, 0.3, 0.4], "losses": [5.0, 4.0, 3.5, 3.0], "train_hwm_mb": 120.0,
              "setup_hwm_mb": 70.0}]
    s = peer.summarize(ranks, tokens=1000, warmup=1)
    assert s["step_ms"] == pytest.approx(400.0) and s["tokens_per_s"] == pytest.approx(2500.0)
    assert (s["peak_rss_mb"], s["setup_rss_mb"]) == (120.0, 80.0)
    assert (s["first_loss"], s["last_loss"]) == (5.0, 3.0)
