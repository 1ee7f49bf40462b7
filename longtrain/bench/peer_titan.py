"""torchtitan's side of `longtrain bench peer`: its Trainer.Config for a longtrain recipe, and the
components it needs that its wheel does not ship for this comparison (a tokenizer, a dataloader over
longtrain's corpus). Imported only by the torchtitan worker (peer_worker.py), with torchtitan on the path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import IterableDataset
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.components.validate import Validator
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.models.common import CosSinRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import Llama3Model, parallelize_llama
from torchtitan.models.llama3 import _build_llama3_layers as build_llama3_layers
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer


def _recipe(spec: dict[str, Any]):
    from longtrain.launcher.config import load_recipe

    return load_recipe(spec["recipe"], spec["longtrain_sets"])


class ByteTokenizer(BaseTokenizer):
    """Placeholder for the Trainer (the data arrives as token ids): longtrain's byte tokenizer sizes."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        vocab_size: int = 320

    def __init__(self, config: Config, tokenizer_path: str = "") -> None:
        super().__init__()
        self.vocab_size = config.vocab_size

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], *args, **kwargs) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def get_vocab_size(self) -> int:
        return self.vocab_size


class CorpusSamples(IterableDataset):
    """longtrain's samples in longtrain's order for dp rank `dp_rank`: ({"input", "positions"}, labels);
    micro-batch m of step t takes samples t*G + (m*dp + dp_rank)*micro_batch + [0, micro_batch)."""

    def __init__(self, spec: dict[str, Any], dp_rank: int, dp_world: int, micro_batch: int) -> None:
        from longtrain.launcher.data.corpus import build_corpus, corpus_tokenizer

        r = _recipe(spec)
        tok = corpus_tokenizer(r.data, "bytes" if r.data.tokenizer == "auto" else r.data.tokenizer,
                               explicit=r.data.tokenizer != "auto")
        self.corpus, _ = build_corpus(r.data, seq_len=r.data.seq_len, seed=r.run.seed, tokenizer=tok,
                                      local_main=False)
        self.dp_rank, self.dp_world, self.mb, self.steps = dp_rank, dp_world, micro_batch, r.training.steps
        self.accum = r.training.grad_accum

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        G = self.dp_world * self.mb * self.accum
        for step in range(self.steps):
            for m in range(self.accum):
                for s in self.corpus.batch(step * G + (m * self.dp_world + self.dp_rank) * self.mb, self.mb):
                    tokens = s.tokens.to(torch.long)
                    yield {"input": tokens, "positions": torch.arange(tokens.numel())}, s.labels.to(torch.long)


class CorpusDataLoader(ParallelAwareDataloader):
    """torchtitan's stateful dataloader over CorpusSamples."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        spec: dict | None = None

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: Any, seq_len: int,
                 local_batch_size: int, **kwargs) -> None:
        ds = CorpusSamples(config.spec or {}, dp_rank, dp_world_size, local_batch_size)
        super().__init__(ds, dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=local_batch_size)


def model_config(m: dict[str, Any], attn: str) -> Llama3Model.Config:
    """torchtitan's Llama3Model.Config of longtrain's shape (`m`: peer.titan_settings()["model"]);
    rotate-half (cos/sin) RoPE, longtrain's convention; fused wqkv as torchtitan's llama3 flavors."""
    from torchtitan.models.common.config_utils import get_attention_config

    dim, V, H = m["dim"], m["vocab_size"], m["n_heads"]
    std = {"weight": partial(nn.init.normal_, std=0.02)}  # overwritten by longtrain's initial weights
    ones = {"weight": nn.init.ones_}
    layers = build_llama3_layers(
        n_layers=m["n_layers"], dim=dim, n_heads=H, n_kv_heads=m["n_kv_heads"], hidden_dim=m["ffn_dim"],
        rope=CosSinRoPE.Config(dim=dim // H, max_seq_len=m["max_seq_len"], theta=m["rope_theta"]),
        attn_backend="flex", fuse_qkv=True)
    for layer in layers:
        layer.attention_norm.eps = layer.ffn_norm.eps = m["norm_eps"]
        if attn == "sdpa":  # maskless causal SDPA (torchtitan's graph_trainer tests use it for LLMs)
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
        else:
            layer.attention.inner_attention = get_attention_config(attn)
    return Llama3Model.Config(
        dim=dim, vocab_size=V, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=V, embedding_dim=dim, param_init=std),
        norm=RMSNorm.Config(normalized_shape=dim, eps=m["norm_eps"], param_init=ones),
        lm_head=Linear.Config(in_features=dim, out_features=V, param_init=std))


def _optimizer(o: dict[str, Any]) -> OptimizersContainer.Config:
    """AdamW with longtrain's groups: weight decay on >= 2-D weights, none on the norm gains."""
    kw = {"lr": o["lr"], "betas": tuple(o["betas"]), "eps": o["eps"]}
    return OptimizersContainer.Config(implementation="foreach", param_groups=[
        ParamGroupConfig(pattern=r".*norm\.weight$", optimizer_name="AdamW",
                         optimizer_kwargs={**kw, "weight_decay": 0.0}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW",
                         optimizer_kwargs={**kw, "weight_decay": o["weight_decay"]})])


def build_config(spec: dict[str, Any]) -> Trainer.Config:
    """The Trainer.Config of spec["titan"] (peer.titan_settings() plus attn and cp)."""
    s = spec["titan"]
    mc = model_config(s["model"], s["attn"])
    model_spec = ModelSpec(name="llama3", flavor="peer", model=mc, parallelize_fn=parallelize_llama,
                           pipelining_fn=None, post_optimizer_build_fn=None, state_dict_adapter=None)
    t = s["training"]
    return Trainer.Config(
        model_spec=model_spec, dump_folder=spec["out"] + "/torchtitan",
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=mc.vocab_size)),
        optimizer=_optimizer(s["optimizer"]),
        lr_scheduler=LRSchedulersContainer.Config(**s["lr_scheduler"]),
        training=TrainingConfig(local_batch_size=t["local_batch_size"], global_batch_size=t["global_batch_size"],
                                seq_len=t["seq_len"], steps=t["steps"], max_norm=t["max_norm"],
                                dtype="float32", mixed_precision_param="float32", disable_cuda_graphs=True),
        parallelism=ParallelismConfig(context_parallel_degree=s["cp"], data_parallel_shard_degree=-1,
                                      spmd_backend=s.get("spmd_backend", "partial_dtensor")),
        tokenizer=ByteTokenizer.Config(vocab_size=mc.vocab_size),
        dataloader=CorpusDataLoader.Config(spec=spec),
        metrics=MetricsProcessor.Config(log_freq=1),
        checkpoint=CheckpointManager.Config(enable=False),
        activation_checkpoint=None,
        validator=Validator.Config(enable=False))


def load_initial_weights(trainer: Trainer, spec: dict[str, Any]) -> None:
    """Overwrite torchtitan's initialisation with longtrain's initial weights (same seed): each rank
    copies its own FSDP shard of every parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from longtrain.bench.peer import titan_state_dict
    from longtrain.launcher.build import build_model

    m = spec["titan"]["model"]
    full = titan_state_dict(build_model(_recipe(spec), 0).state_dict(), m["n_heads"], m["n_kv_heads"])
    params = dict(trainer.model_parts[0].named_parameters())
    if set(params) != set(full):
        raise RuntimeError(f"parameter names differ: {sorted(set(params) ^ set(full))}")
    with torch.no_grad():
        for name, p in params.items():
            value = full[name].to(p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(value)
