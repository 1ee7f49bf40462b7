"""Continue-tuning end to end through the CLI: a tiny random LLaMA saved by transformers (with a BPE
tokenizer.json trained here on stdlib files) -> recipes/moh-llama-continue-cpu.toml (MoH query_norm
2 shared + 1 of 2 routed heads, sp=2 TokenRing, FSDP2, bf16, Mesa, staged seq_len 64->128->256 with
rope_theta raised per stage) -> `longtrain convert` -> load back. This is also the CPU twin's run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from helpers import REPO, cli_env, losses, run_train

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

RECIPE = REPO / "recipes" / "moh-llama-continue-cpu.toml"


def make_hf_llama(out: Path) -> Path:
    """Byte-level BPE (384 ids) trained on five stdlib files + a random LlamaForCausalLM (GQA 4/2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [str(root / f) for f in ("textwrap.py", "string.py", "bisect.py", "heapq.py", "shlex.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(files, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(out / "tokenizer.json"))
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
        bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|end_of_text|>"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out)
    return out


def text_loss(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)))


def test_hf_llama_to_moh_sp2_staged_then_export(tmp_path):
    hf = make_hf_llama(tmp_path / "hf")
    out = tmp_path / "run"
    proc = run_train(out, "training.steps=10", f"model.init_from={hf}", recipe=RECIPE)
    log = proc.stdout

    # the tokenizer came from init_from: the packed token count is the BPE one, not the byte one
    from longtrain.launcher.data.sources import load_documents
    from longtrain.launcher.data.tokenizers import HFTokenizer
    from longtrain.testing import PackedCorpus

    n_tokens = int(re.search(r"data: .*?([\d,]+) tokens", log).group(1).replace(",", ""))
    docs = load_documents("stdlib", "auto", "text", 60)
    bpe = HFTokenizer(str(hf / "tokenizer.json"))
    assert n_tokens == len(PackedCorpus(docs, bpe, 64, seed=0).tokens)
    assert n_tokens < 0.8 * sum(len(d.encode()) for d in docs)

    # stages switched seq_len and rope_theta; sp=2 TokenRing
    assert "(dp 1 x sp 2, tokenring)" in log
    assert "seq_len 64 -> 128" in log and "seq_len 128 -> 256" in log
    assert "rope_theta 10000 -> 40000" in log and "rope_theta 160000 -> 640000" in log

    # finite, falling loss (measured: 5.96 -> 5.66 over 10 steps, a near-uniform random model at lr 1e-3)
    ls = [losses(out)[s] for s in range(1, 11)]
    assert all(math.isfinite(v) for v in ls)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.1, ls

    # MoH really routed: per logged step, shared heads on for every token, routed usage sums to k = 1
    from longtrain.launcher.metrics import read_jsonl

    usage = [r for r in read_jsonl(out / "metrics.jsonl") if "moh/layer0/head0" in r]
    assert len(usage) == 10
    for r in usage:
        for layer in (0, 1):
            assert r[f"moh/layer{layer}/head0"] == r[f"moh/layer{layer}/head1"] == 1.0
            assert abs(r[f"moh/layer{layer}/head2"] + r[f"moh/layer{layer}/head3"] - 1.0) < 1e-6

    ckpt = out / "checkpoints" / "step_00000010"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["seq_len"] == 256 and meta["rope_theta"] == 640000.0
    assert meta["model"]["max_seq_len"] == 256  # raised from the HF folder's 64
    assert meta["model"]["moh"] == {"shared_heads": 2, "routed_heads": 1, "router": "query_norm", "aux_loss_coef": 0.0}

    # Mesa ran (no activation checkpointing in this recipe): its range estimates were updated
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(ckpt), str(tmp_path / "plain.pt"))
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)["model"]
    assert min(int(v.max()) for k, v in plain.items() if k.startswith("mesa.") and k.endswith(".steps")) > 0

    # export (tokenizer taken from init_from via the run's recipe) and load back
    exp = subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "convert", str(ckpt), str(tmp_path / "out")],
                         capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=120)
    assert exp.returncode == 0, exp.stderr
    assert "MoH LLaMA" in exp.stdout
    exported = tmp_path / "out"
    assert (exported / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["moh"]["router"] == "query_norm" and cfg["rope_theta"] == 640000.0
    assert cfg["max_position_embeddings"] == 256
    assert cfg["bos_token_id"] == bpe.bos_id and cfg["eos_token_id"] == bpe.eos_id  # passed through from init_from

    from longtrain.launcher.convert import load_checkpoint_model
    from longtrain.models.hf import load_hf_checkpoint

    back = load_hf_checkpoint(exported).eval()
    assert back.cfg.moh is not None and (back.cfg.moh.shared_heads, back.cfg.moh.routed_heads) == (2, 1)
    trained, _ = load_checkpoint_model(ckpt)
    trained.eval()
    assert all(torch.equal(plain[k], v) for k, v in back.state_dict().items())
    sample = torch.as_tensor(bpe.encode(docs[0])[:257], dtype=torch.long)[None]
    with torch.no_grad():
        assert torch.equal(back(sample), trained(sample))

    # the weights moved, and the tuned model predicts held-out text better than the HF start
    start = load_hf_checkpoint(hf, moh=back.cfg.moh).eval()
    start.set_rope(theta=640000.0)
    assert not torch.equal(start.layers[0].attn.wq.weight, back.layers[0].attn.wq.weight)
    from longtrain.launcher.data.sources import stdlib_files

    held_out_text = stdlib_files()[-1].read_text()  # not among the 60 documents trained on
    assert held_out_text not in docs
    held_out = torch.as_tensor(bpe.encode(held_out_text)[:257], dtype=torch.long)[None]
    l_start, l_tuned = text_loss(start, held_out), text_loss(back, held_out)
    print(f"held-out loss: start {l_start:.4f}, tuned {l_tuned:.4f}")
    assert l_tuned < l_start - 0.1

    # transformers reads the export too (it ignores the moh fields and runs all heads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert torch.isfinite(dense(sample).logits).all()


def test_hf_llama_continues_as_mixed_spans_with_sp2(tmp_path):
    """init_from + model.attention: the LLaMA's weights continue as full + sliding-window layers (MoH on
    top, sp=2); loss finite and falling, the plan kept in the checkpoint and the export; lightning refused."""
    hf = make_hf_llama(tmp_path / "hf")
    out = tmp_path / "run"
    run_train(out, "training.steps=8", f"model.init_from={hf}", 'model.attention=["full","window:48"]',
              "mesa.enabled=false", "training.dtype=fp32", recipe=RECIPE)
    ls = [losses(out)[s] for s in range(1, 9)]
    assert all(math.isfinite(v) for v in ls)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.05, ls
    meta = json.loads((out / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["model"]["attention"] == ["full", "window:48"]

    from longtrain.launcher.convert import load_checkpoint_model
    from longtrain.models.hf import save_hf_checkpoint

    trained, _ = load_checkpoint_model(out / "checkpoints" / "step_00000008")
    assert [str(s) for s in trained.spans] == ["full", "window:48"]
    exported = save_hf_checkpoint(trained, tmp_path / "out")
    assert json.loads((exported / "config.json").read_text())["longtrain_attention"] == ["full", "window:48"]

    bad = run_train(tmp_path / "bad", "training.steps=2", f"model.init_from={hf}",
                    'model.attention=["full","lightning"]', recipe=RECIPE, check=False)
    assert bad.returncode == 2 and "lightning layers have no weights" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
