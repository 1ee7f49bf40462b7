"""TensorBoard scalars, a JSON-lines log and the rank-0 progress line."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("longtrain")

# dense bf16 peak FLOP/s per GPU, for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10": 125e12, "L40": 181e12,
              "V100": 125e12, "4090": 165e12}


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


class Metrics:
    """Rank 0 writes TensorBoard events, metrics.jsonl (every step) and a progress line."""

    def __init__(self, out_dir: Path, *, is_main: bool, total_steps: int, log_every: int,
                 tensorboard: bool = True) -> None:
        self.is_main, self.total, self.every = is_main, total_steps, log_every
        self.writer = None
        self.jsonl = None
        self.t_start = time.perf_counter()
        self.steps_timed = 0
        self.time_timed = 0.0
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

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
                for k, v in scalars.items():
                    self.writer.add_scalar(k, v, step)
                self.writer.flush()
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
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
