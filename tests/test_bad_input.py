"""Bad input -> one line naming the problem, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, TINY, cli_env


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", *args], capture_output=True,
                          text=True, timeout=120, env=cli_env(), cwd=cwd)


def _assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("longtrain: error:"), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("sets,needles", [
    (["training.lrr=1e-3"], ["training.lrr", "training.lr"]),
    (["trainin.lr=1e-3"], ["trainin", "training"]),
    (["training.steps=ten"], ["training.steps", "int"]),
    (["training.micro_batch=0"], ["training.micro_batch", "> 0"]),
    (["training.steps=-5"], ["training.steps"]),
    (["model.dim=-8"], ["model.dim"]),
    (["data.seq_len=0"], ["data.seq_len"]),
    (["data.source=/nonexistent/corpus"], ["data.source", "/nonexistent/corpus"]),
    (["data.seq_len=100000"], ["data.seq_len", "max_seq_len"]),
    (["parallel.sp_impl=rign"], ["parallel.sp_impl", "ring"]),
    (["model.attention=['full','window:0']"], ["window"]),
    (["checkpoint.resume=/nonexistent/ckpt"], ["checkpoint", "/nonexistent/ckpt"]),
    (["training.steps=3", "profile.steps=[2,5]"], ["profile.steps", "step 5", "1..3"]),
    (["profile.steps='12-10'"], ["profile.steps", "empty"]),
    (["profile.steps='two'"], ["profile.steps", "10-12"]),
    (["profile.ranks=[]"], ["profile.ranks"]),
])
def test_bad_recipe_values(sets, needles):
    args = ["train", str(TINY), "--nproc", "2"]
    for s in sets:
        args += ["--set", s]
    _assert_clean_error(_cli(*args), *needles)


MEMORY_BAD = [
    (["training.loss_chunk=-5"], ["training.loss_chunk", ">= 0"]),
    (["training.loss_chunk=1.5"], ["training.loss_chunk", "int"]),
    (["training.mlp_chunk=-1"], ["training.mlp_chunk", ">= 0"]),
    (["training.mlp_chunk='big'"], ["training.mlp_chunk", "auto"]),
    (["training.activation_checkpointing='sometimes'"], ["activation_checkpointing", "offload", "every:N"]),
    (["training.activation_checkpointing='every:0'"], ["activation_checkpointing", "every:N"]),
    (["training.activation_checkpointing='offload'", "training.compile=true"], ["offload", "compile"]),
    (["training.attn_head_chunk=-1"], ["training.attn_head_chunk", ">= 0"]),
    (["training.attn_head_chunk=1.5"], ["training.attn_head_chunk", "int"]),
    (["training.attn_head_chunk=3"], ["training.attn_head_chunk", "does not divide", "4 query heads"]),
    (["parallel.sp=2", "parallel.sp_impl='ulysses'", "training.attn_head_chunk=1"],
     ["training.attn_head_chunk", "Ulysses"]),
    (["training.optimizer_offload=true", "parallel.dp_engine=ddp"], ["training.optimizer_offload", "DDP"]),
    (["training.optimizer_offload=true", "parallel.dp_engine=deepspeed", "parallel.zero_stage=0"],
     ["training.optimizer_offload", "zero_stage >= 1"]),
    (["training.optimizer_offload=1"], ["training.optimizer_offload", "bool"]),
]


@pytest.mark.parametrize("sets,needles,nproc", [(s, n, "2") for s, n in MEMORY_BAD]
                         + [(s, n, "1") for s, n in MEMORY_BAD[::3]])
def test_bad_memory_settings(sets, needles, nproc):
    """Chunk sizes and checkpointing policies: one line, exit 2, in one process and under --nproc 2."""
    args = ["train", str(TINY), "--nproc", nproc]
    for s in sets:
        args += ["--set", s]
    _assert_clean_error(_cli(*args), *needles)


def test_missing_recipe_file():
    _assert_clean_error(_cli("train", "/nonexistent/recipe.toml"), "recipe", "not found")


def test_invalid_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 3\n")
    _assert_clean_error(_cli("train", str(bad)), "TOML")


def test_unreadable_checkpoint(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / ".metadata").write_bytes(b"garbage")
    (ck / "meta.json").write_text("{not json")
    _assert_clean_error(_cli("train", str(TINY), "--nproc", "2", "--set", f"checkpoint.resume={ck}"),
                        "meta.json")


def test_corrupt_shards_single_process(tmp_path):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / ".metadata").write_bytes(b"garbage")
    (ck / "meta.json").write_text('{"step": 3, "data_position": 0}')
    proc = _cli("train", str(TINY), "--set", f"checkpoint.resume={ck}", "--set", "data.max_documents=5",
                "--set", f"run.output_dir={tmp_path / 'out'}")
    _assert_clean_error(proc, "unreadable DCP metadata")


def test_unknown_bench():
    _assert_clean_error(_cli("bench", "nope"), "unknown bench")


def test_nproc_not_divisible_by_sp():
    _assert_clean_error(_cli("train", str(TINY), "--nproc", "3", "--set", "parallel.sp=2"), "divisible")


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_errors_inside_the_workers_are_one_line(tmp_path, nproc):
    """Errors that only the workers can see (here: a corpus too small for one sample) are one line and
    exit 2 under --nproc 2 too: reported once, without torchrun's ChildFailedError report."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("too short")
    proc = _cli("train", str(TINY), "--nproc", nproc, "--set", f"data.source={data}",
                "--set", f"run.output_dir={tmp_path / 'out'}")
    _assert_clean_error(proc, "too few for one sample")


def _worker_side_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "text under another name"}\n' * 50)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{this is not a tokenizer")
    return {
        "empty data folder": ([f"data.source={empty}"], ["matched no files"]),
        "missing text field": ([f"data.source={jsonl}", "data.text_field=text"], ["text"]),
        "unreadable tokenizer": ([f"data.tokenizer={tok}"], ["tokenizer"]),
    }


@pytest.mark.parametrize("case", ["empty data folder", "missing text field", "unreadable tokenizer",
                                  "model shape mismatch on resume"])
def test_worker_side_bad_inputs_under_nproc_2(tmp_path, case):
    out = tmp_path / "out"
    common = ["--nproc", "2", "--set", f"run.output_dir={out}", "data.max_documents=40", "data.seq_len=64"]
    if case == "model shape mismatch on resume":
        first = _cli("train", str(TINY), *common, "training.steps=2")
        assert first.returncode == 0, first.stderr[-2000:]
        _assert_clean_error(_cli("train", str(TINY), *common, "training.steps=4", "model.dim=64"),
                            "different model")
        return
    sets, needles = _worker_side_cases(tmp_path)[case]
    _assert_clean_error(_cli("train", str(TINY), *common, *sets), *needles)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_profile_rank_that_does_not_exist(tmp_path, nproc):
    """The world size is known in the workers only: one line and exit 2 there too."""
    _assert_clean_error(_cli("train", str(TINY), "--nproc", nproc, "--set", f"run.output_dir={tmp_path / 'o'}",
                             "--set", "profile.steps=[1]", "--set", f"profile.ranks=[0,{nproc}]"),
                        "profile.ranks", f"rank {nproc}", f"{nproc} rank")
