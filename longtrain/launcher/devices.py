"""Which device a process drives: GPUs visible per node vs processes, per-task GPU binding under
srun/mpirun, and TF32. Decided without importing torch where no GPU driver exists (the launcher
stays light)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from longtrain.errors import LaunchError

if TYPE_CHECKING:
    import torch


def _visible_gpus() -> str:
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={v!r})" if v is not None else ""


GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def per_task_binding(n_visible: int, procs_per_node: int, source: str) -> bool:
    """Whether each srun/mpirun task was given its own GPU(s): fewer visible than tasks on the node,
    with CUDA_VISIBLE_DEVICES set per task (torchrun workers share one environment, so never)."""
    return (source in ("slurm", "mpi") and 0 < n_visible < procs_per_node
            and os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in ("", "-1"))


def cuda_device_index(local_rank: int, procs_per_node: int, n_visible: int, source: str) -> int:
    """The CUDA device this process drives: `local_rank` when the node's GPUs are all visible, its
    first visible device under per-task binding; LaunchError when neither fits."""
    if local_rank < n_visible and n_visible >= procs_per_node:
        return local_rank
    if per_task_binding(n_visible, procs_per_node, source):
        return 0
    raise LaunchError(f"local rank {local_rank} of {procs_per_node} needs GPU {local_rank} but only {n_visible} "
                      f"{'is' if n_visible == 1 else 'are'} visible{_visible_gpus()}")


def check_gpus(procs_per_node: int, device: str = "auto", source: str = "torchrun") -> bool:
    """Whether the run uses CUDA; LaunchError if `procs_per_node` processes need more GPUs than visible
    (unless srun/mpirun bound a GPU to each task: `source` "slurm"/"mpi", see per_task_binding)."""
    if device == "cpu":
        return False
    if device == "auto" and "torch" not in sys.modules and not any(os.path.exists(p) for p in GPU_DEVICE_NODES):
        return False  # no GPU driver here: decided without importing torch (the launcher stays light)
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise LaunchError(f"training.device = 'cuda' but no CUDA GPU is visible{_visible_gpus()}")
    if not available:
        return False
    n = torch.cuda.device_count()
    if procs_per_node > n and not per_task_binding(n, procs_per_node, source):
        raise LaunchError(f"{procs_per_node} processes per node need {procs_per_node} GPUs but only {n} "
                          f"{'is' if n == 1 else 'are'} visible{_visible_gpus()}: start at most {n} per node "
                          "(--nproc / --gpus-per-node) or set training.device = 'cpu'")
    return True


def set_tf32(device: torch.device, enabled: bool) -> bool:
    """On CUDA, let fp32 matmuls and convolutions run on TF32 tensor cores (`training.tf32`): about 8x
    the fp32 rate on A100/H100, products rounded to a 10-bit mantissa, fp32 accumulation. Returns
    whether TF32 is now on; CPU runs are left alone (False)."""
    import torch

    if device.type != "cuda":
        return False
    # the allow_tf32 setters keep torch >= 2.9's fp32_precision in step (mixing the two APIs' setters
    # makes later reads of allow_tf32, e.g. by inductor, raise); set_float32_matmul_precision would
    # also switch CPU (mkldnn) matmuls
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled
