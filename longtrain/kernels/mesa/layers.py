"""Mesa for whole blocks: the forward stays exact, the copies saved for backward are 8-bit.

Mechanism: `mesa_scope(state, layer)` installs `torch.autograd.graph.saved_tensors_hooks`
around one block's forward. Every tensor autograd saves inside the scope goes
through `pack`: activations are quantized (per head for 4-D attention tensors,
per channel chunk otherwise) with running range estimates that live in a
`MesaState` module (buffers, so they are part of state_dict and checkpoints);
`unpack` dequantizes in backward. Kernels (attention, lightning, ring/TokenRing
under sequence parallelism) need no Mesa code: whatever they save is seen here.

Which saved tensors are quantized (the rule, in order; the first match keeps it exact):
  1. not floating point;
  2. a parameter: an nn.Parameter or any leaf that requires grad, or a view /
     dtype copy of one (autocast's bf16 weight copies, `w.t()`);
  3. fewer than `min_numel` elements, fewer than 2 dims, or a last dim < 8
     (per-row statistics: RMSNorm's rstd [B,S,1], lse stored as [B,H,S,1]);
  4. does not require grad and is not a 4-D attention-layout tensor whose dims 1
     and 2 are both > 1: constants and kernel-internal statistics such as the
     softmax lse [B,H,S] (fp32), RoPE cos/sin [B|1,S,1,D], masks; 4-D tensors a
     kernel saves internally (q/k/v/out copies in [B,H,S,D], lightning states
     [B,H,D,D]) ARE quantized;
  5. expanded (a stride-0 dim of size > 1): quantizing would materialize it.
Everything else is quantized.

Stored once: a tensor saved several times (q/k/v projections share their input;
`out` is saved by attention and, as a view, by the output projection) is packed
once per scope, and so are dtype copies of the same tensor made per consumer
(autocast casts a Linear's input to bf16 once per Linear).

Running estimates: one per (layer, slot, group count), the slot being the order of
first appearance of a quantized tensor in the layer's forward. They update in
train() mode (EMA, first step copies) and are read-only in eval(). The range a
tensor is quantized with is, by default (`range_mode="cover"`), the running
estimate widened to the tensor's own min/max, so nothing saturates: early in
training activations grow faster than a decay-0.9 EMA follows, and with the
running range alone (`range_mode="ema"`, upstream Mesa) 13-48 % of the residual
stream saturated in the first 10 steps and per-parameter gradient cosines fell to 0.27
(docs/mesa.md).

Activation checkpointing (torch.utils.checkpoint, non-reentrant): when the scope
opens inside a checkpointed function (its hooks are the innermost ones), it
steps aside: the block keeps nothing for backward but its input and recomputes its
activations in backward from it. With `enable_mesa(..., inputs=True)` that input is
stored in 8 bits (`MesaInputCodec`, on the device or offloaded to host memory,
kernels/offload.py) and decoded before the recompute, and the layer is checkpointed by
`mesa_checkpoint` instead, whose recompute saves its tensors in 8 bits as this scope would;
without, checkpoint holds the input exactly. Layers that are not checkpointed are quantized as usual.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from longtrain.kernels.mesa.config import MesaConfig
from longtrain.kernels.mesa.quant import QTensor, dequantize, group_layout, quantize, row_blocks

_VIEWLIKE = frozenset({
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0",
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0",
    "AliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "CloneBackward0", "SliceBackward0", "SelectBackward0",
    "AsStridedBackward0", "ViewAsRealBackward0",
})



class _LayerRanges(nn.Module):
    """Running estimates of one layer: [slots, max_groups] shift/span, per-slot step and group count."""

    def __init__(self, slots: int, max_groups: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(slots, max_groups))
        self.register_buffer("span", torch.zeros(slots, max_groups))
        self.register_buffer("steps", torch.zeros(slots, dtype=torch.long))
        self.register_buffer("groups", torch.zeros(slots, dtype=torch.long))

    @torch.no_grad()
    def estimate(self, slot: int, mn: Tensor, mx: Tensor, decay: float, update: bool) -> tuple[Tensor, Tensor]:
        """Fold the observed per-group (mn, mx) into slot `slot`; return (shift, span) to quantize with.

        Branch-free (no host sync): a slot never seen, or seen with another group
        count, starts over from the observation.
        """
        g = mn.numel()
        sh, sp = self.shift[slot, :g], self.span[slot, :g]
        mn, width = mn.to(sh.dtype), (mx - mn).to(sh.dtype)
        fresh = (self.steps[slot] == 0) | (self.groups[slot] != g)
        new_sh = torch.where(fresh, mn, sh * decay + mn * (1.0 - decay))
        new_sp = torch.where(fresh, width, sp * decay + width * (1.0 - decay))
        if update:
            sh.copy_(new_sh)
            sp.copy_(new_sp)
            self.steps[slot] = torch.where(fresh, torch.ones_like(self.steps[slot]), self.steps[slot] + 1)
            self.groups[slot] = g
        return new_sh, new_sp


def _layer_key(layer: int | str) -> str:
    return str(layer).replace(".", "_")


class MesaState(nn.Module):
    """Holds the Mesa config and every layer's running estimates (as buffers).

    layers: the number of layers (ids 0..n-1) or an iterable of layer ids. Layers
    are created up front so that state_dict (and torch.distributed.checkpoint)
    sees every buffer before the first forward; an unknown id creates its
    estimates on first use, and load_state_dict creates those it finds.
    After a forward, `last_report[layer]` lists what each saved tensor became.
    """

    def __init__(self, config: MesaConfig | None = None, layers: int | Iterable[int | str] = 0) -> None:
        super().__init__()
        self.config = (config or MesaConfig()).validate()
        self.ranges = nn.ModuleDict()
        ids = list(range(layers)) if isinstance(layers, int) else list(layers)
        self.n_layers = len(ids)
        for i in ids:
            self.layer_ranges(i)
        self.last_report: dict[str, list[dict[str, Any]]] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._step_seed: int | None = None

    def layer_ranges(self, layer: int | str) -> _LayerRanges:
        key = _layer_key(layer)
        if key not in self.ranges:
            ref = next(iter(self.ranges.values()), None)
            r = _LayerRanges(self.config.slots, self.config.max_groups)
            if ref is not None:
                r.to(ref.shift.device)
            self.ranges[key] = r
        return self.ranges[key]

    def is_skipped(self, layer: int | str) -> bool:
        for s in self.config.skip_layers:
            if s == layer or str(s) == str(layer):
                return True
            if isinstance(s, int) and s < 0 and isinstance(layer, int) and self.n_layers \
                    and self.n_layers + s == layer:
                return True
        return False

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            if self._step_seed is not None:
                g.manual_seed(self._step_seed)
            else:
                dist = torch.distributed
                rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
                # the same seed on every rank would draw the same noise for the same element positions
                g.manual_seed(self.config.seed + 1_000_003 * rank)
            self._generators[key] = g
        return self._generators[key]

    def reseed(self, seed: int) -> None:
        """Restart the stochastic-rounding generators from `seed` (give each rank and step its own).

        The trainer calls this every step with a seed derived from (run seed, step, rank), so the
        rounding noise of a step does not depend on how many steps this process has run: a resumed
        run draws what an uninterrupted one would have."""
        self._step_seed = int(seed) % (2**63 - 1)
        for g in self._generators.values():
            g.manual_seed(self._step_seed)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        head = prefix + "ranges."
        for k in state_dict:
            if k.startswith(head):
                name = k[len(head):].split(".", 1)[0]
                if name not in self.ranges:
                    self.layer_ranges(name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scope(self, layer: int | str):
        """Same as `mesa_scope(self, layer)`."""
        return mesa_scope(self, layer)

    def extra_repr(self) -> str:
        c = self.config
        return (f"bits={c.bits}, group={c.group}, ema_decay={c.ema_decay}, stochastic={c.stochastic}, "
                f"range_mode={c.range_mode}")


# --------------------------------------------------------------------------- counting


@dataclass
class SavedBytes:
    """Bytes kept alive for backward, each storage / quantized record counted once.

    exact_bytes: full-precision activations (whole storages, as autograd keeps them).
    quantized_bytes: Mesa records (codes + per-group shift/span).
    param_bytes: parameters and views/dtype copies of them (not activations).
    """

    exact_bytes: int = 0
    quantized_bytes: int = 0
    param_bytes: int = 0
    n_exact: int = 0
    n_quantized: int = 0
    _seen: dict = field(default_factory=dict, repr=False)
    _gated: bool = field(default=False, repr=False)
    _depth: int = field(default=0, repr=False)

    def _counting(self) -> bool:
        return not self._gated or self._depth > 0

    @property
    def activation_bytes(self) -> int:
        return self.exact_bytes + self.quantized_bytes

    def _add_tensor(self, t: Tensor, param: bool) -> None:
        if not self._counting():
            return
        st = t.untyped_storage()
        key = ("s", st.data_ptr(), t.device.type)
        if key in self._seen:
            return
        self._seen[key] = st  # holding the storage keeps its address from being reused
        if param:
            self.param_bytes += st.nbytes()
        else:
            self.exact_bytes += st.nbytes()
            self.n_exact += 1

    def _add_record(self, rec: Any, nbytes: int) -> None:
        if not self._counting():
            return
        key = ("q", id(rec))
        if key in self._seen:
            return
        self._seen[key] = rec
        self.quantized_bytes += nbytes
        self.n_quantized += 1

    def as_dict(self) -> dict[str, int]:
        return {"activation_bytes": self.activation_bytes, "exact_bytes": self.exact_bytes,
                "quantized_bytes": self.quantized_bytes, "param_bytes": self.param_bytes,
                "n_exact": self.n_exact, "n_quantized": self.n_quantized}


_COUNTERS: list[SavedBytes] = []


@contextmanager
def saved_bytes_counter(modules: Iterable[nn.Module] | None = None) -> Iterator[SavedBytes]:
    """Count bytes of tensors saved for backward during the block, with or without Mesa.

    Installs a pass-through saved-tensor hook (outermost); Mesa scopes inside it
    report what they keep. With `modules`, only tensors saved while one of their
    forwards runs count (e.g. the transformer blocks, leaving out the LM head).
    Tensors saved inside a checkpointed function are invisible (checkpoint's own
    hooks take them) and count nothing.
    """
    c = SavedBytes()
    handles = []
    if modules is not None:
        c._gated = True

        def enter(*_: Any) -> None:
            c._depth += 1

        def leave(*_: Any) -> None:
            c._depth -= 1

        for m in modules:
            handles.append(m.register_forward_pre_hook(enter))
            handles.append(m.register_forward_hook(leave))
    _COUNTERS.append(c)

    def pack(t: Tensor) -> Tensor:
        # an inner counter's hook shadows the outer ones: report to every active counter
        param = _is_param_like(t)
        for cc in _COUNTERS:
            cc._add_tensor(t, param=param)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield c
    finally:
        _COUNTERS.remove(c)
        for h in handles:
            h.remove()
        c._seen.clear()


# --------------------------------------------------------------------------- the scope


def _is_param_like(t: Tensor) -> bool:
    if isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad):
        return True
    node = t.grad_fn
    for _ in range(8):
        if node is None:
            return False
        name = node.name()
        if name.endswith("AccumulateGrad"):
            return True
        if name not in _VIEWLIKE:
            return False
        nxt = [f for f, _ in node.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        node = nxt[0]
    return False


def _under_checkpoint() -> bool:
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if not top:
        return False
    qual = getattr(top[0], "__qualname__", "")
    return qual.startswith(("_checkpoint_hook.", "_recomputation_hook.", "_Recompute."))


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    for d in range(cap, 0, -1):
        if n % d == 0:
            return d
    return 1


def channel_groups(cfg: MesaConfig, channels: int) -> int:
    """Groups of about `group_size` channels (at most `max_groups`) that divide `channels`."""
    return _largest_divisor_at_most(channels, min(cfg.max_groups, max(1, channels // cfg.group_size)))


def quantization_range(cfg: MesaConfig, shift: Tensor, span: Tensor, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
    """The (shift, span) a tensor is quantized with, from the running estimate and its own min/max
    (range_mode: 'cover' widens the estimate to them, 'current' uses them, 'ema' the estimate)."""
    if cfg.range_mode == "cover":
        lo = torch.minimum(shift, mn)
        return lo, torch.maximum(shift + span, mx) - lo
    if cfg.range_mode == "current":
        return mn, mx - mn
    return shift, span


class _Entry:
    """One quantized record; several saved tensors may point at it."""

    __slots__ = ("q", "start", "numel", "backend", "row_scale", "__weakref__")

    def __init__(self, q: QTensor, start: int, numel: int, backend: str, row_scale: Tensor | None) -> None:
        self.q, self.start, self.numel, self.backend = q, start, numel, backend
        self.row_scale = row_scale  # bf16 [..., 1] per-row absmax (4-D tensors), or None

    @property
    def nbytes(self) -> int:
        rs = self.row_scale
        return self.q.nbytes + (rs.numel() * rs.element_size() if rs is not None else 0)


class _Saved:
    """What autograd holds instead of a tensor: the record and how to view it."""

    __slots__ = ("entry", "shape", "stride", "offset", "dtype")

    def __init__(self, entry: _Entry, shape: torch.Size, stride: tuple[int, ...], offset: int,
                 dtype: torch.dtype) -> None:
        self.entry, self.shape, self.stride, self.offset, self.dtype = entry, shape, stride, offset, dtype


def _unpack(p: Any) -> Tensor:
    if isinstance(p, Tensor):
        return p
    e = p.entry
    if e.row_scale is None:
        flat = dequantize(e.q, dtype=p.dtype, backend=e.backend).reshape(-1)
    else:
        y = dequantize(e.q, dtype=torch.float32, backend=e.backend)
        flat = (y.view(*e.row_scale.shape[:-1], -1) * e.row_scale.float()).to(p.dtype).reshape(-1)
    return flat.as_strided(p.shape, p.stride, p.offset)


class _ScopeRun:
    """State of one scope (one block forward): slot counter and the dedupe cache."""

    def __init__(self, state: MesaState, layer: int | str) -> None:
        self.state, self.cfg = state, state.config
        self.layer = layer
        self.ranges = state.layer_ranges(layer)
        self.slot = 0
        # weak: a tensor quantized here is freed as soon as the forward lets go of it (holding it would
        # keep a whole exact layer alive until the scope closes); an expired storage never matches, so a
        # later tensor at a reused address is not mistaken for it
        self.by_storage: dict[tuple, list[tuple[_Entry, StorageWeakRef]]] = {}
        self.by_cast: dict[tuple, tuple[_Saved, Any]] = {}  # the copy's grad_fn, keeping the key's id unique
        self.report: list[dict[str, Any]] = []
        state.last_report[_layer_key(layer)] = self.report

    def close(self) -> None:
        self.by_storage.clear()
        self.by_cast.clear()

    # which tensors stay exact ------------------------------------------------------------
    def keep_reason(self, t: Tensor) -> str | None:
        if not t.is_floating_point():
            return "not floating"
        if _is_param_like(t):
            return "parameter"
        if t.numel() < self.cfg.min_numel or t.dim() < 2 or t.shape[-1] < 8:
            return "small or per-row statistic"
        if not t.requires_grad and (t.dim() != 4 or min(t.shape[1], t.shape[2]) == 1):
            return "constant or statistic (no grad, not a 4-D attention tensor)"
        if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
            return "expanded view"
        return None

    def _report(self, t: Tensor, action: str, slot: int | None = None) -> None:
        self.report.append({"shape": tuple(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                            "action": action, "slot": slot})

    # pack / unpack -----------------------------------------------------------------------
    def pack(self, t: Tensor) -> Any:
        reason = self.keep_reason(t)
        if reason is not None:
            for c in _COUNTERS:
                c._add_tensor(t, param=reason == "parameter")
            self._report(t, "exact: " + reason)
            return t
        saved = self._lookup(t)
        if saved is None:
            saved = self._quantize(t)
        else:
            self._report(t, "shared", None)
        for c in _COUNTERS:
            c._add_record(saved.entry, saved.entry.nbytes)
        return saved

    def unpack(self, p: Any) -> Tensor:
        return _unpack(p)

    def _storage_key(self, t: Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.device, t.dtype, t._version)

    def _cast_key(self, t: Tensor) -> tuple | None:
        """Identifies t as (a view of) a dtype copy of another tensor: equal keys, equal values."""
        fn = t.grad_fn
        for _ in range(4):
            if fn is None:
                return None
            name = fn.name()
            if name == "ToCopyBackward0":
                src, nr = fn.next_functions[0]
                if src is None:
                    return None
                return (id(src), nr, t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset())
            if name not in _VIEWLIKE or name == "CloneBackward0":
                return None
            nxt = [f for f, _ in fn.next_functions if f is not None]
            if len(nxt) != 1:
                return None
            fn = nxt[0]
        return None

    def _lookup(self, t: Tensor) -> _Saved | None:
        lo = t.storage_offset()
        if all(s >= 0 for s in t.stride()):
            hi = lo + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            for entry, ref in self.by_storage.get(self._storage_key(t), ()):
                if not ref.expired() and entry.start <= lo and hi < entry.start + entry.numel:
                    return _Saved(entry, t.shape, t.stride(), lo - entry.start, t.dtype)
        ck = self._cast_key(t)
        if ck is not None and ck in self.by_cast:
            return self.by_cast[ck][0]
        return None

    def _groups(self, shape: torch.Size) -> tuple[int, int]:
        """(dim, groups) of the memory-order shape."""
        cfg = self.cfg
        if cfg.group == "head" and len(shape) == 4:
            h = 2 if shape[2] <= shape[1] else 1  # heads are the smaller of dims 1 and 2
            return h, _largest_divisor_at_most(shape[h], cfg.max_groups)
        c = shape[-1]
        return len(shape) - 1, channel_groups(cfg, c)

    def _quantize(self, t: Tensor) -> _Saved:
        cfg = self.cfg
        if self.slot >= cfg.slots:
            raise RuntimeError(f"mesa: layer {self.layer} saves more than {cfg.slots} quantizable tensors; "
                               "raise MesaConfig.slots")
        slot = self.slot
        self.slot += 1
        mem = _memory_order(t)
        if mem is not None:
            start, shape, stride = t.storage_offset(), t.shape, t.stride()
            offset = 0
        else:  # gaps between elements (a slice): quantize a compact copy
            mem = t.contiguous()
            start, shape, stride, offset = -1, mem.shape, mem.stride(), 0
        dim, g = self._groups(mem.shape)
        row_scale = None
        with torch.no_grad():
            if cfg.row_scale and mem.dim() == 4:
                # unnormalized attention outputs (lightning) vary by orders of magnitude between
                # tokens, and a per-head norm follows them in backward: scale each (token, head)
                # row to absmax 1 first so the per-head range fits every row
                row_scale = mem.abs().amax(dim=-1, keepdim=True).to(torch.bfloat16).clamp_min(1e-30)
                mem = mem / row_scale.float()
        x3 = mem.reshape(group_layout(mem.shape, g, dim))
        with torch.no_grad():
            mn, mx = x3.amin(dim=(0, 2)).float(), x3.amax(dim=(0, 2)).float()
            shift, span = self.ranges.estimate(slot, mn, mx, float(cfg.ema_decay), self.state.training)
            shift, span = quantization_range(cfg, shift, span, mn, mx)
            backend = cfg.backend
            q = quantize(x3, g, dim=1, shift=shift, span=span, bits=cfg.bits, stochastic=cfg.stochastic,
                         backend=backend, generator=self.state.generator(t.device))
        entry = _Entry(q, max(start, 0), mem.numel(), backend, row_scale)
        saved = _Saved(entry, shape, stride, offset, t.dtype)
        if start >= 0:
            self.by_storage.setdefault(self._storage_key(t), []).append((entry, StorageWeakRef(t.untyped_storage())))
        ck = self._cast_key(t)
        if ck is not None:
            self.by_cast[ck] = (saved, t.grad_fn)
        self._report(t, f"quantized {cfg.bits}-bit, {g} groups along dim {dim} of {tuple(mem.shape)}", slot)
        return saved


def _memory_order(t: Tensor) -> Tensor | None:
    """t permuted so that it is contiguous (a view), or None if t has gaps or overlaps."""
    if t.is_contiguous():
        return t
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    tm = t.permute(perm)
    return tm if tm.is_contiguous() else None


@contextmanager
def mesa_scope(state: MesaState | None, layer: int | str) -> Iterator[Any]:
    """Save the activations of the enclosed forward in `state.config.bits` bits.

    A no-op when state is None or disabled, the layer is in skip_layers, grad is
    off, or the scope opens inside a checkpointed function (see module doc).
    """
    if (state is None or not state.config.enabled or state.is_skipped(layer)
            or not torch.is_grad_enabled() or _under_checkpoint()):
        yield None
        return
    run = _ScopeRun(state, layer)
    try:
        with torch.autograd.graph.saved_tensors_hooks(run.pack, run.unpack):
            yield run
    finally:
        run.close()


def enable_mesa(model: nn.Module, config: MesaConfig, inputs: bool = False) -> MesaState | None:
    """Attach Mesa to every block of `model` that has a `mesa_scope` attribute.

    Registers the state as `model.mesa` (so its buffers are in model.state_dict())
    and sets `block.mesa_scope = partial(mesa_scope, state, block.layer_idx)`.
    With `inputs` (the run checkpoints layers) the inputs of checkpointed layers are stored in
    8 bits too: running estimates `input<i>` per block and `model.input_codec` (MesaInputCodec).
    Returns the state, or None (and detaches) when config.enabled is False.
    """
    blocks = [m for m in model.modules() if hasattr(m, "mesa_scope") and m is not model]
    if not config.enabled:
        for b in blocks:
            b.mesa_scope = None
        if hasattr(model, "mesa"):
            del model.mesa
        if hasattr(model, "input_codec"):
            model.input_codec = None
        return None
    ids = [getattr(b, "layer_idx", i) for i, b in enumerate(blocks)]
    state = MesaState(config, ids + ([input_key(i) for i in ids] if inputs else []))
    state.n_layers = len(ids)
    # the compute device: a buffer's (with FSDP2's CPU offload the parameters' shards live on the host)
    first = next(iter(model.buffers()), None)
    first = first if first is not None else next(iter(model.parameters()), None)
    if first is not None:
        state.to(first.device)
    model.mesa = state
    for b, i in zip(blocks, ids):
        b.mesa_scope = functools.partial(mesa_scope, state, i)
    if hasattr(model, "input_codec"):
        model.input_codec = MesaInputCodec(state) if inputs else None
    return state

# the launcher imports this name
attach_mesa = enable_mesa


# --------------------------------------------------------------------------- checkpointed inputs


def input_key(layer: int | str) -> str:
    """The MesaState id of the running estimates for layer `layer`'s checkpointed input."""
    return f"input{layer}"


class MesaInputCodec:
    """8-bit codes for the input [B, S, dim] of a checkpointed layer (kernels/offload.InputCodec).

    The input is the residual stream. It is stored as each token's absmax (bf16, 2 bytes per
    token: LLM residual streams have tokens orders of magnitude larger than others) and, of the
    row-scaled values, `bits`-bit codes per chunk of `group_size` channels with Mesa's running
    range (slot 0 of `input_key(layer)`, range_mode as configured) and its stochastic rounding.
    Backward recomputes the layer from the decoded input: the forward stays exact, the saved
    activations and gradients of that layer are those at the decoded input."""

    def __init__(self, state: MesaState) -> None:
        self.state, self.cfg = state, state.config

    def encode(self, key: int, x: Tensor) -> tuple[dict[str, Tensor], Any]:
        cfg = self.cfg
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(f"mesa input codec: expected a floating [..., dim] tensor, got {tuple(x.shape)} {x.dtype}")
        if self.state.is_skipped(key):  # mesa.skip_layers: this layer's input stays exact
            return {"x": x}, None
        x = x.contiguous()
        c = x.shape[-1]
        g = channel_groups(cfg, c)
        xf = x.view(-1, c)
        # block by block of tokens (quant.row_blocks): the row-scaled fp32 copy is then a constant, not
        # 4 bytes per element of the whole input (16 GiB at 1M tokens x 4096 in bf16)
        blocks = row_blocks(xf.shape[0], c) if c % 8 == 0 else [slice(0, xf.shape[0])]  # packed codes split by bytes
        rows = torch.empty(xf.shape[0], 1, dtype=torch.bfloat16, device=x.device)
        mn = mx = None
        for b in blocks:  # pass 1: row scales and the range; pass 2 below scales again and quantizes
            rows[b] = xf[b].abs().amax(dim=-1, keepdim=True).to(torch.bfloat16).clamp_min(1e-30)
            y3 = (xf[b].float() / rows[b].float()).view(group_layout(xf[b].shape, g, -1))
            bmn, bmx = y3.amin(dim=(0, 2)), y3.amax(dim=(0, 2))
            mn, mx = (bmn, bmx) if mn is None else (torch.minimum(mn, bmn), torch.maximum(mx, bmx))
        ranges = self.state.layer_ranges(input_key(key))
        shift, span = quantization_range(cfg, *ranges.estimate(0, mn, mx, float(cfg.ema_decay), self.state.training),
                                         mn, mx)
        per_byte = 8 // cfg.bits
        codes = torch.empty(xf.numel() // per_byte, dtype=torch.uint8, device=x.device)
        for b in blocks:
            y3 = (xf[b].float() / rows[b].float()).view(group_layout(xf[b].shape, g, -1))
            q = quantize(y3, g, dim=1, shift=shift, span=span, bits=cfg.bits, stochastic=cfg.stochastic,
                         backend=cfg.backend, generator=self.state.generator(x.device))
            codes[b.start * c // per_byte:b.stop * c // per_byte] = q.codes
        payload = {"codes": codes, "shift": q.shift, "span": q.span, "rows": rows.view(*x.shape[:-1], 1)}
        return payload, (g, c // g, group_layout(xf.shape, g, -1), x.shape, x.dtype, cfg.bits)

    def decode(self, payload: dict[str, Tensor], meta: Any) -> Tensor:
        if meta is None:
            return payload["x"]
        groups, inner, qshape, shape, dtype, bits = meta
        codes, rows = payload["codes"], payload["rows"].view(-1, 1)
        c = shape[-1]
        n = rows.shape[0]
        blocks = row_blocks(n, c) if c % 8 == 0 else [slice(0, n)]
        per_byte = 8 // bits
        out = torch.empty(n, c, dtype=dtype, device=codes.device)
        for b in blocks:  # as in encode: one block's fp32 at a time
            m = b.stop - b.start
            q = QTensor(codes[b.start * c // per_byte:b.stop * c // per_byte], payload["shift"], payload["span"],
                        groups, inner, (m, groups, inner), torch.float32, bits)
            y = dequantize(q, dtype=torch.float32, backend=self.cfg.backend).view(m, c)
            out[b] = y * rows[b].float()
        return out.view(shape)

    def checkpoint(self, key: int, fn: Any, *args: Any) -> Any:
        """`torch.utils.checkpoint` (non-reentrant) for layer `key` whose recompute in backward saves
        the layer's activations in 8 bits, as `mesa_scope` does in a plain layer (`mesa_checkpoint`)."""
        return mesa_checkpoint(self.state, key, fn, *args)


class _Recompute:
    """One checkpointed call (see `mesa_checkpoint`). The forward's saved tensors become place
    numbers (`pack`); the first `unpack` in backward reruns `fn` under `rpack`, which keeps
    Mesa's 8-bit record (or the exact tensor, by Mesa's rules) of each saved tensor in order;
    each unpack then decodes its own and forgets it (a recomputed tensor is used once)."""

    def __init__(self, state: MesaState, layer: int | str, fn: Any, args: tuple) -> None:
        self.state, self.layer, self.fn, self.args = state, layer, fn, args
        self.count = 0
        self.saved: list[Any] | None = None
        dev = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
        self.device = dev
        self.amp = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        # the RNG as torch's checkpoint keeps it (preserve_rng_state): a recompute draws what the forward did
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)

    def pack(self, t: Tensor) -> int:
        self.count += 1
        return self.count - 1

    def unpack(self, i: int) -> Tensor:
        if self.saved is None:
            self._run()
        p = self.saved[i]
        if p is None:
            raise RuntimeError("mesa checkpoint: a recomputed tensor was unpacked twice "
                               "(backward through a checkpointed Mesa layer with retain_graph is not supported)")
        self.saved[i] = None
        return _unpack(p)

    def rpack(self, t: Tensor) -> None:
        p = self.run.pack(t)
        if isinstance(p, Tensor) and p.requires_grad:
            p = p.detach()  # do not keep the recompute's graph alive
        self.saved.append(p)

    def _run(self) -> None:
        self.saved, self.run = [], _ScopeRun(self.state, self.layer)
        cpu, cuda = self.rng
        devices = [self.device] if cuda is not None else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                    torch.autocast(self.device.type, dtype=self.amp[1], enabled=self.amp[0]), \
                    torch.autograd.graph.saved_tensors_hooks(self.rpack, _never_unpacked):
                torch.set_rng_state(cpu)
                if cuda is not None:
                    torch.cuda.set_rng_state(cuda, self.device)
                self.fn(*self.args)
        finally:
            self.run.close()
            self.fn = self.args = self.run = None
        if len(self.saved) != self.count:
            raise RuntimeError(f"mesa checkpoint: layer {self.layer} saved {self.count} tensors in forward and "
                               f"{len(self.saved)} in its recompute (its forward is not deterministic)")


def _never_unpacked(_: Any) -> Tensor:
    raise RuntimeError("mesa checkpoint: backward through a recomputed graph")


def mesa_checkpoint(state: MesaState, layer: int | str, fn: Any, *args: Any) -> Any:
    """`fn(*args)`, checkpointed: autograd keeps none of its activations, and backward recomputes
    them (from `args`, once, when it first needs one) saving each in 8 bits by Mesa's rules and
    running estimates of `layer` (`mesa_scope` steps aside in both passes: these hooks are the
    innermost). Like `torch.utils.checkpoint(use_reentrant=False)` it replays autocast and the RNG,
    and checkpoints nested inside (head groups) work: their inputs are saved tensors of this one.
    Unlike it, a recomputed layer holds 8-bit copies instead of exact ones until backward uses them."""
    rec = _Recompute(state, layer, fn, args)
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, rec.unpack):
        return fn(*args)
