"""`longtrain convert`: a training checkpoint (DCP, written by a real 2-process FSDP2 run) exported to
an HF folder. Reference: the checkpoint's tensors read by DCP's own converter (not our loader) and
`transformers.LlamaForCausalLM` loading the export. MoH export: tests/test_continue_tuning.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import REPO, cli_env, run_train

transformers = pytest.importorskip("transformers")

from longtrain.launcher.convert import load_checkpoint_model, main  # noqa: E402
from longtrain.models import Transformer, model_config  # noqa: E402


def dcp_tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Model tensors of a DCP checkpoint via torch's dcp_to_torch_save (independent of longtrain)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(ckpt), str(tmp / "plain.pt"))
    return torch.load(tmp / "plain.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 steps of the tiny model (GQA 4/2, tied embeddings) on 2 FSDP2 ranks."""
    out = tmp_path_factory.mktemp("convert") / "run"
    run_train(out, "training.steps=2", "model.tie_embeddings=true", "checkpoint.interval=100")
    return out


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "convert", *args], capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=120)


def test_dense_export_equals_checkpoint_and_loads_in_transformers(run, tmp_path):
    proc = convert_cli(str(run), str(tmp_path / "hf"))  # a run folder: its newest checkpoint
    assert proc.returncode == 0, proc.stderr
    assert "exported step 2" in proc.stdout and "step_00000002" in proc.stdout
    out = tmp_path / "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "moh" not in cfg and "longtrain_attention" not in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 2
    assert not (out / "tokenizer.json").exists()  # byte tokenizer run
    assert not (tmp_path / "hf.tmp").exists()

    ref = dcp_tensors(run / "checkpoints" / "step_00000002", tmp_path)
    from safetensors.torch import load_file

    hf = load_file(str(out / "model.safetensors"))
    assert torch.equal(hf["model.embed_tokens.weight"], ref["tok_embeddings.weight"])
    assert "lm_head.weight" not in hf  # tied
    assert torch.equal(hf["model.layers.3.self_attn.k_proj.weight"], ref["layers.3.attn.wk.weight"])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], ref["layers.0.mlp.w3.weight"])
    assert len(hf) == len([k for k in ref if k != "output.weight" and not k.startswith("mesa.")])

    # logits: transformers on the export vs our model built from the reference tensors
    ours = Transformer(model_config("tiny", tie_embeddings=True, max_seq_len=512))
    ours.load_state_dict(ref)
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 259, (2, 48))
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits.float()
    assert float(a.std()) > 0.3
    assert float((a - b).abs().max()) <= 1e-4

    # our own loader reads the same weights
    model, meta = load_checkpoint_model(run)
    assert meta["step"] == 2 and model.output.weight is model.tok_embeddings.weight
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in model.state_dict())


def test_bf16_export_with_tokenizer(run, tmp_path, capsys):
    tok = tmp_path / "tok.json"
    tok.write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}')
    (tmp_path / "empty").mkdir()  # an existing empty output folder is fine
    step = run / "checkpoints" / "step_00000002"
    assert main([str(step), str(tmp_path / "empty"), "--dtype", "bf16", "--tokenizer", str(tok)]) == 0
    out = tmp_path / "empty"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == tok.read_text()
    from safetensors.torch import load_file

    hf = load_file(str(out / "model.safetensors"))
    ref = dcp_tensors(step, tmp_path)
    assert hf["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(hf["model.layers.1.self_attn.o_proj.weight"], ref["layers.1.attn.wo.weight"].bfloat16())


def lightning_checkpoint(root: Path) -> Path:
    from longtrain.launcher.checkpoint import Checkpointer

    cfg = model_config("tiny", attention=["full", "lightning"])
    m = Transformer(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Checkpointer(root).save(1, {"model": m.state_dict()}, {"model": cfg.to_dict(), "seq_len": 64})


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("longtrain: error: "), err
    return err[0]


def test_clear_errors(run, tmp_path, capsys):
    step = run / "checkpoints" / "step_00000002"
    assert main([str(tmp_path / "nope"), str(tmp_path / "o1")]) == 2
    assert "checkpoint not found" in one_error_line(capsys)

    broken = tmp_path / "broken"
    shutil.copytree(step, broken)
    (broken / "meta.json").unlink()
    assert main([str(broken), str(tmp_path / "o2")]) == 2
    assert "incomplete" in one_error_line(capsys)

    assert main([str(tmp_path), str(tmp_path / "o3")]) == 2  # a folder with no checkpoint in it
    assert "no complete checkpoint" in one_error_line(capsys)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    assert main([str(step), str(busy)]) == 2
    assert "not empty" in one_error_line(capsys)
    assert (busy / "x").read_text() == "keep me"

    light = lightning_checkpoint(tmp_path / "light")
    assert main([str(light), str(tmp_path / "o4")]) == 2
    assert "lightning" in one_error_line(capsys)
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o4.tmp").exists()

    assert main([str(step), str(tmp_path / "o5"), "--tokenizer", str(tmp_path / "no.json")]) == 2
    assert "--tokenizer not found" in one_error_line(capsys)
    assert not (tmp_path / "o5").exists()

    # the CLI dispatches to the same code and exits 2 with one line
    proc = convert_cli(str(tmp_path / "nope"), str(tmp_path / "o6"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("longtrain: error: checkpoint not found")
