"""TensorBoard as users compare runs (issue 27): two short runs under one runs/ folder, read back with
TensorBoard's own readers: named runs, grouped scalar tags, the HParams table (through the hparams
plugin's handlers), the resolved recipe as text and the passkey heat maps as images."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from helpers import run_train
from longtrain.launcher.metrics import read_jsonl, tb_tag, tensorboard_command

GROUPS = {"train", "perf", "memory", "data", "eval"}
STEPS = 4
EVAL = ["eval.every=2", "eval.passkey=true", "eval.lengths=[128]", "eval.samples=1", "eval.depths=[0.0, 1.0]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/a: dp=2; runs/b: sp=2 (ring), another lr, in-training passkey evaluation every 2 steps."""
    root = tmp_path_factory.mktemp("tb") / "runs"
    procs = {"a": run_train(root / "a", f"training.steps={STEPS}"),
             "b": run_train(root / "b", f"training.steps={STEPS}", "parallel.sp=2", "training.lr=2e-3", *EVAL)}
    return root, procs


def _accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _hparams_table(logdir: Path) -> dict[str, tuple[dict, dict]]:
    """What the HParams tab shows: one session group per run, {name: (hparams, metric values)}, from
    the hparams plugin's own get_experiment / list_session_groups handlers over the event files."""
    from tensorboard import context
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    mux = EventMultiplexer().AddRunsFromDirectory(str(logdir))
    mux.Reload()
    hp_ctx = backend_context.Context(base_plugin.TBContext(
        data_provider=MultiplexerDataProvider(mux, str(logdir)), multiplexer=mux, logdir=str(logdir)))
    req_ctx = context.RequestContext()
    exp = get_experiment.Handler(req_ctx, hp_ctx, "", api_pb2.GetExperimentRequest()).run()
    req = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[
        api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    req.col_params.extend([api_pb2.ColParams(hparam=h.name) for h in exp.hparam_infos]
                          + [api_pb2.ColParams(metric=m.name) for m in exp.metric_infos])
    groups = list_session_groups.Handler(req_ctx, hp_ctx, "", req).run().session_groups
    out = {}
    for g in groups:
        hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in g.hparams.items()}
        out[g.name] = (hp, {m.name.tag: m.value for m in g.metric_values})
    return out


def test_runs_side_by_side_with_grouped_tags(runs):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    root, procs = runs
    mux = EventMultiplexer().AddRunsFromDirectory(str(root))  # what `tensorboard --logdir runs` lists
    mux.Reload()
    assert sorted(mux.Runs()) == ["a", "b"]
    for name in ("a", "b"):
        assert f"tensorboard --logdir {root}" in procs[name].stdout  # run.output_dir elsewhere: its own command
        assert f"(this run: {name})" in procs[name].stdout
        recs = read_jsonl(root / name / "metrics.jsonl")
        steps = [r for r in recs if "loss" in r]
        # metrics.jsonl keeps its flat keys
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_process", "step_time_s",
                    "memory_mb", "data_wait_s"):
            assert all(key in r for r in steps), key
        tags = set(_accumulator(root / name).Tags()["scalars"])
        for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tokens_per_s_per_process",
                    "perf/step_time_s", "memory/used_mb", "data/wait_s"):
            assert tag in tags, (tag, tags)
        assert {t.split("/")[0] for t in tags} <= GROUPS, tags
        loss = _accumulator(root / name).Scalars("train/loss")
        assert [e.step for e in loss] == list(range(1, STEPS + 1))
        assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    b_tags = set(_accumulator(root / "b").Tags()["scalars"])
    assert {"eval/passkey_acc@128", "eval/passkey_digit_acc@128"} <= b_tags


def test_hparams_table_has_one_row_per_run(runs):
    root, _ = runs
    table = _hparams_table(root)
    assert sorted(table) == ["a", "b"]
    keys = ["model.preset", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.attention",
            "data.seq_len", "parallel.sp", "parallel.sp_impl", "parallel.dp_engine", "mesa.enabled",
            "training.activation_checkpointing", "training.loss_chunk", "training.mlp_chunk", "training.lr",
            "training.steps"]
    for name, (hp, metrics) in table.items():
        assert set(keys) <= set(hp), set(keys) - set(hp)
        assert hp["model.dim"] == 128 and hp["model.n_kv_heads"] == 2 and hp["data.seq_len"] == 64
        assert hp["training.steps"] == STEPS and hp["parallel.dp_engine"] == "fsdp2" and hp["mesa.enabled"] is False
        assert hp["training.activation_checkpointing"] in ("none", "full") or hp[
            "training.activation_checkpointing"].startswith("every:")
        last = [r for r in read_jsonl(root / name / "metrics.jsonl") if "loss" in r][-1]
        assert metrics["train/loss"] == pytest.approx(last["loss"], rel=1e-6)  # the final loss, per row
    a, b = table["a"][0], table["b"][0]
    assert (a["parallel.sp"], a["parallel.sp_impl"], a["parallel.dp"]) == (1, "none", 2)
    assert (b["parallel.sp"], b["parallel.sp_impl"], b["parallel.dp"]) == (2, "ring", 1)  # tiny is GQA: ring
    assert (a["training.lr"], b["training.lr"]) == pytest.approx((3e-3, 2e-3))
    evals = [r for r in read_jsonl(root / "b" / "metrics.jsonl") if "eval/passkey_acc@128" in r]
    assert table["b"][1]["eval/passkey_acc@128"] == pytest.approx(evals[-1]["eval/passkey_acc@128"])
    assert "eval/passkey_acc@128" not in table["a"][1]


def test_resolved_recipe_text_and_passkey_heat_maps(runs):
    root, _ = runs
    for name in ("a", "b"):
        acc = _accumulator(root / name)
        assert "run/recipe" in acc.Tags()["tensors"]
        shown = acc.Tensors("run/recipe")[0].tensor_proto.string_val[0].decode()
        assert (root / name / "recipe.resolved.toml").read_text() in shown
    assert "sp = 2" in _accumulator(root / "b").Tensors("run/recipe")[0].tensor_proto.string_val[0].decode()
    assert _accumulator(root / "a").Tags()["images"] == []  # no evaluation, no picture
    acc = _accumulator(root / "b")
    assert acc.Tags()["images"] == ["eval/passkey"]
    images = acc.Images("eval/passkey")
    assert [e.step for e in images] == [2, 4]  # one heat map per evaluation
    from PIL import Image

    for e in images:
        img = Image.open(io.BytesIO(e.encoded_image_string))
        assert img.format == "PNG" and img.size == (e.width, e.height) and e.width > 200 and e.height > 150
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # a drawn figure, not a blank canvas


def test_printed_command_and_tag_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tensorboard_command(Path("runs/tiny-cpu")).endswith(" --logdir runs")
    assert tensorboard_command(tmp_path / "exp" / "mesa-on").endswith(" --logdir exp")
    outside = tmp_path.parent / "elsewhere" / "run1"
    assert tensorboard_command(outside).endswith(f" --logdir {outside.parent}")
    assert [tb_tag(k) for k in ("loss", "mfu", "memory_mb", "data_wait_s", "data/web/share", "eval/ppl@128")] == [
        "train/loss", "perf/mfu", "memory/used_mb", "data/wait_s", "data/web/share", "eval/ppl@128"]
