"""The training loop: data -> shard -> forward/backward -> reduce -> clip -> step -> log -> checkpoint."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longtrain.errors import CheckpointError, ConfigError, PeerLost, TrainingError
from longtrain.launcher.checkpoint import Checkpointer, check_checkpoint, read_meta
from longtrain.launcher import signals
from longtrain.launcher.config import Recipe, save_resolved
from longtrain.launcher.corpus import Prefetcher, build_corpus, corpus_tokenizer
from longtrain.launcher.data import build_tokenizer, collate
from longtrain.launcher.env import init_distributed, set_tf32
from longtrain.launcher.layout import make_layout, resolve_sp_impl, setup_logging
from longtrain.launcher.metrics import Metrics, memory_mb, peak_flops, tensorboard_hint, train_flops_per_token
from longtrain.models import LocalAttention, Transformer

log = logging.getLogger("longtrain")


_LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL error",
                    "Timed out", "timed out", "Connection refused", "remote process exited")


DATA_TRACE_ENV = "LONGTRAIN_DATA_TRACE"  # test hook: where ranks log the samples they train on


def _first_error(error: str | None) -> str | None:
    """Every rank's data-preparation error (or None), gathered: the first one, the same on all ranks."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), None)


def _peer_lost(e: BaseException) -> bool:
    """A collective failed because another process is gone or stuck (gloo / NCCL messages)."""
    return isinstance(e, dist.DistError) or any(s in str(e) for s in _LOST_PEER_SIGNS)


def _fault_slow() -> None:
    """Test hook LONGTRAIN_FAULT='slow_steps:SECONDS': sleep that long in every step."""
    spec = os.environ.get("LONGTRAIN_FAULT", "")
    if spec.startswith("slow_steps:"):
        time.sleep(float(spec.split(":", 1)[1]))


def _fault_nan(step: int) -> bool:
    """Test hook LONGTRAIN_FAULT='nan_loss:A-B': the loss of steps A..B (1-based) becomes NaN."""
    spec = os.environ.get("LONGTRAIN_FAULT", "")
    if not spec.startswith("nan_loss:"):
        return False
    a, _, b = spec.split(":", 1)[1].partition("-")
    return int(a) <= step <= int(b or a)


def lr_lambda(recipe: Recipe):
    t = recipe.training

    def f(step: int) -> float:  # step = optimizer steps taken so far
        if t.warmup and step < t.warmup:
            return (step + 1) / t.warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


def _check_vocab(cfg: Any, tokenizer_vocab: int) -> None:
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")


def configure_memory(model: Transformer, recipe: Recipe) -> None:
    """The recipe's memory settings on the model: checkpointing policy, loss chunk, MLP tiles."""
    t = recipe.training
    model.activation_checkpointing = t.activation_checkpointing
    model.loss_chunk = t.loss_chunk  # output + loss in token chunks: no [S, vocab] tensor
    model.set_mlp_chunk(t.mlp_chunk)


def build_model(recipe: Recipe, tokenizer_vocab: int) -> Transformer:
    """The whole model on CPU (DDP and DeepSpeed engines: every rank holds all of it)."""
    if recipe.model.init_from:  # an HF folder or a longtrain checkpoint / run folder (+ RoPE, span overrides)
        from longtrain.launcher.loading import load_init_from

        model = load_init_from(recipe)
    else:
        torch.manual_seed(recipe.run.seed)
        model = Transformer(recipe.model_config())
        model.init_weights(seed=recipe.run.seed)
    _check_vocab(model.cfg, tokenizer_vocab)
    return model


def build_sharded_model(recipe: Recipe, tokenizer_vocab: int, device: torch.device,
                        dtype: torch.dtype) -> Transformer:
    """FSDP2: the model built on the meta device, sharded, then only this rank's shards given memory
    and values (fresh from run.seed, or read slice by slice from init_from): no rank ever holds
    a whole copy. Returns the (wrapped-in-place) model."""
    from longtrain.launcher.loading import fill_weights, init_from_source
    from longtrain.parallel.engines import place_local, wrap_model

    source = init_from_source(recipe) if recipe.model.init_from else None
    cfg = source[2] if source is not None else recipe.model_config()
    _check_vocab(cfg, tokenizer_vocab)
    with torch.device("meta"):
        model = Transformer(cfg)
    configure_memory(model, recipe)
    if recipe.training.compile:
        compile_blocks(model, recipe.mesa.enabled)
    wrap_model(model, "fsdp2", device, dtype=dtype)
    model.to_empty(device=device)
    fill_weights(model, recipe, source, place=place_local)
    return model


def enable_mesa(model: Transformer, recipe: Recipe) -> Any:
    """Make every block save 8-bit activations (kernels/mesa); returns the Mesa state module or None."""
    if not recipe.mesa.enabled:
        return None
    from longtrain.kernels.mesa import MesaConfig, attach_mesa

    m = recipe.mesa
    if m.bits < 8 and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("mesa.bits = %d: saved activations take %d/8 of the 8-bit size, but gradients are much "
                    "noisier (tiny model: worst parameter cosine vs exact 0.86 at 4 bits, 0.28 at 2, against "
                    "0.9994 at 8; docs/mesa.md). Only 8 bits is validated for training quality.", m.bits, m.bits)
    cfg = MesaConfig(enabled=True, bits=m.bits, group=m.group, ema_decay=m.ema_decay, stochastic=m.stochastic,
                     skip_layers=tuple(m.skip_layers))
    return attach_mesa(model, cfg)


def compile_blocks(model: Transformer, mesa: bool) -> None:
    """training.compile: torch.compile every transformer block in place, as torchtitan does.

    Attention (softmax, sequence-parallel, lightning) runs outside the compiled graphs: the
    AttentionOps methods are marked torch.compiler.disable, so the block compiles around them;
    fused kernels do that work anyway. Mesa's saved-tensor hooks cannot be traced, so the two
    are refused together rather than silently running eager.
    """
    if mesa:
        raise ConfigError("training.compile = true with mesa.enabled = true is not supported (Mesa's "
                          "saved-tensor hooks cannot be compiled); turn one of them off")
    for block in model.layers:
        block.compile()


class Trainer:
    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.env, self.device = init_distributed(recipe.training.device, recipe.training.collective_timeout_s,
                                                 sp=recipe.parallel.sp)
        setup_logging(self.env.is_main)
        r = recipe
        self.layout = make_layout(r.parallel.sp)
        lay = self.layout
        if lay.sp > 1 and r.data.seq_len % (2 * lay.sp if r.parallel.sp_layout == "zigzag" else lay.sp):
            raise ConfigError(f"data.seq_len {r.data.seq_len} must be divisible by "
                              f"{'2*' if r.parallel.sp_layout == 'zigzag' else ''}sp for the {r.parallel.sp_layout} layout")
        t0 = time.perf_counter()
        spec = corpus_tokenizer(r.data, self._tokenizer_spec(), explicit=r.data.tokenizer != "auto")
        self.tokenizer = build_tokenizer(spec)
        r.data.tokenizer = spec  # the resolved recipe (and eval) name the tokenizer actually used
        self.corpus, self.data_sources = build_corpus(
            r.data, seq_len=r.data.seq_len, seed=r.run.seed, tokenizer=spec, local_main=self.env.local_rank == 0,
            sync=_first_error if dist.is_initialized() and dist.get_world_size() > 1 else None)
        self.prefetch = Prefetcher(self._make_micro_batches, enabled=r.data.prefetch)
        log.info("data: %s | %d samples of %d tokens (%.1fs)", "; ".join(
            f"{s['name']}: {s['documents']:,} documents, {s['tokens']:,} tokens" + (
                f", weight {s['weight']:g}" if len(self.data_sources) > 1 else "") for s in self.data_sources),
            self.corpus.n_samples, r.data.seq_len, time.perf_counter() - t0)
        self.dtype = torch.bfloat16 if r.training.dtype == "bf16" else torch.float32
        self.tf32 = set_tf32(self.device, r.training.tf32)  # fp32 on tensor cores (CUDA only)
        self.engine = r.parallel.dp_engine
        self.ds_engine = None
        if self.engine == "fsdp2":  # sharded from the start (meta device): no whole-model copy on a rank
            self.model = build_sharded_model(r, self.tokenizer.vocab_size, self.device, self.dtype)
            self.mesa = enable_mesa(self.model, r)
        else:
            self.model = build_model(r, self.tokenizer.vocab_size)
            self.mesa = enable_mesa(self.model, r)
            configure_memory(self.model, r)
            self.model.to(self.device)
            if r.training.compile:
                compile_blocks(self.model, self.mesa is not None)
        if self.engine == "deepspeed":
            from longtrain.parallel.deepspeed_engine import wrap_deepspeed

            self.ds_engine, self.optimizer, self.scheduler = wrap_deepspeed(self.model, r, lr_lambda(r), self.dtype)
            self.wrapped = self.ds_engine
        else:
            from longtrain.parallel.engines import wrap_model

            self.wrapped = self.model if self.engine == "fsdp2" else wrap_model(self.model, self.engine, self.device,
                                                                                dtype=self.dtype)
            decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
            t = r.training
            self.optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, foreach=True)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(r))
        self.sp_impl = resolve_sp_impl(r.parallel.sp_impl, self.model.cfg)
        if self.layout.sp > 1 and self.sp_impl in ("ring", "tokenring"):
            from longtrain.parallel.comm import warm_up

            warm_up(self.layout.sp_group, self.device, one_communicator=r.parallel.sp_one_communicator)
        self.step = 0
        self.data_position = 0
        self.bad_streak = 0   # consecutive steps whose update was skipped (non-finite loss / grad norm)
        self.bad_total = 0
        self.checkpointer = Checkpointer(r.checkpoint_dir, r.checkpoint.keep_last)
        # background saves run their collectives in a thread: on a group of their own, never the training's
        self.async_group = (dist.new_group(backend="gloo") if r.checkpoint.async_save and self.ds_engine is None
                            else None)
        self.metrics: Metrics | None = None

    def _tokenizer_spec(self) -> str:
        """The recipe's tokenizer: auto/bytes with init_from = as init_from was trained (else bytes)."""
        r = self.recipe
        if r.model.init_from and r.data.tokenizer in ("auto", "bytes"):
            from longtrain.launcher.loading import init_from_tokenizer

            return init_from_tokenizer(r.model.init_from) or "bytes"
        return "bytes" if r.data.tokenizer == "auto" else r.data.tokenizer

    # ---- state ----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        if self.ds_engine is not None:
            raise RuntimeError("DeepSpeed checkpoints go through its own engine")
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.wrapped, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _meta(self) -> dict[str, Any]:
        return {"data_position": self.data_position, "world_size": self.layout.world, "dp": self.layout.dp,
                "sp": self.layout.sp, "global_batch": self.global_batch, "seq_len": self.corpus.seq_len,
                "rope_theta": self.model.cfg.rope_theta,
                "model": self.model.cfg.to_dict(), "engine": self.engine}

    def save(self) -> None:
        if self.ds_engine is not None:
            from longtrain.parallel.deepspeed_engine import DS_SUBDIR, write_deepspeed

            meta = {**self._meta(), "deepspeed": {"zero_stage": self.ds_engine.zero_optimization_stage(),
                                                  "dir": DS_SUBDIR}}
            self.checkpointer.save(self.step, None, meta, write=lambda tmp: write_deepspeed(self.ds_engine, tmp))
            return
        self.checkpointer.save(self.step, self._state(), self._meta(), background=self.async_group is not None,
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
        if self.ds_engine is not None:
            from longtrain.parallel.deepspeed_engine import load_deepspeed

            load_deepspeed(self, path)
        else:
            state = self._state()
            Checkpointer.load(path, state)
            from torch.distributed.checkpoint.state_dict import set_state_dict

            set_state_dict(self.wrapped, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        self.step = int(meta["step"])
        self.data_position = int(meta["data_position"])
        if meta.get("seq_len") and int(meta["seq_len"]) != self.corpus.seq_len:  # saved inside a stage
            self.corpus = self.corpus.with_seq_len(int(meta["seq_len"]))
        if meta.get("rope_theta") and meta["rope_theta"] != self.model.cfg.rope_theta:
            self.model.set_rope(theta=float(meta["rope_theta"]))
        self.scheduler.last_epoch = self.step
        for g, lr0 in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = lr0 * lr_lambda(r)(self.step)
        if meta.get("global_batch") not in (None, self.global_batch):
            log.warning("global batch changed from %s to %s: the sample order continues from position %d",
                        meta.get("global_batch"), self.global_batch, self.data_position)
        log.info("resumed from %s at step %d (data position %d, written by %s ranks)", path, self.step,
                 self.data_position, meta.get("world_size"))

    # ---- one step -------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        t = self.recipe.training
        return self.layout.dp * t.micro_batch * t.grad_accum

    def _micro_batches(self) -> list[dict[str, Any]]:
        """This step's micro-batches for this dp rank (built ahead, during the previous step)."""
        key = (self.data_position, self.corpus.seq_len)
        nxt = (self.data_position + self.global_batch, self.corpus.seq_len) \
            if self.step + 1 < self.recipe.training.steps else None
        batches = self.prefetch.get(key, nxt)
        if os.environ.get(DATA_TRACE_ENV):
            self._trace_samples(batches)
        return batches

    def _planned_sources(self) -> list[dict[str, Any]]:
        """Each source's size, and the samples/tokens this run will draw from it (at the first seq_len)."""
        total = self.global_batch * self.recipe.training.steps
        drawn = self.corpus.source_counts(total) if self.corpus.blend is None or total <= self.corpus.blend.total \
            else self.corpus.source_counts(int(self.corpus.blend.total))
        return [{**info, "run_samples": int(n), "run_tokens": int(n) * self.corpus.seq_len}
                for info, n in zip(self.data_sources, drawn.tolist())]

    def _trace_samples(self, batches: list[dict[str, Any]]) -> None:
        """Test hook: append (step, global sample index, crc32 of its tokens) for this rank's samples."""
        import zlib

        r, lay = self.recipe, self.layout
        mb, S = r.training.micro_batch, self.corpus.seq_len
        with open(f"{os.environ[DATA_TRACE_ENV]}.rank{lay.rank}", "a") as f:
            for m, b in enumerate(batches):
                rows = b["tokens"].reshape(-1, S)
                start = self.data_position + (m * lay.dp + lay.dp_rank) * mb
                for i in range(mb):
                    crc = zlib.crc32(rows[i].to(torch.int64).numpy().tobytes())
                    f.write(f"{self.step + 1} {start + i} {crc}\n")

    def _make_micro_batches(self, key: tuple[int, int]) -> list[dict[str, Any]]:
        position, seq_len = key
        r, lay = self.recipe, self.layout
        corpus = self.corpus if self.corpus.seq_len == seq_len else self.corpus.with_seq_len(seq_len)
        mb, out = r.training.micro_batch, []
        for m in range(r.training.grad_accum):
            start = position + (m * lay.dp + lay.dp_rank) * mb
            out.append(collate(corpus.batch(start, mb), r.data.document_mask))
        return out

    def _apply_stage(self) -> None:
        """[[stages]]: switch seq_len / rope_theta when a stage starts (also right after a resume).

        On a seq_len change the data position is converted to the same number of tokens
        (rounded up) over the re-cut sample order.
        """
        r = self.recipe
        stage = None
        for s in sorted(r.stages, key=lambda s: s.start_step):
            if s.start_step <= self.step:
                stage = s
        seq_len = (stage.seq_len if stage and stage.seq_len else None) or r.data.seq_len
        theta = stage.rope_theta if stage and stage.rope_theta else None
        if seq_len != self.corpus.seq_len:
            mult = 2 * self.layout.sp if r.parallel.sp_layout == "zigzag" else self.layout.sp
            if seq_len % mult:
                raise ConfigError(f"stage seq_len {seq_len} must be divisible by {mult} for sp={self.layout.sp}")
            old = self.corpus.seq_len
            self.data_position = -(-self.data_position * old // seq_len)
            self.corpus = self.corpus.with_seq_len(seq_len)
            log.info("stage at step %d: seq_len %d -> %d (data position %d)", self.step, old, seq_len,
                     self.data_position)
        if theta is not None and theta != self.model.cfg.rope_theta:
            log.info("stage at step %d: rope_theta %g -> %g", self.step, self.model.cfg.rope_theta, theta)
            self.model.set_rope(theta=theta)

    def _shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        lay, p = self.layout, self.recipe.parallel
        dev = self.device
        if lay.sp == 1:
            ops = LocalAttention(batch["cu_seqlens"])  # host bounds: no device sync inside the model
            return {"tokens": batch["tokens"].to(dev), "labels": batch["labels"].to(dev),
                    "positions": batch["positions"].to(dev), "ops": ops}
        from longtrain.parallel import shard_sequence
        from longtrain.parallel.ops import SequenceParallelOps

        g = lay.sp_group
        ops = SequenceParallelOps(g, impl=self.sp_impl, layout=p.sp_layout, cu_seqlens=batch["cu_seqlens"],
                                  ulysses_degree=p.ulysses_degree or None, one_communicator=p.sp_one_communicator)
        return {"tokens": shard_sequence(batch["tokens"].to(dev), g, dim=1, layout=p.sp_layout),
                "labels": shard_sequence(batch["labels"].to(dev), g, dim=1, layout=p.sp_layout),
                "positions": shard_sequence(batch["positions"].to(dev), g, dim=0, layout=p.sp_layout),
                "ops": ops}

    def train_step(self) -> dict[str, float]:
        r, lay = self.recipe, self.layout
        step_seed = r.run.seed * 7919 + self.step * 104729 + lay.rank
        torch.manual_seed(step_seed)  # exact resume, any world size
        if self.mesa is not None:  # stochastic rounding too
            self.mesa.reseed(step_seed * 1_000_003 + 17)
        self._apply_stage()
        _fault_slow()
        micro = [self._shard(b) for b in self._micro_batches()]
        local_count = sum(int((b["labels"] != -100).sum()) for b in micro)
        # on the training device: NCCL has no CPU tensors (make gpu-check found this on its first run)
        counts = torch.tensor([float(local_count)], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        global_count = counts.item()
        scale = lay.world / max(global_count, 1.0)  # engines average grads over all ranks
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16)
               if self.dtype == torch.bfloat16 and self.engine == "ddp" else nullcontext())
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1
            no_sync = (self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")
                                                   and self.engine == "ddp") else nullcontext())
            if self.engine == "fsdp2" and hasattr(self.wrapped, "set_requires_gradient_sync"):
                self.wrapped.set_requires_gradient_sync(sync)
            with no_sync, amp:
                loss = self.wrapped(b["tokens"], b["positions"], b["ops"], b["labels"])  # summed CE, chunked
                if _fault_nan(self.step + 1):
                    loss = loss * float("nan")
                total = loss * scale
                aux = self.model.aux_loss()
                if aux is not None:
                    total = total + aux / len(micro)  # engines average over ranks
                    aux_sum += aux.detach().double()
                if self.ds_engine is not None:
                    self.ds_engine.backward(total, scale_wrt_gas=False)  # `scale` already averages
                else:
                    total.backward()
            loss_sum += loss.detach().double()
        if self.ds_engine is not None:
            self.ds_engine.step()  # the accumulation boundary: reduce, clip, update, schedule
            gnorm = float(self.ds_engine.get_global_grad_norm() or 0.0)
        else:
            if r.training.grad_clip > 0:
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.training.grad_clip)
            else:
                gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            gnorm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            dist.all_reduce(loss_sum)
            # NaN guard: the global loss and the global grad norm are the same on every rank, so all
            # ranks agree on skipping without another collective; the weights keep the last good update
            if math.isfinite(loss_sum.item()) and math.isfinite(gnorm):
                self.optimizer.step()
                self.bad_streak = 0
            else:
                self.bad_streak += 1
                self.bad_total += 1
                if self.env.is_main:
                    log.warning("step %d: non-finite %s; update skipped (%d in a row, %d in this run; the run "
                                "stops after training.max_bad_steps = %d in a row)", self.step + 1,
                                "loss" if not math.isfinite(loss_sum.item()) else "gradient norm", self.bad_streak,
                                self.bad_total, r.training.max_bad_steps)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        if self.mesa is not None and lay.world > 1:
            self._sync_mesa_ranges()
        if self.ds_engine is not None:
            dist.all_reduce(loss_sum)
        self.step += 1
        self.data_position += self.global_batch
        out = {"loss": loss_sum.item() / max(global_count, 1.0), "tokens": global_count}
        if aux_sum.item():
            dist.all_reduce(aux_sum)
            out["aux_loss"] = aux_sum.item() / lay.world / len(micro)
        out["grad_norm"] = gnorm
        out["skipped_steps"] = self.bad_total
        return out

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
        r = self.recipe
        self.resume()
        out_dir = r.output_dir
        if self.env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(r, out_dir / "recipe.resolved.toml", extra={
                "world_size": self.layout.world, "dp": self.layout.dp, "sp": self.layout.sp,
                "global_batch": self.global_batch, "tokens_per_step": self.global_batch * r.data.seq_len,
                "n_params": self.model.cfg.n_params, "device": str(self.device), "launcher": self.env.source,
                "data_sources": self._planned_sources()})
            log.info("run folder %s | model %.2fM params | world %d (dp %d x sp %d, %s) | %d tokens/step | device %s",
                     out_dir, self.model.cfg.n_params / 1e6, self.layout.world, self.layout.dp, self.layout.sp,
                     self.sp_impl if self.layout.sp > 1 else "no sp", self.global_batch * r.data.seq_len,
                     self.device)
        self.metrics = Metrics(out_dir, is_main=self.env.is_main, total_steps=r.training.steps,
                               log_every=r.metrics.log_every, tensorboard=r.metrics.tensorboard)
        self.metrics.describe_run(self)  # HParams values and the resolved recipe for TensorBoard
        first_step = self.step
        history: list[float] = []
        if r.checkpoint.save_on_signal:
            signals.install(r.checkpoint.save_on_signal)
        peak = peak_flops(self.device)
        flops_per_token = train_flops_per_token(self.model.cfg, r.data.seq_len)
        evaluator = self._evaluator()
        try:
            self._loop(evaluator, peak, flops_per_token, history, first_step)
        except (RuntimeError, dist.DistError) as e:
            if not _peer_lost(e):
                raise
            first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0]  # gloo's source location
            raise PeerLost(f"lost contact with another process during step {self.step + 1} ({first[:160]})") from None
        finally:
            self.prefetch.close()
            self.metrics.close()
        return {"first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
                "steps": self.step, "losses": history}

    def _loop(self, evaluator, peak, flops_per_token, history: list[float], first_step: int) -> None:
        """The step loop: train, log, evaluate, checkpoint; stop on a signal or too many bad steps."""
        r = self.recipe
        while self.step < r.training.steps:
            t0 = time.perf_counter()
            res = self.train_step()
            dt = time.perf_counter() - t0
            history.append(res["loss"])
            tok_s = res["tokens"] / dt
            scalars = {"loss": res["loss"], "lr": self.optimizer.param_groups[0]["lr"] if self.ds_engine is None
                       else self.scheduler.get_last_lr()[0],
                       "grad_norm": res["grad_norm"], "tokens_per_s": tok_s,
                       "tokens_per_s_per_process": tok_s / self.layout.world, "step_time_s": dt,
                       "memory_mb": memory_mb(self.device)}
            if "aux_loss" in res:
                scalars["aux_loss"] = res["aux_loss"]
            if self.bad_total:
                scalars["skipped_steps"] = float(self.bad_total)
            if peak:
                scalars["mfu"] = flops_per_token * tok_s / self.layout.world / peak
            scalars["data_wait_s"] = self.prefetch.last_wait_s
            if len(self.data_sources) > 1:
                drawn = self.corpus.source_counts(self.data_position) * self.corpus.seq_len
                for name, n in zip(self.corpus.names, drawn.tolist()):
                    scalars[f"data/{name}/tokens"] = float(n)
                    scalars[f"data/{name}/share"] = n / max(1, drawn.sum())
            self.metrics.step(self.step, scalars, dt, first_step)
            self._log_moh_usage()
            if evaluator is not None and r.eval.every and self.step % r.eval.every == 0:
                self.metrics.scalars(self.step, evaluator(self))
            if self.bad_streak >= r.training.max_bad_steps:
                self.checkpointer.wait()
                last = self.checkpointer.latest()
                raise TrainingError(
                    f"stopping at step {self.step}: {self.bad_streak} consecutive steps with a non-finite loss or "
                    f"gradient norm (training.max_bad_steps = {r.training.max_bad_steps}); the newest checkpoint, "
                    f"{last.name if last else 'none'}, holds weights from before them (lower training.lr, or "
                    "check the data)")
            self.checkpointer.poll()  # publishes a finished background save
            saved = self.bad_streak == 0 and (self.step % r.checkpoint.interval == 0
                                              or self.step == r.training.steps)
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
        self.checkpointer.wait()  # the last background save is published before the run ends

    def _signal_received(self) -> bool:
        """Whether any rank got a save-on-signal signal: one tiny all-reduce per step, so all agree."""
        flag = torch.tensor([1.0 if signals.requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def _evaluator(self):
        r = self.recipe
        if not r.eval.every:
            return None
        from longtrain.launcher.eval_score import in_training_eval

        return in_training_eval

    def _log_moh_usage(self) -> None:
        r = self.recipe
        if r.model.moh is None or self.step % r.metrics.log_every:
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
                      f"{trainer.model.cfg.n_params / 1e6:.2f}M params; data {trainer.corpus.n_samples} samples of "
                      f"{recipe.data.seq_len} tokens; global batch {trainer.global_batch} samples; "
                      f"{recipe.training.steps} steps")
            return {"dry_run": True}
        result = trainer.fit()
        if trainer.env.is_main:
            ls = result["losses"]
            if ls:
                tail = ls[-10:]
                print(f"done: {result['steps']} steps | first loss {ls[0]:.4f} | last loss {ls[-1]:.4f} "
                      f"(mean of last {len(tail)}: {sum(tail) / len(tail):.4f}) | run folder {recipe.output_dir}",
                      flush=True)
                if recipe.metrics.tensorboard:
                    print(tensorboard_hint(recipe), flush=True)
            else:
                print(f"nothing to do: the checkpoint in {trainer.checkpointer.root} is already at step "
                      f"{trainer.step} >= training.steps = {recipe.training.steps} (raise training.steps, "
                      "or start fresh with --set checkpoint.resume=none or another run.name)", flush=True)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
