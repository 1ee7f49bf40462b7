"""Assembling the model a run trains: built whole (DDP, DeepSpeed) or sharded from the start
(FSDP2, on the meta device), with the recipe's memory settings, Mesa and torch.compile."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from longtrain.errors import ConfigError
from longtrain.launcher.config import Recipe
from longtrain.parallel.rules import ulysses_split_degree
from longtrain.models import Transformer

log = logging.getLogger("longtrain")


def _check_vocab(cfg: Any, tokenizer_vocab: int) -> None:
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}")


def configure_memory(model: Transformer, recipe: Recipe) -> None:
    """The recipe's memory settings on the model: checkpointing policy, MLP tiles, head groups (the loss
    chunk is the forward's argument: launcher/trainer.py passes training.loss_chunk)."""
    t, p = recipe.training, recipe.parallel
    model.activation_checkpointing = t.activation_checkpointing
    model.set_mlp_chunk(t.mlp_chunk)
    model.set_attn_head_chunk(t.attn_head_chunk, ulysses_split_degree(p.sp, p.sp_impl, p.ulysses_degree))


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
    from longtrain.parallel.engines import place_local, shard_fsdp2

    source = init_from_source(recipe) if recipe.model.init_from else None
    cfg = source[2] if source is not None else recipe.model_config()
    _check_vocab(cfg, tokenizer_vocab)
    model = Transformer.on_meta(cfg)
    configure_memory(model, recipe)
    if recipe.training.compile:
        compile_blocks(model, recipe.mesa.enabled)
    from longtrain.launcher.replicate import resolve_dp_replicate  # parallel.dp_replicate: hybrid sharding

    offload = recipe.training.optimizer_offload
    shard_fsdp2(model, device, dtype=dtype, replicate=resolve_dp_replicate(recipe, cfg, device), offload=offload)
    model.to_empty(device=torch.device("cpu") if offload else device)
    if offload:  # the shards stay on the host (FSDP2 copies them in per layer); buffers are used where we compute
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.to(device)
        policy = type(getattr(model._get_fsdp_state()._fsdp_param_group, "offload_policy", None)).__name__
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.info("optimizer offload: FSDP2 %s, parameter shards, gradients and AdamW state in host memory, "
                     "the step run there", policy)
    fill_weights(model, recipe, source, place=place_local)
    return model


def enable_mesa(model: Transformer, recipe: Recipe) -> Any:
    """Make every block save 8-bit activations (kernels/mesa), and checkpointed layers store their
    inputs in 8 bits; returns the Mesa state module or None."""
    if not recipe.mesa.enabled:
        return None
    from longtrain.kernels.mesa import attach_mesa

    m = recipe.mesa
    if m.bits < 8 and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("mesa.bits = %d: saved activations take %d/8 of the 8-bit size, but gradients are much "
                    "noisier (tiny model: worst parameter cosine vs exact 0.86 at 4 bits, 0.28 at 2, against "
                    "0.9994 at 8; docs/mesa.md). Only 8 bits is validated for training quality.", m.bits, m.bits)
    from longtrain.models.memory import checkpoint_policy

    # checkpointed layers ('full', 'offload', 'every:N') store their inputs in 8 bits too
    inputs = checkpoint_policy(recipe.training.activation_checkpointing) != "none"
    return attach_mesa(model, m.kernel_config(), inputs=inputs)


def compile_blocks(model: Transformer, mesa: bool) -> None:
    """training.compile: torch.compile every transformer block in place, as torchtitan does.

    Attention (softmax, sequence-parallel, lightning) runs outside the compiled graphs: the
    AttentionOps methods are marked @outside_compile (torch.compiler.disable, applied here by
    mark_compile_boundaries), so the block compiles around them;
    fused kernels do that work anyway. Mesa's saved-tensor hooks cannot be traced, so the two
    are refused together rather than silently running eager.
    """
    if mesa:
        raise ConfigError("training.compile = true with mesa.enabled = true is not supported (Mesa's "
                          "saved-tensor hooks cannot be compiled); turn one of them off")
    from longtrain.models.ops import mark_compile_boundaries

    mark_compile_boundaries()
    for block in model.layers:
        block.compile()


def build_for_engine(recipe: Recipe, tokenizer_vocab: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[Transformer, Any]:
    """The model for the recipe's dp engine on `device`, and its Mesa state (or None)."""
    if recipe.parallel.dp_engine == "fsdp2":  # sharded from the start: no whole-model copy on a rank
        model = build_sharded_model(recipe, tokenizer_vocab, device, dtype)
        return model, enable_mesa(model, recipe)
    model = build_model(recipe, tokenizer_vocab)
    mesa = enable_mesa(model, recipe)
    configure_memory(model, recipe)
    model.to(device)
    if recipe.training.compile:
        compile_blocks(model, mesa is not None)
    return model, mesa
