"""`longtrain plan` and host memory (issue 34, the planner side): Mesa's 8-bit checkpointed inputs,
host_total per GPU (offloaded inputs at their stored width + optimizer if offloaded, or the loading
peak, + the per-process baseline), --host-memory parsing and its one-line errors, "does not fit", the
host budget in the longest-length search, and the two Mesa + offload recipes. Arithmetic only: no
training, no torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from helpers import REPO, TINY, cli_env
from longtrain.errors import ConfigError
from longtrain.launcher.plan import format_plan, load_for_plan, make_plan, parse_size
from longtrain.launcher.sizing import GPUS, HOST_BASELINE_BYTES, activation_bytes_per_token, memory_per_gpu
from longtrain.models import model_config

RECIPES = REPO / "recipes"
SEQ = 4259840  # the 4m recipe's last stage: 532,480 tokens per GPU at sp = 8


def _llama(mesa: bool, checkpointing: str = "offload", dtype: str = "bf16", **kw):
    cfg = model_config("llama3-8b", max_seq_len=SEQ)
    return cfg, memory_per_gpu(cfg, world=8, sp=8, micro_batch=1, seq_len=SEQ, dtype=dtype, engine="fsdp2",
                               zero_stage=0, checkpointing=checkpointing, mesa=mesa, loss_chunk="auto",
                               mlp_chunk="auto", **kw)


@pytest.mark.parametrize("dtype,a", [("bf16", 2), ("fp32", 4)])
def test_host_total_of_offloaded_inputs_with_and_without_mesa(dtype, a):
    """offload: every layer's input on the host, a bytes per element, 1 with Mesa (uint8 codes)."""
    cfg, exact = _llama(False, dtype=dtype)
    _, mesa = _llama(True, dtype=dtype)
    tokens = SEQ / 8
    assert exact.host_offload == pytest.approx(tokens * cfg.n_layers * cfg.dim * a, rel=1e-9)
    assert mesa.host_offload == pytest.approx(exact.host_offload / a, rel=0.01)
    for m in (exact, mesa):  # baseline + max(loading peak, offloaded inputs + optimizer if offloaded)
        assert m.host_optimizer == 0.0
        assert m.host_total == pytest.approx(HOST_BASELINE_BYTES + max(m.loading_peak, m.host_offload), rel=1e-12)
        assert m.host_total > m.host_offload > m.loading_peak
    # the host-held part (what the store holds for offloaded inputs) shrinks by 1/a with Mesa
    assert (mesa.host_total - HOST_BASELINE_BYTES) == pytest.approx((exact.host_total - HOST_BASELINE_BYTES) / a,
                                                                    rel=0.01)
    # on the device only the recomputed layer is left (the inputs are on the host in both); with Mesa
    # its recompute saves 8-bit copies (1/a of the layer) and holds the norm's output and the attention
    # tensors exactly while it computes attention (activation_bytes_per_token)
    cfg_a = activation_bytes_per_token(cfg, a, checkpointing="offload", mlp_tiled=True)
    attn = cfg_a["plain_layer"] - 2 * (2 * a * cfg.dim + 4)
    per_tok = cfg_a["plain_layer"] / a + (1 - 1 / a) * (a * cfg.dim + attn)
    assert mesa.activations == pytest.approx(tokens * per_tok, rel=1e-9) and mesa.activations < exact.activations
    assert (exact.host_ckpt, exact.host_mesa_ckpt) == (mesa.host_ckpt, mesa.host_mesa_ckpt)
    assert mesa.host_mesa_ckpt == mesa.host_offload and exact.host_ckpt == exact.host_offload


def test_loading_peak_is_a_separate_moment():
    """Without offload the host holds the baseline and the larger of nothing and the loading peak."""
    _, m = _llama(False, checkpointing="full")
    assert m.host_offload == 0.0 and m.host_total == pytest.approx(HOST_BASELINE_BYTES + m.loading_peak)


@pytest.mark.parametrize("policy", ["full", "every:2"])
def test_mesa_checkpointed_inputs_are_8_bit_on_the_device(policy):
    cfg, exact = _llama(False, checkpointing=policy)
    _, mesa = _llama(True, checkpointing=policy)
    n_ck = cfg.n_layers if policy == "full" else cfg.n_layers // 2
    per_tok = {m: activation_bytes_per_token(cfg, 2, mesa=m, checkpointing=policy, mlp_tiled=True) for m in (0, 1)}
    assert per_tok[0]["inputs"] == n_ck * cfg.dim * 2 and per_tok[1]["inputs"] == n_ck * cfg.dim * 1
    assert per_tok[0]["recompute"] == per_tok[0]["plain_layer"]  # exact checkpointing recomputes exactly
    assert per_tok[1]["recompute"] < per_tok[0]["recompute"]  # Mesa's recompute saves 8-bit copies
    assert mesa.activations_mesa_ckpt < mesa.activations_ckpt
    if policy == "full":  # nothing else is kept: the difference is the inputs' second byte and the recompute's
        saved = SEQ / 8 * (n_ck * cfg.dim * (2 - 1) + per_tok[0]["recompute"] - per_tok[1]["recompute"])
        assert exact.activations_ckpt - exact.activations_mesa_ckpt == pytest.approx(saved, rel=1e-9)
        assert exact.total - mesa.total == pytest.approx(saved, rel=1e-9)


def test_plan_table_mesa_checkpointed_line_is_smaller():
    """The table's 'Mesa + checkpointed' row: smaller than 'checkpointed' on the device (8-bit inputs with
    'full', an 8-bit recompute with both); with 'offload' the host parts (printed beside them) halve in bf16."""
    rows = {}
    for policy in ("full", "offload"):
        r, _ = load_for_plan(str(RECIPES / "llama3-8b-continue-4m.toml"),
                             [f"training.activation_checkpointing={policy}"])
        text = format_plan(make_plan(r, gpus=8, gpu="h100"))
        for key, label in (("exact", "activations, checkpointed"), ("mesa", "activations, Mesa + checkpointed")):
            line = next(x for x in text.splitlines() if x.startswith(f"  {label} "))
            rows[policy, key] = [float(v) for v in re.findall(r"\d+\.\d+", line)]  # device [, host] GiB
    assert rows["full", "mesa"][0] < rows["full", "exact"][0] and len(rows["full", "mesa"]) == 1
    assert rows["offload", "mesa"][0] < rows["offload", "exact"][0]
    assert rows["offload", "mesa"][1] == pytest.approx(rows["offload", "exact"][1] / 2, rel=0.01)


def test_optimizer_offload_moves_the_state_to_the_host():
    """optimizer_offload moves 20 bytes per parameter of the local shard (AdamW m, v, fp32 master, grads,
    the step's temporaries) from the device to the host; DDP has no such mode."""
    cfg, on_device = _llama(True)
    _, off = _llama(True, optimizer_offload=True)
    moved = 20 * cfg.n_params / 8
    assert off.host_optimizer == pytest.approx(moved)
    assert off.params == off.grads == off.optimizer == 0.0
    assert on_device.total - off.total >= 12 * cfg.n_params / 8  # weights + AdamW state, always live
    assert off.host_total == pytest.approx(HOST_BASELINE_BYTES + max(off.loading_peak, off.host_offload + moved))
    with pytest.raises(ConfigError, match="optimizer offload"):
        memory_per_gpu(cfg, world=8, sp=8, micro_batch=1, seq_len=SEQ, dtype="bf16", engine="ddp", zero_stage=0,
                       checkpointing="offload", mesa=True, optimizer_offload=True)


@pytest.mark.parametrize("text,expected", [
    ("2TiB", 2 * 2**40), ("1024GiB", 2**40), ("1.5T", int(1.5 * 2**40)), ("512G", 512 * 2**30),
    ("900GB", 900 * 10**9), ("2TB", 2 * 10**12), ("123456789", 123456789), (" 64 gib ", 64 * 2**30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "0.0T", "", "1.2.3G", "2 TiBs", "inf", "nan", "1e12"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError) as e:
        parse_size(text)
    msg = str(e.value)
    assert "--host-memory" in msg and repr(text) in msg and "\n" not in msg


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "longtrain.launcher.cli", "plan", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=cli_env())


@pytest.mark.parametrize("value", ["lots", "-1G", "0"])
def test_cli_bad_host_memory_one_line_exit_2(value):
    for args in (["--host-memory", value], [f"--host-memory={value}"]):
        proc = _cli(str(RECIPES / "tiny-cpu.toml"), "--gpus", "1", *args)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert err[0].startswith("longtrain: error:") and "--host-memory" in err[0] and repr(value) in err[0]


def test_default_host_memory_is_the_gpu_kinds_node(capsys):
    from longtrain.launcher.plan import main

    assert all(g.host_memory_gib > 0 for g in GPUS.values()) and GPUS["h100"].host_memory_gib == 2048
    assert main([str(TINY), "--gpus", "8", "--gpu", "a10", "--json"]) == 0
    pl = json.loads(capsys.readouterr().out)
    assert pl["host"]["node_gib"] == GPUS["a10"].host_memory_gib and pl["gpu"]["host_memory_gib"] == 768
    assert pl["memory_gib"]["host_total"] == pytest.approx(pl["host"]["per_gpu_gib"])
    assert pl["host"]["fits"] and pl["host"]["per_node_gib"] == pytest.approx(8 * pl["memory_gib"]["host_total"])


def test_does_not_fit_when_host_memory_is_too_small(capsys):
    """The 4m recipe (bf16 offloaded inputs): 1,072 GiB per node by the plan; within 1 TiB it does not
    fit, and the longest length is then set by host memory, below the device's."""
    from longtrain.launcher.plan import main

    recipe = str(RECIPES / "llama3-8b-continue-4m.toml")
    assert main([recipe, "--gpus", "8", "--host-memory", "1TiB"]) == 0
    text = capsys.readouterr().out
    assert "host memory per node: 1072 GiB of 1024 GiB (does not fit)" in text
    assert any(line.startswith("note: host memory does not fit") for line in text.splitlines())
    assert main([recipe, "--gpus", "8", "--host-memory", "1TiB", "--json"]) == 0
    pl = json.loads(capsys.readouterr().out)
    L = pl["layout"]
    assert not pl["host"]["fits"] and L["longest_seq_limited_by"] == "host memory"
    assert L["longest_seq_fitting"] < L["seq_len"] <= L["longest_seq_fitting_device"]
    assert pl["memory_gib"]["host_total"] * 8 > 1024
    assert not any(c["fits"] for c in pl["candidates"]) and any(c["fits_device"] for c in pl["candidates"])
    # the host-limited answer fits host memory, the next multiple of 2 x sp x 1024 does not
    r, _ = load_for_plan(recipe, [])
    for n, fits in ((L["longest_seq_fitting"], True), (L["longest_seq_fitting"] + 16384, False)):
        st = r.stages[-1]
        st.seq_len = n
        assert make_plan(r, gpus=8, gpu="h100", host_memory="1TiB").host["fits"] is fits
    assert main([recipe, "--gpus", "8"]) == 0  # 2 TiB, the H100 node's default: fits
    assert "host memory per node: 1072 GiB of 2048 GiB (fits)" in capsys.readouterr().out


@pytest.mark.parametrize("name,host_gib,at_least", [("llama3-8b-continue-16m", 2048, 8388608),
                                                    ("llama3-8b-continue-8m", 1024, 5242880)])
def test_mesa_offload_recipes_fit_one_node(name, host_gib, at_least):
    """`longtrain plan <recipe> --gpus 8 --gpu h100 --json`: the last stage is the longest length that fits
    90% of 80 GiB and the node's host memory (given as --host-memory)."""
    proc = _cli(str(RECIPES / f"{name}.toml"), "--gpus", "8", "--gpu", "h100", "--json",
                "--host-memory", f"{host_gib}GiB")
    assert proc.returncode == 0, proc.stderr
    pl = json.loads(proc.stdout)
    L, M = pl["layout"], pl["memory_gib"]
    assert L["mesa"] and L["activation_checkpointing"] == "offload" and L["sp"] == 8 and L["dp"] == 1
    assert L["seq_len"] == L["longest_seq_fitting"] >= at_least  # issue 34: 8,388,608 in 2 TiB, 5,242,880 in 1 TiB
    # the 16m recipe needs head groups on the device, the 8m recipe fits without (faster)
    assert (L["head_groups"], L["attn_head_chunk"]) == ((8, "auto") if "16m" in name else (1, 0))
    assert M["total"] <= 0.9 * 80 and M["host_total"] * 8 <= host_gib and pl["host"]["fits"]
    r, _ = load_for_plan(str(RECIPES / f"{name}.toml"), [])
    assert r.stages[-1].seq_len == L["seq_len"] and all(s.seq_len % (2 * r.parallel.sp) == 0 for s in r.stages)
