"""The training loop: data -> shard -> forward/backward -> reduce -> clip -> step -> log -> checkpoint.

Who does what (docs/architecture.md): the model comes from launcher/build.py, the engine (FSDP2 /
DDP / DeepSpeed, optimizer, schedule) from launcher/optim.py, micro-batches and stages from
launcher/feed.py, the dp x sp mesh and batch sharding from parallel/mesh.py. This file only
runs steps, logs them and saves/resumes.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longtrain import ranges
from longtrain.errors import CheckpointError, ConfigError, TrainingError
from longtrain.launcher import signals
from longtrain.launcher.build import build_for_engine
from longtrain.launcher.checkpoint import Checkpointer, check_checkpoint, read_meta
from longtrain.launcher.config import Recipe
from longtrain.launcher.resolved import save_resolved
from longtrain.launcher.data.corpus import corpus_tokenizer
from longtrain.launcher.data.tokenizers import build_tokenizer
from longtrain.launcher.devices import set_tf32
from longtrain.launcher.env import init_distributed
from longtrain.launcher.faults import fault_nan, first_error, peer_lost, peer_lost_error, step_begins
from longtrain.launcher.feed import TrainingData
from longtrain.launcher.metrics import (Metrics, memory_mb, peak_flops, setup_logging, tensorboard_hint,
                                        train_flops_per_token)
from longtrain.launcher.optim import make_engine
from longtrain.launcher.planned import PlanCheck
from longtrain.parallel.mesh import SPAttention, make_layout, shard_batch
from longtrain.parallel.rules import check_sequence_length

log = logging.getLogger("longtrain")


class Trainer:
    def __init__(self, recipe: Recipe) -> None:
        r = self.recipe = recipe
        self.env, self.device = init_distributed(r.training.device, r.training.collective_timeout_s, sp=r.parallel.sp,
                                                 cpu_collectives=r.training.optimizer_offload)
        setup_logging(self.env.is_main)
        self.layout = make_layout(r.parallel.sp)
        check_sequence_length(r.data.seq_len, self.layout.sp, r.parallel.sp_layout)
        self.profiler = None  # [profile] (launcher/profile.py is imported only when it is set)
        if r.profile.step_list():
            from longtrain.launcher.profile import StepProfiler

            self.profiler = StepProfiler(r.profile, r.output_dir, rank=self.layout.rank, world=self.layout.world,
                                         device=self.device, compiled=r.training.compile)
        spec = corpus_tokenizer(r.data, self._tokenizer_spec(), explicit=r.data.tokenizer != "auto")
        self.tokenizer = build_tokenizer(spec)
        r.data.tokenizer = spec  # the resolved recipe (and eval) name the tokenizer actually used
        multi = dist.is_initialized() and dist.get_world_size() > 1
        self.data = TrainingData(r, self.layout, spec, local_main=self.env.local_rank == 0,
                                 sync=first_error if multi else None)
        self.dtype = torch.bfloat16 if r.training.dtype == "bf16" else torch.float32
        self.tf32 = set_tf32(self.device, r.training.tf32)  # fp32 on tensor cores (CUDA only)
        self.model, self.mesa = build_for_engine(r, self.tokenizer.vocab_size, self.device, self.dtype)
        self.engine = make_engine(self.model, r, self.device, self.dtype)
        self.sp_attention = SPAttention.from_parallel(r.parallel, self.model.cfg.n_heads, self.model.cfg.n_kv_heads)
        self.plan_check = self._plan_check()
        if self.layout.sp > 1 and self.sp_attention.impl in ("ring", "tokenring"):
            from longtrain.parallel.comm import warm_up

            warm_up(self.layout.sp_group, self.device, one_communicator=r.parallel.sp_one_communicator)
        self.step = 0
        self.bad_streak = 0   # consecutive steps whose update was skipped (non-finite loss / grad norm)
        self.bad_total = 0
        self.checkpointer = Checkpointer(r.checkpoint_dir, r.checkpoint.keep_last)
        # background saves run their collectives in a thread: on a group of their own, never the training's
        self.async_group = (dist.new_group(backend="gloo") if r.checkpoint.async_save and self.engine.name != "deepspeed"
                            else None)
        self.metrics: Metrics | None = None

    def _plan_check(self) -> PlanCheck:
        """The planner's memory (and step time) beside the run's (launcher/planned.py)."""
        r, lay = self.recipe, self.layout
        replicate = 1
        if r.parallel.dp_engine == "fsdp2" and r.parallel.dp_replicate != 1:
            from longtrain.launcher.replicate import resolve_dp_replicate

            replicate = resolve_dp_replicate(r, self.model.cfg, self.device, quiet=True)
        return PlanCheck(r, self.model.cfg, self.model, getattr(self.engine, "optimizer", None), world=lay.world,
                         sp=lay.sp, impl=self.sp_attention.impl, device=self.device, replicate=replicate,
                         is_main=self.env.is_main)

    def _tokenizer_spec(self) -> str:
        """The recipe's tokenizer: auto/bytes with init_from = as init_from was trained (else bytes)."""
        r = self.recipe
        if r.model.init_from and r.data.tokenizer in ("auto", "bytes"):
            from longtrain.launcher.loading import init_from_tokenizer

            return init_from_tokenizer(r.model.init_from) or "bytes"
        return "bytes" if r.data.tokenizer == "auto" else r.data.tokenizer

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        lay, d = self.layout, self.data
        meta = {"data_position": d.position, "world_size": lay.world, "dp": lay.dp, "sp": lay.sp,
                "global_batch": d.global_batch, "seq_len": d.seq_len, "rope_theta": self.model.cfg.rope_theta,
                "model": self.model.cfg.to_dict(), **self.engine.checkpoint_meta()}
        with ranges.scope("checkpoint"):
            self.engine.save(self.checkpointer, self.step, meta, background=self.async_group is not None,
                             group=self.async_group)

    def resume(self) -> None:
        r = self.recipe
        self.checkpointer.prepare()
        if r.checkpoint.resume == "none":
            return
        if r.checkpoint.resume == "auto":
            path = self.checkpointer.resume_point()
        else:
            path = r.checkpoint.resume
            problems = check_checkpoint(Path(path))
            if problems:
                raise CheckpointError(f"checkpoint {path} is unusable: {'; '.join(problems[:3])}")
        if path is None:
            return
        meta = read_meta(path)
        ours = self.model.cfg.to_dict()
        diff = [k for k in (meta.get("model") or {}) if k != "rope_theta" and meta["model"][k] != ours.get(k)]
        if diff:
            raise ConfigError(f"checkpoint {path} was written for a different model (fields differ: {', '.join(diff)})")
        self.step = int(meta["step"])
        self.engine.load(path, self.step, Checkpointer.load)
        self.data.resume(int(meta["data_position"]), int(meta.get("seq_len") or 0) or None)  # (inside a stage)
        if meta.get("rope_theta") and meta["rope_theta"] != self.model.cfg.rope_theta:
            self.model.set_rope(theta=float(meta["rope_theta"]))
        if meta.get("global_batch") not in (None, self.data.global_batch):
            log.warning("global batch changed from %s to %s: the sample order continues from position %d",
                        meta.get("global_batch"), self.data.global_batch, self.data.position)
        log.info("resumed from %s at step %d (data position %d, written by %s ranks)", path, self.step,
                 self.data.position, meta.get("world_size"))

    # ---- one step -------------------------------------------------------------------------
    def _apply_stage(self) -> None:
        theta = self.data.apply_stage(self.step)
        if theta is not None and theta != self.model.cfg.rope_theta:
            log.info("stage at step %d: rope_theta %g -> %g", self.step, self.model.cfg.rope_theta, theta)
            self.model.set_rope(theta=theta)

    def _shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A micro-batch on the device, this rank's tokens only, with its ops (host bounds: no device sync)."""
        lay = self.layout
        return shard_batch({k: batch[k] for k in ("tokens", "labels", "positions")}, lay.sp_group, lay.sp,
                           self.sp_attention, self.device, cu_seqlens=batch["cu_seqlens"])

    def train_step(self) -> dict[str, float]:
        r, lay, engine = self.recipe, self.layout, self.engine
        step_seed = r.run.seed * 7919 + self.step * 104729 + lay.rank
        torch.manual_seed(step_seed)  # exact resume, any world size
        if self.mesa is not None:  # stochastic rounding too
            self.mesa.reseed(step_seed * 1_000_003 + 17)
        self._apply_stage()
        step_begins(self.step + 1)  # fault hooks (LONGTRAIN_FAULT)
        with ranges.scope("data"):
            micro = [self._shard(b) for b in self.data.micro_batches(self.step)]
        local_count = sum(int((b["labels"] != -100).sum()) for b in micro)
        # on the training device: NCCL has no CPU tensors (make gpu-check found this on its first run)
        counts = torch.tensor([float(local_count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        global_count = counts.item()
        scale = lay.world / max(global_count, 1.0)  # engines average grads over all ranks
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, b in enumerate(micro):
            with engine.micro_batch(last=i == len(micro) - 1):
                with ranges.scope("forward"):
                    loss = engine(b["tokens"], b["positions"], b["ops"], b["labels"], loss_chunk=r.training.loss_chunk)
                if fault_nan(self.step + 1):
                    loss = loss * float("nan")
                total = loss * scale
                aux = self.model.aux_loss()
                if aux is not None:
                    total = total + aux / len(micro)  # engines average over ranks
                    aux_sum += aux.detach().double()
                with ranges.scope("backward"):
                    engine.backward(total)
            loss_sum += loss.detach().double()
        dist.all_reduce(loss_sum)
        # NaN guard: the global loss and the global grad norm are the same on every rank, so all ranks
        # agree on skipping without another collective; the weights keep the last good update
        finite = math.isfinite(loss_sum.item())
        with ranges.scope("optimizer"):
            gnorm, stepped = engine.step(r.training.grad_clip, lambda g: finite and math.isfinite(g))
        self._count_bad(stepped, finite)
        if self.mesa is not None and lay.world > 1:
            self._sync_mesa_ranges()
        self.step += 1
        self.data.advance()
        out = {"loss": loss_sum.item() / max(global_count, 1.0), "tokens": global_count}
        if aux_sum.item():
            dist.all_reduce(aux_sum)
            out["aux_loss"] = aux_sum.item() / lay.world / len(micro)
        out["grad_norm"] = gnorm
        out["skipped_steps"] = self.bad_total
        return out

    def _count_bad(self, stepped: bool, loss_finite: bool) -> None:
        if stepped:
            self.bad_streak = 0
            return
        self.bad_streak += 1
        self.bad_total += 1
        if self.env.is_main:
            log.warning("step %d: non-finite %s; update skipped (%d in a row, %d in this run; the run stops after "
                        "training.max_bad_steps = %d in a row)", self.step + 1,
                        "loss" if not loss_finite else "gradient norm", self.bad_streak, self.bad_total,
                        self.recipe.training.max_bad_steps)

    def _sync_mesa_ranges(self) -> None:
        """Average Mesa's running ranges over all ranks, once per step (one all-reduce).

        Each rank observes its own tokens, so the estimates would drift apart, while a checkpoint
        holds one copy (replicated buffers are saved once): every rank carrying the same state is
        what makes a resumed run continue exactly, at any world size."""
        bufs = [b for n, b in self.mesa.named_buffers() if n.endswith((".shift", ".span"))]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat)
        flat /= self.layout.world
        i = 0
        for b in bufs:
            b.copy_(flat[i:i + b.numel()].view_as(b))
            i += b.numel()

    # ---- loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        r, lay = self.recipe, self.layout
        self.resume()
        out_dir = r.output_dir
        if self.env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(r, out_dir / "recipe.resolved.toml", extra={
                "world_size": lay.world, "dp": lay.dp, "sp": lay.sp, "global_batch": self.data.global_batch,
                "tokens_per_step": self.data.global_batch * r.data.seq_len, "n_params": self.model.cfg.n_params,
                "device": str(self.device), "launcher": self.env.source, "data_sources": self.data.planned_sources()})
            log.info("run folder %s | model %.2fM params | world %d (dp %d x sp %d, %s) | %d tokens/step | device %s",
                     out_dir, self.model.cfg.n_params / 1e6, lay.world, lay.dp, lay.sp,
                     self.sp_attention.impl if lay.sp > 1 else "no sp", self.data.tokens_per_step(), self.device)
        self.metrics = Metrics(out_dir, is_main=self.env.is_main, total_steps=r.training.steps,
                               log_every=r.metrics.log_every, tensorboard=r.metrics.tensorboard)
        self.metrics.describe_run(self)  # HParams values and the resolved recipe for TensorBoard
        history: list[float] = []
        if r.checkpoint.save_on_signal:
            signals.install(r.checkpoint.save_on_signal)
        try:
            self._loop(history, first_step=self.step)
        except (RuntimeError, dist.DistError) as e:
            if not peer_lost(e):
                raise
            raise peer_lost_error(e, self.step + 1, r.training.collective_timeout_s) from None
        finally:
            self.data.close()
            self.metrics.close()
        return {"first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
                "steps": self.step, "losses": history}

    def step_scalars(self, res: dict[str, float], dt: float, peak: float | None) -> dict[str, float]:
        """What a step logs; MFU and tokens per step at the sequence length of the current stage."""
        tok_s = res["tokens"] / dt
        scalars = {"loss": res["loss"], "lr": self.engine.lr(), "grad_norm": res["grad_norm"], "tokens_per_s": tok_s,
                   "tokens_per_s_per_process": tok_s / self.layout.world, "step_time_s": dt,
                   "tokens_per_step": float(self.data.tokens_per_step()), "memory_mb": memory_mb(self.device)}
        if "aux_loss" in res:
            scalars["aux_loss"] = res["aux_loss"]
        if self.bad_total:
            scalars["skipped_steps"] = float(self.bad_total)
        if peak:
            flops_per_token = train_flops_per_token(self.model.cfg, self.data.seq_len)
            scalars["mfu"] = flops_per_token * tok_s / self.layout.world / peak
        scalars["data_wait_s"] = self.data.prefetch.last_wait_s
        return {**scalars, **self.data.source_scalars()}

    def _loop(self, history: list[float], first_step: int) -> None:
        """The step loop: train, log, evaluate, checkpoint; stop on a signal or too many bad steps."""
        r = self.recipe
        peak = peak_flops(self.device)
        evaluator = None
        if r.eval.every:
            from longtrain.launcher.eval.in_training import in_training_eval as evaluator
        while self.step < r.training.steps:
            n = self.step + 1
            with self.profiler.step(n, self.model) if self.profiler is not None else nullcontext():
                self.plan_check.before(n)
                t0 = time.perf_counter()
                res = self.train_step()
                dt = time.perf_counter() - t0
                history.append(res["loss"])
                self.metrics.step(self.step, self.step_scalars(res, dt, peak), dt, first_step)
                planned = self.plan_check.after(n, self.data.seq_len, r.training.steps, dt)
                if planned:
                    self.metrics.scalars(self.step, planned)
                self._log_moh_usage()
                if evaluator is not None and self.step % r.eval.every == 0:
                    with ranges.scope("eval"):
                        self.metrics.scalars(self.step, evaluator(self))
                self._after_step()
        self.checkpointer.wait()  # the last background save is published before the run ends

    def _after_step(self) -> None:
        """Stop on too many bad steps; checkpoint at the interval, the end, or on a stop signal."""
        r = self.recipe
        if self.bad_streak >= r.training.max_bad_steps:
            self.checkpointer.wait()
            last = self.checkpointer.latest()
            raise TrainingError(
                f"stopping at step {self.step}: {self.bad_streak} consecutive steps with a non-finite loss or "
                f"gradient norm (training.max_bad_steps = {r.training.max_bad_steps}); the newest checkpoint, "
                f"{last.name if last else 'none'}, holds weights from before them (lower training.lr, or "
                "check the data)")
        self.checkpointer.poll()  # publishes a finished background save
        saved = self.bad_streak == 0 and (self.step % r.checkpoint.interval == 0 or self.step == r.training.steps)
        if saved:
            self.save()
        if r.checkpoint.save_on_signal and self._signal_received():
            if not saved and self.bad_streak == 0:
                self.save()
            self.checkpointer.wait()
            last = self.checkpointer.latest()
            raise signals.Preempted(
                f"received {signals.requested or 'a stop signal (on another rank)'} during step {self.step}: "
                f"checkpoint {last.name if last else 'none'} is saved; exiting with status "
                f"{signals.PREEMPTED_EXIT} (requeue). Rerun the same command to resume.")

    def _signal_received(self) -> bool:
        """Whether any rank got a save-on-signal signal: one tiny all-reduce per step, so all agree."""
        flag = torch.tensor([1.0 if signals.requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _log_moh_usage(self) -> None:
        if self.recipe.model.moh is None or self.step % self.recipe.metrics.log_every:
            return
        usage = {}
        for name, m in self.model.named_modules():
            u = getattr(m, "head_usage", None)
            if isinstance(u, torch.Tensor):
                layer = name.split(".")[1] if name.startswith("layers.") else name
                for h, val in enumerate(u.tolist()):
                    usage[f"moh/layer{layer}/head{h}"] = float(val)
        if usage:
            self.metrics.scalars(self.step, usage)


def train(recipe: Recipe, dry_run: bool = False) -> dict[str, Any]:
    """Run (or with dry_run, only set up and describe) training for `recipe` in this process."""
    try:
        trainer = Trainer(recipe)
        if dry_run:
            lay = trainer.layout
            if trainer.env.is_main:
                print(f"dry run OK: world {lay.world} = dp {lay.dp} x sp {lay.sp}; model "
                      f"{trainer.model.cfg.n_params / 1e6:.2f}M params; data {trainer.data.corpus.n_samples} samples of "
                      f"{recipe.data.seq_len} tokens; global batch {trainer.data.global_batch} samples; "
                      f"{recipe.training.steps} steps")
            return {"dry_run": True}
        result = trainer.fit()
        if trainer.env.is_main:
            _print_result(trainer, result)
        return result
    finally:
        if dist.is_initialized():
            from longtrain.parallel.comm import close_process_groups
            close_process_groups()


def _print_result(trainer: Trainer, result: dict[str, Any]) -> None:
    recipe, ls = trainer.recipe, result["losses"]
    if ls:
        tail = ls[-10:]
        print(f"done: {result['steps']} steps | first loss {ls[0]:.4f} | last loss {ls[-1]:.4f} "
              f"(mean of last {len(tail)}: {sum(tail) / len(tail):.4f}) | run folder {recipe.output_dir}", flush=True)
        if recipe.metrics.tensorboard:
            print(tensorboard_hint(recipe), flush=True)
    else:
        print(f"nothing to do: the checkpoint in {trainer.checkpointer.root} is already at step "
              f"{trainer.step} >= training.steps = {recipe.training.steps} (raise training.steps, "
              "or start fresh with --set checkpoint.resume=none or another run.name)", flush=True)
