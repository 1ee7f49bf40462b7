"""TensorBoard events, a JSON-lines log and the rank-0 progress line.

TensorBoard (docs/tensorboard.md): events go straight into the run folder, so `tensorboard --logdir
runs` lists every run by its folder name; scalars are grouped by tag prefix (train/, perf/, memory/,
data/, eval/, moh/); each run also writes its main recipe values for the HParams plugin, the resolved
recipe as text and evaluation heat maps as images. metrics.jsonl keeps the flat keys (`loss`,
`tokens_per_s`, ...): TB_TAGS maps them to their TensorBoard tags.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("longtrain")

# dense bf16 peak FLOP/s per GPU, for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10": 125e12, "L40": 181e12,
              "V100": 125e12, "4090": 165e12}



def setup_logging(is_main: bool) -> None:
    """Console logging: INFO on the main process, warnings only on the others."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)

def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def train_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters (input embedding excluded: a lookup) plus causal
    attention counted once, 6 * seq_len * n_heads * head_dim per full layer (the common
    12*L*H*Q*T form counts the masked half too, torchtitan #341); a window of N keys costs
    min(N, seq_len)/seq_len x 2 of that, lightning layers have no quadratic term."""
    from longtrain.models.spans import layer_plan

    n = cfg.n_params - cfg.vocab_size * cfg.dim  # input embedding: no matmul
    attn = 0.0
    for span in layer_plan(list(cfg.attention or ["full"]), cfg.n_layers):
        if span.kind == "full":
            attn += 6 * seq_len * cfg.n_heads * cfg.head_dim
        elif span.kind == "window":
            w = min(span.window or seq_len, seq_len)
            attn += 12 * (w - w * w / (2 * seq_len)) * cfg.n_heads * cfg.head_dim
    return 6.0 * n + attn


def memory_mb(device: torch.device) -> float:
    """CUDA max allocated on GPU, process RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# metrics.jsonl key -> TensorBoard tag. The prefix is the dashboard's group; keys that already hold a
# "/" (data/NAME/tokens, eval/..., moh/...) are tags as they are; any other flat key goes under train/.
TB_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "skipped_steps": "train/skipped_steps", "aux_loss": "train/aux_loss",
    "tokens_per_s": "perf/tokens_per_s", "tokens_per_s_per_process": "perf/tokens_per_s_per_process",
    "step_time_s": "perf/step_time_s", "mfu": "perf/mfu", "tokens_per_step": "perf/tokens_per_step",
    "memory_mb": "memory/used_mb",
    "data_wait_s": "data/wait_s",
}
TEXT_RECIPE_TAG = "run/recipe"         # the resolved recipe (TOML), as a text summary
PASSKEY_IMAGE_TAG = "eval/passkey"     # the passkey heat map at each in-training evaluation


def tb_tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key."""
    return key if "/" in key else TB_TAGS.get(key, f"train/{key}")


def _shown_path(p: Path) -> str:
    """`p` relative to the working directory when it lies inside it, else absolute."""
    p = Path(os.path.abspath(p))
    try:
        return str(p.relative_to(Path.cwd())) or "."
    except ValueError:
        return str(p)


def tensorboard_command(out_dir: str | os.PathLike) -> str:
    """The command that shows this run by its folder name next to its siblings: `tensorboard --logdir
    runs` for the default runs/<name>, the run folder's parent for a run.output_dir elsewhere."""
    exe = "tensorboard"
    if shutil.which("tensorboard") is None:  # a venv that is not activated: name its own tensorboard
        local = Path(sys.executable).parent / "tensorboard"
        if local.exists():
            exe = _shown_path(local)
    return f"{exe} --logdir {_shown_path(Path(out_dir).parent)}"


def tensorboard_hint(recipe: Any) -> str | None:
    """The line longtrain prints about TensorBoard (None when metrics.tensorboard is off)."""
    if not recipe.metrics.tensorboard:
        return None
    return f"TensorBoard: {tensorboard_command(recipe.output_dir)}  (this run: {Path(recipe.output_dir).name})"


def _hparam_value(v: Any) -> bool | float | str:
    if isinstance(v, bool):
        return v
    if v is None:
        return 0
    if isinstance(v, (int, float)):
        return v
    return str(v)


def run_hparams(trainer: Any) -> dict[str, bool | float | str]:
    """The recipe values runs are compared by, for the HParams plugin (keys named as in recipes).

    `trainer` is read duck-typed: recipe, model.cfg, layout (world, dp, sp), sp_attention.impl,
    data.global_batch.
    Settings an older recipe schema lacks are read with defaults (chunk sizes: 0)."""
    r, cfg, lay = trainer.recipe, trainer.model.cfg, trainer.layout
    t, p, m = r.training, r.parallel, r.mesa
    ac = getattr(t, "activation_checkpointing", False)
    if isinstance(ac, bool):
        ac = "full" if ac else "none"
    hp = {
        "model.preset": r.model.preset or "custom",
        "model.init_from": r.model.init_from or "none",
        "model.params_M": round(cfg.n_params / 1e6, 3),
        "model.dim": cfg.dim, "model.n_layers": cfg.n_layers, "model.n_heads": cfg.n_heads,
        "model.n_kv_heads": cfg.n_kv_heads, "model.head_dim": cfg.head_dim, "model.ffn_dim": cfg.ffn_dim,
        "model.vocab_size": cfg.vocab_size, "model.attention": ",".join(cfg.attention or ["full"]),
        "model.moh": cfg.moh is not None, "model.rope_theta": cfg.rope_theta,
        "data.seq_len": r.data.seq_len,
        "data.seq_len_max": max([r.data.seq_len, *[s.seq_len or 0 for s in r.stages]]),
        "parallel.world": lay.world, "parallel.dp": lay.dp, "parallel.sp": lay.sp,
        "parallel.sp_impl": trainer.sp_attention.impl if lay.sp > 1 else "none",
        "parallel.dp_engine": p.dp_engine,
        "mesa.enabled": bool(m.enabled), "mesa.bits": m.bits if m.enabled else 0,
        "training.activation_checkpointing": ac,
        "training.loss_chunk": getattr(t, "loss_chunk", 0),
        "training.mlp_chunk": getattr(t, "mlp_chunk", 0),
        "training.attn_head_chunk": getattr(t, "attn_head_chunk", 0),
        "training.optimizer_offload": bool(getattr(t, "optimizer_offload", False)),
        "training.lr": t.lr, "training.steps": t.steps, "training.micro_batch": t.micro_batch,
        "training.grad_accum": t.grad_accum, "training.global_batch": trainer.data.global_batch,
        "training.dtype": t.dtype, "training.compile": bool(t.compile),
    }
    return {k: _hparam_value(v) for k, v in hp.items()}


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


class Metrics:
    """Rank 0 writes TensorBoard events, metrics.jsonl (every step) and a progress line."""

    def __init__(self, out_dir: Path, *, is_main: bool, total_steps: int, log_every: int,
                 tensorboard: bool = True) -> None:
        self.is_main, self.total, self.every = is_main, total_steps, log_every
        self.out_dir = Path(out_dir)
        self.writer = None
        self.jsonl = None
        self.t_start = time.perf_counter()
        self.steps_timed = 0
        self.time_timed = 0.0
        self._no_images = False
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # in the run folder itself: TensorBoard names a run by its folder under --logdir
                self.writer = SummaryWriter(str(out_dir))
                log.info("TensorBoard: %s  (this run: %s)", tensorboard_command(out_dir), self.out_dir.name)

    def _write_scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(tb_tag(k), v, step)
        self.writer.flush()

    def step(self, step: int, scalars: dict[str, float], step_time: float, first_step: int) -> None:
        if not self.is_main:
            return
        if step > first_step + 1:  # the first step pays one-off costs; keep it out of the ETA
            self.steps_timed += 1
            self.time_timed += step_time
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if step % self.every == 0 or step == self.total or step == first_step + 1:
            if self.writer is not None:
                self._write_scalars(step, scalars)
            per = self.time_timed / self.steps_timed if self.steps_timed else step_time
            eta = per * (self.total - step)
            print(f"step {step:>6}/{self.total} | loss {scalars['loss']:.4f} | lr {scalars['lr']:.2e} | "
                  f"gnorm {scalars['grad_norm']:.3f} | {scalars['tokens_per_s']:,.0f} tok/s | "
                  f"{step_time:.2f} s/step | mem {scalars['memory_mb']:.0f} MiB | ETA {fmt_duration(eta)}",
                  flush=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Extra scalars (eval results, MoH usage) for TensorBoard and metrics.jsonl."""
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            self._write_scalars(step, values)

    def describe_run(self, trainer: Any) -> None:
        """Once per (re)start: the main recipe values for the HParams plugin (run_hparams) and the
        resolved recipe (recipe.resolved.toml in the run folder) as a text summary."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata as hp_meta
        from tensorboard.plugins.hparams import plugin_data_pb2

        # a SessionStartInfo only, no Experiment: the plugin then builds its table from every run's
        # values (an Experiment from one run would fix the columns for all of them)
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for k, v in run_hparams(trainer).items():
            if isinstance(v, bool):
                start.hparams[k].bool_value = v
            elif isinstance(v, (int, float)):
                start.hparams[k].number_value = float(v)
            else:
                start.hparams[k].string_value = v
        md = hp_meta.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_start_info=start))
        self.writer.file_writer.add_summary(
            Summary(value=[Summary.Value(tag=hp_meta.SESSION_START_INFO_TAG, metadata=md)]))
        resolved = self.out_dir / "recipe.resolved.toml"
        if resolved.is_file():
            from torch.utils.tensorboard.summary import text

            summary = text(TEXT_RECIPE_TAG, f"```toml\n{resolved.read_text()}\n```")
            summary.value[0].tag = TEXT_RECIPE_TAG  # as named (add_text would append "/text_summary")
            summary.value[0].tensor.tensor_shape.ClearField("dim")  # one string: shown as markdown, not a table
            self.writer.file_writer.add_summary(summary, trainer.step)
        self.writer.flush()

    def image(self, step: int, tag: str, png: bytes) -> None:
        """An encoded PNG as a TensorBoard image summary."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        w, h = _png_size(png)
        img = Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=png)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)
        self.writer.flush()

    def passkey_heatmap(self, step: int, res: dict[str, Any], tag: str = PASSKEY_IMAGE_TAG) -> None:
        """The passkey accuracy heat map (eval_report.plot_passkey) of one evaluation as an image."""
        if self.writer is None or self._no_images:
            return
        try:
            from longtrain.launcher.eval.report import plot_passkey

            buf = io.BytesIO()
            plot_passkey(res, buf, f"{self.out_dir.name}, step {step}: passkey accuracy (%)")
        except ImportError:
            self._no_images = True
            log.warning("no heat map images in TensorBoard: matplotlib is not installed (pip install "
                        "'longtrain[plot]'); the eval/ scalars are logged")
            return
        self.image(step, tag, buf.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
