"""The analytic model behind `longtrain plan`: memory per GPU (parameters, optimizer, gradients,
activations per checkpointing policy, loss and MLP working sets), FLOPs per token, sequence-parallel
traffic per implementation and the step time that follows, for the GPUs and interconnects listed
here. No torch import: the planner runs before any process starts.
Measured against CPU peaks in docs/memory.md (`longtrain bench memory --grid full`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longtrain.errors import ConfigError
from longtrain.parallel.rules import default_ulysses_degree, ulysses_heads_ok, ulysses_split_degree

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense tensor-core peak
    tf32_tflops: float
    intra_gbs: float  # GPU-to-GPU bandwidth inside a node, GB/s per direction per GPU
    intra_link: str
    host_memory_gib: float  # host memory of the kind's usual node (one node of --gpus-per-node GPUs)


# host_memory_gib, the kind's usual node (`longtrain plan --host-memory` overrides it): 2 TiB for 8-GPU SXM nodes
# (DGX H100 / H200 / B200, DGX A100 640GB); 1 TiB for H100 PCIe, A100 40GB (DGX A100 320GB) and L40S
# servers, their common configuration; 768 GiB for A10 (AWS g5.48xlarge, 8 x A10G).
GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM 80GB", 80, 989, 494, 450, "NVLink4", 2048),
    "h100-pcie": GPU("H100 PCIe 80GB", 80, 756, 378, 64, "PCIe5", 1024),
    "h200": GPU("H200 SXM 141GB", 141, 989, 494, 450, "NVLink4", 2048),
    "b200": GPU("B200 192GB", 180, 2250, 1100, 900, "NVLink5", 2048),
    "a100": GPU("A100 SXM 80GB", 80, 312, 156, 300, "NVLink3", 2048),
    "a100-40g": GPU("A100 SXM 40GB", 40, 312, 156, 300, "NVLink3", 1024),
    "l40s": GPU("L40S 48GB", 48, 362, 183, 32, "PCIe4", 1024),
    "a10": GPU("A10 24GB", 24, 125, 62.5, 16, "PCIe4", 768),
}

# Host memory each training process holds whatever the recipe: CUDA context and host-side mappings, torch /
# NCCL libraries and buffers, the Python heap, the data loader, the pinned allocator's rounding slack. A round
# upper figure per rank (a bare CUDA context alone takes a few hundred MiB to ~1 GiB of host memory).
HOST_BASELINE_BYTES = 4 * GiB

# inter-node bandwidth per GPU, GB/s per direction (one NIC per GPU unless stated)
INTERCONNECTS: dict[str, tuple[float, str]] = {
    "ib": (50.0, "InfiniBand NDR 400 Gb/s per GPU"),
    "ib-ndr": (50.0, "InfiniBand NDR 400 Gb/s per GPU"),
    "ib-hdr": (25.0, "InfiniBand HDR 200 Gb/s per GPU"),
    "roce": (25.0, "RoCE 200 Gb/s per GPU"),
    "efa": (25.0, "AWS EFA 3200 Gb/s per 8 GPUs"),
    "ethernet": (3.125, "Ethernet 100 Gb/s per node of 8 GPUs"),
    "nvlink": (450.0, "one NVLink domain across nodes (NVL72-style)"),
}


# ---- traffic of FSDP2 (plain or hybrid, launcher/replicate.py) --------------------------------

def fsdp_traffic(n_params: float, *, world: int, replicate: int, gpus_per_node: int, param_bytes: int,
                 grad_accum: int = 1) -> dict[str, float]:
    """FSDP2 bytes each GPU sends per optimizer step, split into intra-node and inter-node.

    Per micro-batch the layers' parameters are all-gathered for forward and again for backward
    (param_bytes each, (g-1)/g of them sent over a group of g); once per step the fp32 gradients
    are reduce-scattered over the group (4 bytes, (g-1)/g). Plain (replicate = 1): g = world, and a
    group spanning nodes runs at the inter-node link. Hybrid (replicate R): g = world / R inside a
    node, plus an all-reduce of each rank's 1/g fp32 gradient shard across the R replicas
    (2 x 4 P/g x (R-1)/R) between nodes."""
    P, g = n_params, world // replicate
    shard = (2 * grad_accum * param_bytes + 4) * P * (g - 1) / g if g > 1 else 0.0
    across = 2 * 4 * (P / g) * (replicate - 1) / replicate if replicate > 1 else 0.0
    if world <= gpus_per_node:  # one node: everything on the intra-node link
        return {"group": g, "intra_bytes": shard + across, "inter_bytes": 0.0}
    inside = g <= gpus_per_node
    return {"group": g, "intra_bytes": shard if inside else 0.0, "inter_bytes": (0.0 if inside else shard) + across}


def recipe_memory(recipe: Any, cfg: Any, *, world: int, sp: int | None = None, seq_len: int | None = None,
                  replicate: int = 1) -> Memory:
    """memory_per_gpu for a recipe (its longest stage unless `seq_len`; its sp unless `sp`)."""
    t, p = recipe.training, recipe.parallel
    seq = seq_len or max([recipe.data.seq_len] + [s.seq_len or 0 for s in recipe.stages])
    return memory_per_gpu(cfg, world=world, sp=sp or p.sp, micro_batch=t.micro_batch, seq_len=seq, dtype=t.dtype,
                          engine=p.dp_engine, zero_stage=p.zero_stage, checkpointing=t.activation_checkpointing,
                          mesa=recipe.mesa.enabled, loss_chunk=t.loss_chunk, mlp_chunk=t.mlp_chunk,
                          replicate=replicate, optimizer_offload=t.optimizer_offload,
                          attn_head_chunk=t.attn_head_chunk,
                          head_divisor=ulysses_split_degree(sp or p.sp, p.sp_impl, p.ulysses_degree))


# ---- memory ----------------------------------------------------------------------------------

def activation_bytes_per_token(cfg: Any, act_bytes: int, *, mesa: bool = False, checkpointing: bool | str = False,
                               attention_fraction: float = 1.0, mlp_tiled: bool = False,
                               head_groups: int = 1) -> dict[str, float]:
    """Bytes saved for backward per token, summed over layers, as this repository's model saves them.

    Per layer (d = dim, f = ffn_dim, q = n_heads*head_dim, kv = n_kv_heads*head_dim, a = act_bytes):
      2 RMSNorms: input (its dtype), fp32 rstd, output (input of the next linears)  2 * (a*d + 4 + a*d)
      attention: q and k after RoPE, v, out (also the o-proj input: a view), lse    a*(2q + 2kv) + 4*H
      SwiGLU: w1 out, silu out, w3 out, product (w2 input)                          4 a f
              (tiled, training.mlp_chunk: nothing beyond its input, the norm's output)
    With `attention_fraction` < 1 (MoH: only shared + routed heads are computed) the per-head
    attention tensors shrink accordingly. Mesa keeps these tensors in 8 bits (about half of bf16,
    a quarter of fp32; norm statistics stay fp32). A checkpointed layer ('full', 'offload',
    'every:N') keeps only its input (a*d; in host memory with 'offload': `host`) and is recomputed
    one layer at a time during backward; with Mesa the recompute saves its tensors in 8 bits too
    (kernels/mesa/layers.mesa_checkpoint), as a plain Mesa layer does, and holds the norm's output and
    the (ungrouped) attention tensors or the untiled MLP's exactly while its forward computes them.
    With Mesa the checkpointed input is stored as uint8 codes, 1 byte per element (its scales, a bf16
    per token and per-channel-group ranges, are < 0.1% at d = 4096, not counted): `inputs` = n_ck * d.
    With `head_groups` G > 1 (training.attn_head_chunk) a layer saves no attention tensor (each group is
    recomputed from the norm's output in backward) and the recomputed working set holds one group's, attn / G.
    """
    from longtrain.models.memory import checkpoint_policy, checkpointed_layers

    d, f, L = cfg.dim, cfg.ffn_dim, cfg.n_layers
    q = cfg.n_heads * cfg.head_dim * attention_fraction
    kv = cfg.n_kv_heads * cfg.head_dim
    norms = 2 * (2 * act_bytes * d + 4)  # models/layers.RMSNorm saves its input and rstd only
    attn = act_bytes * (2 * q + 2 * kv) + 4 * cfg.n_heads
    mlp = 0 if mlp_tiled else 4 * act_bytes * f
    grouped = head_groups > 1
    plain_layer = norms + (0.0 if grouped else attn) + mlp
    policy = checkpoint_policy(checkpointing)
    n_ck = checkpointed_layers(policy, L)
    layer = plain_layer * (1.0 / act_bytes) if mesa else plain_layer  # 8-bit copies (fp32 norm inputs too)
    input_bytes = 1 if mesa else act_bytes  # Mesa: a checkpointed input is kept as uint8 codes
    inputs = n_ck * input_bytes * d
    host = inputs if policy == "offload" else 0.0
    device_inputs = inputs - host
    group = attn / head_groups if grouped else 0.0  # one head group recomputed at a time, exactly
    recompute = layer + group if n_ck else group  # one checkpointed layer recomputed at a time (Mesa: 8-bit)
    # while a Mesa layer's forward (or recompute) computes attention or the MLP, the norm's output and
    # (ungrouped) q, k, v and out, or the untiled MLP's intermediates, are alive exactly beside their 8-bit
    # copies until the forward lets go of them
    held = max(0.0 if grouped else attn, mlp)
    mesa_transient = (1 - 1 / act_bytes) * (act_bytes * d + held) if mesa else 0.0
    if n_ck:
        recompute += mesa_transient
    total = device_inputs + (L - n_ck) * layer + recompute
    return {"per_layer": layer, "plain_layer": plain_layer, "total": total, "inputs": inputs, "host": host,
            "kept_layers": (L - n_ck) * layer, "recompute": recompute, "mesa_transient": mesa_transient}


def head_groups(cfg: Any, attn_head_chunk: int | str, tokens: float, act_bytes: int, divisor: int = 1) -> int:
    """How many head groups a softmax layer runs in (1 = all heads at once; MoH layers are never grouped)."""
    from longtrain.models.memory import attention_head_bytes, attn_head_chunk_heads

    if getattr(cfg, "moh", None) is not None or not attn_head_chunk:
        return 1
    hb = attention_head_bytes(cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, act_bytes)
    c = attn_head_chunk_heads(attn_head_chunk, cfg.n_heads, cfg.n_kv_heads, int(tokens), hb, divisor)
    return cfg.n_heads // c if c else 1


def _attention_fraction(cfg: Any) -> float:
    """The fraction of heads computed per token (MoH: shared + routed of all; 1 otherwise)."""
    moh = getattr(cfg, "moh", None)
    return 1.0 if moh is None else (moh.shared_heads + moh.routed_heads) / cfg.n_heads


def logits_bytes_per_token(cfg: Any) -> float:
    """Unchunked loss (loss_chunk = 0): fp32 logits, the log-softmax saved by the loss, and the
    logits' gradient, alive together."""
    return 3 * 4 * cfg.vocab_size


def loss_bytes(cfg: Any, tokens: float, loss_chunk: int | str, act_bytes: int) -> dict[str, float]:
    """The output projection + loss: per token and fixed bytes at the peak of its backward.

    Unchunked: `logits_bytes_per_token` per token. Chunked: per token the final norm's output
    (a*d, saved) and the log-sum-exp (fp32); fixed: the larger of the forward's working set (one
    chunk's fp32 logits and logsumexp's exponentials, 2 x 4 x chunk x V) and the backward's (one
    fp32 [chunk, V] gradient built in place, a bf16 copy of it in bf16, and the fp32 accumulator of
    the projection's gradient, 4 x V x d)."""
    from longtrain.models.memory import loss_chunk_tokens

    V, d = cfg.vocab_size, cfg.dim
    chunk = loss_chunk_tokens(loss_chunk, V)
    if chunk <= 0 or chunk >= tokens:
        return {"per_token": logits_bytes_per_token(cfg), "fixed": 0.0, "chunk": int(tokens)}
    fwd = 2 * 4 * chunk * V
    bwd = 4 * chunk * V + (2 * chunk * V if act_bytes == 2 else 0)
    # + one [V, d] fp32 buffer (the gradient accumulator in backward): measured on CPU, the peak
    # sits within 4% of this at V = 128,256 (tests/test_memory.py)
    return {"per_token": act_bytes * d + 4, "fixed": max(fwd, bwd) + 4 * V * d, "chunk": chunk}


@dataclass
class Memory:
    params: float
    grads: float
    optimizer: float
    activations: float
    activations_plain: float
    activations_ckpt: float
    activations_mesa: float
    activations_mesa_ckpt: float
    logits: float
    transient: float  # gathered layers (FSDP2 / ZeRO-3) and foreach optimizer temporaries
    total: float
    host_offload: float = 0.0  # checkpointed layer inputs in host memory ('offload'), per GPU, as stored
    mlp_tile: float = 0.0  # one MLP tile's intermediates and their gradients during recompute
    loading_peak: float = 0.0  # host memory per rank while the model is built and loaded
    per_token: dict = field(default_factory=dict)  # bytes per (local) token that grow with the sequence
    fixed: float = 0.0  # bytes that do not (weights, grads, AdamW, temporaries, chunks)
    host_optimizer: float = 0.0  # optimizer state + fp32 master + grads on the host (optimizer_offload)
    host_ckpt: float = 0.0  # host bytes of offloaded inputs under this policy without Mesa ('offload')
    host_mesa_ckpt: float = 0.0  # ... and with Mesa (8-bit codes)
    host_total: float = 0.0  # every host byte of this rank at its peak (memory_per_gpu's docstring)
    head_groups: int = 1  # softmax attention runs in this many head groups (training.attn_head_chunk)


def _model_state(cfg: Any, *, world: int, engine: str, zero_stage: int, bf16: bool, replicate: int,
                 optimizer_offload: bool) -> dict[str, float]:
    """Device bytes of weights, gradients, AdamW state, gathered layers, optimizer temporaries; host bytes of
    the optimizer state moved there by `optimizer_offload` and of the loading peak."""
    P = cfg.n_params
    per_layer_params = (P - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)) / cfg.n_layers
    w_bytes = g_bytes = 4  # fp32 master weights in every engine (FSDP2 mixed precision keeps sharded fp32)
    shard_p = shard_g = shard_o = 1
    if engine == "fsdp2":
        shard_p = shard_g = shard_o = world // replicate
    elif engine == "deepspeed":
        shard_o = world if zero_stage >= 1 else 1
        shard_g = world if zero_stage >= 2 else 1
        shard_p = world if zero_stage >= 3 else 1
        if bf16:
            w_bytes = 2 + (4 / max(1, shard_o)) * shard_p  # bf16 module weights + fp32 master (in the optimizer)
            g_bytes = 2
    params = P * w_bytes / shard_p
    grads = P * g_bytes / shard_g
    optimizer = P * 8 / shard_o
    gathered = 0.0
    if engine == "fsdp2" or (engine == "deepspeed" and zero_stage >= 3):
        gathered = 2 * per_layer_params * (2 if bf16 else 4) * 2  # two gathered layers (prefetch) + their grads
    if engine == "fsdp2":  # the root (embedding, final norm, output) is not resharded after forward: whole
        # from the first forward to the end of backward (measured by the run's plan check, launcher/planned.py)
        gathered += (cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2) + cfg.dim) * (2 if bf16 else 4)
    opt_temp = P * 4 / shard_o  # foreach AdamW temporaries (about one fp32 copy of the local shard)
    host_opt = 0.0
    if optimizer_offload:  # training.optimizer_offload (parallel/engines.py: shard_fsdp2, deepspeed_config)
        if engine not in ("fsdp2", "deepspeed"):
            raise ConfigError(f"optimizer offload works with fsdp2 and deepspeed, not {engine!r}")
        # AdamW m, v + fp32 master + fp32 grads of the local shard (16 bytes per parameter per shard) and the
        # foreach step's temporaries (4) on the host, where the step runs; FSDP2 (CPUOffloadPolicy) keeps
        # nothing of them on the device, DeepSpeed (ZeRO-Offload) keeps the module weights and its gradient
        # partitions there
        host_opt, optimizer, opt_temp = 20 * P / shard_o, 0.0, 0.0
        params, grads = (0.0, 0.0) if engine == "fsdp2" else (P * (2 if bf16 else 4) / shard_p, grads)
    # loading: FSDP2 builds on the meta device and reads only its shards (plus one whole tensor at a
    # time, the largest being the embedding); DDP / DeepSpeed hold the whole model on every rank
    largest = 4 * cfg.vocab_size * cfg.dim
    loading = (P * 4 / shard_p + largest) if engine == "fsdp2" else P * 4 + largest
    return {"params": params, "grads": grads, "optimizer": optimizer, "gathered": gathered, "opt_temp": opt_temp,
            "host_optimizer": host_opt, "loading": loading}


def memory_per_gpu(cfg: Any, *, world: int, sp: int, micro_batch: int, seq_len: int, dtype: str, engine: str,
                   zero_stage: int, checkpointing: bool | str, mesa: bool, loss_chunk: int | str = 0,
                   mlp_chunk: int | str = 0, replicate: int = 1, optimizer_offload: bool = False,
                   attn_head_chunk: int | str = 0, head_divisor: int = 1) -> Memory:
    """Bytes per GPU for one training step of the recipe's shape (peak = persistent + live activations).

    `loss_chunk` / `mlp_chunk` / `attn_head_chunk` as in [training] ('auto', 0 or tokens / heads; with
    `head_divisor` the Ulysses degree 'auto' groups must split over); the defaults here (0) are the
    unchunked paths. FSDP2 shards parameters, gradients and AdamW state over world / `replicate`
    ranks (parallel.dp_replicate; 1 = all). `optimizer_offload` moves AdamW m, v, the fp32 master, the
    gradients of the local shard and the step's temporaries (20 B/param/shard) to the host.

    Host memory per GPU (one rank), not part of `total`:
        host_total = HOST_BASELINE_BYTES + max(loading_peak, host_offload + host_optimizer)
    host_offload: the offloaded checkpointed inputs at their stored width (a bytes per element, 1 with
    Mesa); pinned staging adds nothing: the InputStore's host buffers (kernels/offload.py) are pinned and
    are the store itself. host_optimizer: 0 unless `optimizer_offload`. loading_peak is a separate moment (the model is
    built and read before the first step allocates anything), hence the max."""
    from longtrain.models.memory import checkpoint_policy, mlp_chunk_tokens

    bf16 = dtype == "bf16"
    st = _model_state(cfg, world=world, engine=engine, zero_stage=zero_stage, bf16=bf16, replicate=replicate,
                      optimizer_offload=optimizer_offload)
    params, grads, optimizer, gathered, opt_temp = (st[k] for k in ("params", "grads", "optimizer", "gathered",
                                                                    "opt_temp"))
    transient = gathered + opt_temp
    tokens = micro_batch * seq_len / sp
    a = 2 if bf16 else 4
    att_frac = _attention_fraction(cfg)
    tile = mlp_chunk_tokens(mlp_chunk, cfg.ffn_dim, int(tokens), a)
    tiled = 0 < tile < tokens
    groups = head_groups(cfg, attn_head_chunk, tokens, a, head_divisor)
    policy = checkpoint_policy(checkpointing)
    ckpt = policy != "none"

    def acts(m: bool, c: bool | str) -> dict[str, float]:
        return activation_bytes_per_token(cfg, a, mesa=m, checkpointing=c, attention_fraction=att_frac,
                                          mlp_tiled=tiled, head_groups=groups)

    ck_kind = policy if ckpt else "full"
    table = {(m, c): tokens * acts(m, ck_kind if c else "none")["total"] for m in (False, True) for c in (False, True)}
    host_table = {m: tokens * acts(m, ck_kind)["host"] for m in (False, True)}
    mine = acts(mesa, policy)
    act = tokens * mine["total"]
    host = tokens * mine["host"]
    loss = loss_bytes(cfg, tokens, loss_chunk, a)
    logits = tokens * loss["per_token"] + loss["fixed"]
    layer_act = tokens * mine["per_layer"]
    mlp_tile = 8 * a * cfg.ffn_dim * tile if tiled else 0.0  # tile intermediates + their gradients
    # Peak = what lives all step + the largest of three moments: the start of backward (all saved activations
    # and the loss's working set; with Mesa also one layer dequantized), its end (all gradients, plus the
    # recomputed last layer and the layer inputs with checkpointing, a tile) and the optimizer step (gradients
    # + foreach temporaries). The MLP's backward holds gradients of two [tokens, ffn] intermediates (one tile's
    # when tiled); the loss's backward ends before the first (recomputed) layer's begins: they do not add up
    mlp_bwd = 0.0 if tiled else 2 * a * cfg.ffn_dim * tokens
    recompute = tokens * mine["recompute"]
    backward_start = act - recompute + max(logits, recompute + mlp_bwd) + gathered
    if mesa and policy == "none":  # a layer's forward holds its norm output and attention (or MLP) tensors
        # exactly beside their 8-bit copies until it lets go of them (backward decodes one tensor at a time)
        backward_start = max(backward_start, act + tokens * mine["mesa_transient"] + mlp_bwd + gathered)
    backward_end = grads + (act if ckpt else layer_act) + gathered + mlp_tile
    optimizer_step = grads + opt_temp
    total = params + optimizer + max(backward_start, backward_end, optimizer_step)
    per_token = {"saved activations": mine["kept_layers"], "checkpointed inputs (device)": mine["inputs"] - mine["host"],
                 "recomputed layer": mine["recompute"], "loss": loss["per_token"],
                 "checkpointed inputs (host)": mine["host"]}
    fixed = params + optimizer + grads + transient + loss["fixed"] + mlp_tile
    host_total = HOST_BASELINE_BYTES + max(st["loading"], host + st["host_optimizer"])
    return Memory(params, grads, optimizer, act, table[(False, False)], table[(False, True)], table[(True, False)],
                  table[(True, True)], logits, transient, total, host, mlp_tile, st["loading"], per_token, fixed,
                  host_optimizer=st["host_optimizer"], host_ckpt=host_table[False], host_mesa_ckpt=host_table[True],
                  host_total=host_total, head_groups=groups)


# ---- time ------------------------------------------------------------------------------------

def flops_per_token(cfg: Any, seq_len: int, *, checkpointing: bool | str, mlp_tiled: bool = False,
                    loss_chunked: bool = False, head_grouped: bool = False) -> dict[str, float]:
    """Training FLOPs per token: 6 x matmul params, plus causal attention 6 * S_ctx * H * D per layer
    (QK^T and PV, half of the square, x3 for backward); a recomputed layer adds its forward (x4/3
    for checkpointed layers); MLP tiles recompute the MLP forward, a chunked loss the projection,
    head groups the attention forward and its projections (every softmax layer, once more)."""
    from longtrain.models.memory import checkpointed_layers
    from longtrain.models.spans import layer_plan

    emb = cfg.vocab_size * cfg.dim  # the input embedding is a lookup
    dense = 6 * (cfg.n_params - emb)
    att_frac = _attention_fraction(cfg)
    attn = soft = 0.0
    for span in layer_plan(cfg.attention, cfg.n_layers):
        if span.kind == "lightning":
            attn += 6 * 2 * cfg.n_heads * cfg.head_dim * cfg.head_dim  # chunked state updates, O(D^2)
        else:
            ctx = min(seq_len, span.window) if getattr(span, "window", None) else seq_len / 2
            attn += 6 * 2 * ctx * cfg.n_heads * cfg.head_dim * att_frac
            soft += 6 * 2 * ctx * cfg.n_heads * cfg.head_dim
    total = dense + attn
    frac = checkpointed_layers(checkpointing, cfg.n_layers) / cfg.n_layers
    out_proj = 2 * cfg.vocab_size * cfg.dim
    total = (total - out_proj * 3) * (1 + frac / 3) + out_proj * 3  # the LM head is not in a layer
    attn *= 1 + frac / 3
    if mlp_tiled:  # layers not checkpointed recompute their MLP tile by tile
        total += (1 - frac) * cfg.n_layers * 2 * 3 * cfg.dim * cfg.ffn_dim
    if loss_chunked:
        total += out_proj
    if head_grouped and getattr(cfg, "moh", None) is None:  # + one forward of softmax attention and its projections
        proj = _n_softmax_layers(cfg) * 2 * cfg.dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        total += soft / 3 + proj
        attn += soft / 3
    return {"total": total, "attention": attn}


def sp_comm_bytes(cfg: Any, impl: str, sp: int, tokens_local: float, act_bytes: int,
                  ulysses_degree: int = 0) -> dict[str, float]:
    """Bytes each rank sends per step on its busiest link direction for one sp group (all layers).

    ring:      K,V (kv heads) W-1 times forward; K,V and dK,dV W-1 times backward (3x forward).
    tokenring: Q travels one way and (out, lse) comes back the other way, concurrently, so the
               busier direction counts: forward Q | out+lse; backward Q+dO+lse | dQ (fp32).
    ulysses:   4 all-to-alls forward (q, k, v, out) and 4 backward; each sends (W-1)/W of the tensor.
    hybrid:    ulysses over u ranks inside the node, ring over sp/u groups (hybrid-tokenring:
               TokenRing over the groups).
    """
    if sp == 1:
        return {"bytes": 0.0, "overlappable": True}
    W, L = sp, _n_softmax_layers(cfg)
    t, a = tokens_local, act_bytes
    hq, hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if impl == "ring":
        per_layer = 3 * (W - 1) * 2 * t * hkv * D * a
        return {"bytes": L * per_layer, "overlappable": True}
    if impl == "tokenring":
        fwd = max(t * hq * D * a, t * hq * D * a + t * hq * 4)
        bwd = max(2 * t * hq * D * a + t * hq * 4, t * hq * D * 4)
        return {"bytes": L * (W - 1) * (fwd + bwd), "overlappable": True}
    if impl == "ulysses":
        per = t * (2 * hq + 2 * hkv) * D * a * (W - 1) / W
        return {"bytes": L * 2 * per, "overlappable": False}
    if impl in ("hybrid", "hybrid-tokenring"):
        u = ulysses_degree or default_ulysses_degree(W, hq, hkv)
        r = W // u
        uly = sp_comm_bytes(cfg, "ulysses", u, t, a)["bytes"]
        # after the all-to-all each rank holds t*u tokens of hq/u heads: the ring moves 1/u of the heads
        outer = "ring" if impl == "hybrid" else "tokenring"
        ring = sp_comm_bytes(cfg, outer, r, t * u, a)["bytes"] / max(1, u) if r > 1 else 0.0
        return {"bytes": uly + ring, "overlappable": False, "ulysses": u, "ring": r,
                "ulysses_bytes": uly, "ring_bytes": ring}
    raise ConfigError(f"unknown sp_impl {impl!r}")


def _n_softmax_layers(cfg: Any) -> int:
    from longtrain.models.spans import layer_plan

    return sum(1 for s in layer_plan(cfg.attention, cfg.n_layers) if s.kind != "lightning")


@dataclass
class StepTime:
    impl: str
    compute_s: float
    attention_s: float
    sp_comm_s: float
    sp_exposed_s: float
    dp_comm_s: float
    step_s: float
    tokens_per_s: float
    feasible: bool
    note: str = ""


def step_time(cfg: Any, gpu: GPU, inter_gbs: float, *, world: int, sp: int, impl: str, micro_batch: int,
              grad_accum: int, seq_len: int, dtype: str, engine: str, checkpointing: bool | str, mfu: float,
              gpus_per_node: int, ulysses_degree: int = 0, zero_stage: int = 0, loss_chunk: int | str = 0,
              mlp_chunk: int | str = 0, replicate: int = 1, attn_head_chunk: int | str = 0) -> StepTime:
    """Seconds per optimizer step on each GPU and global tokens per second."""
    tokens_local = micro_batch * seq_len / sp
    from longtrain.models.memory import loss_chunk_tokens, mlp_chunk_tokens

    a = 2 if dtype == "bf16" else 4
    tile = mlp_chunk_tokens(mlp_chunk, cfg.ffn_dim, int(tokens_local), a)
    chunk = loss_chunk_tokens(loss_chunk, cfg.vocab_size)
    grouped = head_groups(cfg, attn_head_chunk, tokens_local, a, ulysses_split_degree(sp, impl, ulysses_degree)) > 1
    f = flops_per_token(cfg, seq_len, checkpointing=checkpointing, mlp_tiled=0 < tile < tokens_local,
                        loss_chunked=0 < chunk < tokens_local, head_grouped=grouped)
    peak = (gpu.bf16_tflops if dtype == "bf16" else gpu.tf32_tflops) * 1e12 * mfu
    compute = grad_accum * tokens_local * f["total"] / peak
    attention = grad_accum * tokens_local * f["attention"] / peak
    note, feasible = "", True
    if impl in ("ulysses", "hybrid", "hybrid-tokenring") and sp > 1:
        u = sp if impl == "ulysses" else (ulysses_degree or default_ulysses_degree(sp, cfg.n_heads, cfg.n_kv_heads))
        if not ulysses_heads_ok(u, cfg.n_heads, cfg.n_kv_heads):
            feasible, note = False, f"{cfg.n_heads} query / {cfg.n_kv_heads} kv heads cannot be split over {u} ranks"
    comm = sp_comm_bytes(cfg, impl, sp, tokens_local, a, ulysses_degree)
    if grouped:  # head groups run each layer's attention forward, and its traffic, once more
        comm = {k: v * 4 / 3 if k.endswith("bytes") else v for k, v in comm.items()}
    in_node = sp <= gpus_per_node
    bw = (gpu.intra_gbs if in_node else inter_gbs) * 1e9
    att_micro = attention / grad_accum  # ring/TokenRing hide their traffic behind one micro-batch's attention
    if impl in ("hybrid", "hybrid-tokenring") and sp > 1:
        sp_s = comm["ulysses_bytes"] / (gpu.intra_gbs * 1e9) + comm["ring_bytes"] / bw
        exposed = comm["ulysses_bytes"] / (gpu.intra_gbs * 1e9) + max(0.0, comm["ring_bytes"] / bw - att_micro)
    else:
        sp_s = comm["bytes"] / bw
        exposed = max(0.0, sp_s - att_micro) if comm["overlappable"] else sp_s
    sp_s *= grad_accum
    exposed *= grad_accum
    # data parallel: FSDP2 / ZeRO-3 gather params fwd+bwd (bf16 or fp32) and reduce-scatter fp32
    # grads; DDP / ZeRO-1/2 all-reduce grads (2x); ring algorithms send (n-1)/n of it.
    P, n = cfg.n_params, world
    if engine == "fsdp2":  # plain or hybrid (fsdp_traffic): intra- and inter-node parts at their links
        tr = fsdp_traffic(P, world=world, replicate=replicate, gpus_per_node=gpus_per_node, param_bytes=a,
                          grad_accum=grad_accum)
        dp_s = tr["intra_bytes"] / (gpu.intra_gbs * 1e9) + tr["inter_bytes"] / (inter_gbs * 1e9)
    elif n > 1:
        zero3 = engine == "deepspeed" and zero_stage >= 3
        dp_bytes = ((2 * a + 4) if zero3 else 2 * 4) * P * (n - 1) / n
        dp_bw = (gpu.intra_gbs if world <= gpus_per_node else inter_gbs) * 1e9
        dp_s = dp_bytes / dp_bw
    else:
        dp_s = 0.0
    step = max(compute, dp_s) + exposed  # dp traffic overlaps with compute (FSDP prefetch, DDP buckets)
    tokens = (world // sp) * micro_batch * grad_accum * seq_len
    return StepTime(impl, compute, attention, sp_s, exposed, dp_s, step, tokens / step, feasible, note)
