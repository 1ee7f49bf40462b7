"""Recipe schema (TOML) -> dataclasses, `--set a.b=c` overrides, validation.

Every section maps to a dataclass below; unknown keys, wrong types and
impossible values raise ConfigError with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longtrain.errors import ConfigError
from longtrain.models.config import ModelConfig, MoHConfig, model_config
from longtrain.launcher.validate import did_you_mean, validate

if TYPE_CHECKING:
    from longtrain.kernels.mesa.config import MesaConfig


@dataclass
class RunSection:
    name: str = "run"
    output_dir: str = ""  # default: runs/<name>
    seed: int = 0


@dataclass
class ModelSection:
    """A preset plus any ModelConfig field as an override."""

    preset: str | None = "tiny"
    init_from: str | None = None  # HF LLaMA folder to continue-tune from
    vocab_size: int | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None
    attention: list[str] | None = None
    moh: dict | None = None
    init_std: float | None = None


@dataclass
class SourceSection:
    """One [[data.sources]] entry of a mixture."""

    path: str = ""  # a prepared folder, or a raw source (prepared into the cache on first use)
    weight: float = 1.0  # share of samples (= of tokens: every sample is seq_len tokens)
    name: str = ""  # label in logs and metrics (default: the folder or file name)
    max_epochs: float = 0.0  # stop drawing from this source after that many passes (0 = unlimited)
    min_doc_tokens: int = 0  # drop documents shorter than this (0 = keep all)
    max_doc_tokens: int = 0  # drop documents longer than this (0 = keep all)
    long_doc_tokens: int = 0  # documents at least this long count as long ...
    long_doc_upsample: float = 1.0  # ... and are drawn this many times as often within the source
    format: str = "auto"  # raw sources only
    text_field: str = "text"  # raw sources only


@dataclass
class DataSection:
    source: str = "stdlib"  # "stdlib" | a prepared folder | a file, folder or glob of local text/json/parquet files
    format: str = "auto"  # auto | text | json | parquet
    text_field: str = "text"
    tokenizer: str = "auto"  # auto (the prepared folder's, init_from's, else bytes) | bytes | tokenizer.json | HF folder
    sources: list[SourceSection] = field(default_factory=list)  # [[data.sources]]: a weighted mixture
    cache_dir: str = ""  # where raw sources are prepared (default $LONGTRAIN_CACHE or ~/.cache/longtrain)
    prefetch: bool = True  # build the next step's batches in a background thread
    seq_len: int = 256
    document_mask: bool = False  # no attention across packed documents; positions restart per document
    max_documents: int = 0  # 0 = all
    shuffle: bool = True
    passkey_fraction: float = 0.0  # share of synthetic passkey documents mixed in (eval recipes)
    passkey_options: dict | None = None  # keyword arguments of passkey.mix_passkey_documents (e.g. align)
    ruler_fraction: float = 0.0  # share of RULER-style training documents (multi-key, multi-value, vt) mixed in
    ruler_options: dict | None = None  # keyword arguments of ruler_tasks.mix_ruler_documents (kinds, min_chars)


@dataclass
class TrainingSection:
    steps: int = 100
    micro_batch: int = 4
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16
    tf32: bool = True  # CUDA fp32 matmuls/convolutions on TF32 tensor cores (no effect on CPU)
    activation_checkpointing: bool | str = "none"  # none | full | offload | every:N (true/false = full/none)
    loss_chunk: int | str = "auto"  # tokens per output-projection + loss chunk; auto = a byte budget; 0 = whole
    mlp_chunk: int | str = "auto"  # tokens per SwiGLU tile (recomputed in backward); auto = when large; 0 = off
    attn_head_chunk: int | str = 0  # query heads per attention group, recomputed per group (one more attention
    # forward); auto = when large; 0 = off
    optimizer_offload: bool = False  # AdamW state, fp32 master and grads in host memory (fsdp2 / deepspeed)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each transformer block (attention kernels stay outside)
    max_bad_steps: int = 10  # stop after this many consecutive steps with a non-finite loss or grad norm
    collective_timeout_s: int = 600  # a collective waiting this long for a dead or stuck peer ends the run


@dataclass
class StageSection:
    """A stage of a staged long-context recipe: from `start_step` on, use this seq_len / rope_theta."""

    start_step: int = 0
    seq_len: int | None = None
    rope_theta: float | None = None


@dataclass
class ParallelSection:
    sp: int = 1
    sp_impl: str = "auto"  # auto | ring | tokenring | ulysses | hybrid | hybrid-tokenring
    sp_layout: str = "zigzag"  # zigzag | contiguous
    ulysses_degree: int = 0  # hybrid only: ranks per Ulysses group (0 = auto)
    sp_one_communicator: bool = False  # ring/TokenRing: both streams on one communicator (NCCL deadlock workaround)
    dp_engine: str = "fsdp2"  # fsdp2 | ddp | deepspeed
    dp_replicate: int | str = 1  # fsdp2: replica groups of hybrid sharding (1 = plain; "auto" = nodes if it fits)
    zero_stage: int = 1  # deepspeed only
    deepspeed_config: dict | None = None  # merged over the generated DeepSpeed config


@dataclass
class MesaSection:
    enabled: bool = False
    bits: int = 8
    group: str = "head"  # head | channel
    ema_decay: float = 0.9
    stochastic: bool = True
    skip_layers: list[int] = field(default_factory=list)  # layers kept exact (negative = from the end)

    def kernel_config(self) -> "MesaConfig":
        """The kernels' MesaConfig for this section, validated (ConfigError naming the bad field)."""
        from longtrain.kernels.mesa.config import MesaConfig

        cfg = MesaConfig(enabled=self.enabled, bits=self.bits, group=self.group, ema_decay=self.ema_decay,
                         stochastic=self.stochastic, skip_layers=tuple(self.skip_layers))
        try:
            return cfg.validate()
        except ValueError as e:
            raise ConfigError(f"'{str(e).split(' ', 1)[0]}' {str(e).split(' ', 1)[1]}") from None


@dataclass
class CheckpointSection:
    interval: int = 50
    keep_last: int = 2
    resume: str = "auto"  # auto | none | path to a checkpoint folder
    dir: str = ""  # default: <output_dir>/checkpoints
    save_on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # checkpoint, exit 75
    async_save: bool = False  # `checkpoint.async` in recipes: write in the background (DCP async_save)


@dataclass
class MetricsSection:
    log_every: int = 10
    tensorboard: bool = True


@dataclass
class ProfileSection:
    """[profile]: torch.profiler traces of chosen steps (docs/profiling.md); off unless `steps` is set."""

    steps: list[int] | str = field(default_factory=list)  # [2, 5] or "10-12" (inclusive); [] = off
    ranks: list[int] = field(default_factory=lambda: [0])  # global ranks that trace
    memory: bool = False  # CUDA: a memory snapshot of the steps (_record_memory_history); CPU: an RSS timeline
    record_shapes: bool = True  # input shapes of each op in the trace
    stack: bool = False  # Python stacks of each op (larger traces)

    def step_list(self) -> list[int]:
        """The profiled step numbers, sorted (steps count from 1, as the progress line does)."""
        if isinstance(self.steps, str):
            lo, sep, hi = self.steps.partition("-")
            try:
                a, b = int(lo), int(hi if sep else lo)
            except ValueError:
                raise ConfigError(f"'profile.steps' must be a list of steps or a range like \"10-12\", "
                                  f"got {self.steps!r}") from None
            return list(range(a, b + 1)) if a <= b else []
        return sorted(set(self.steps))


@dataclass
class EvalSection:
    every: int = 0  # steps between in-training evaluations (0 = off)
    lengths: list[int] = field(default_factory=list)
    passkey: bool = False
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 4
    ruler_tasks: list[str] = field(default_factory=list)  # RULER tasks scored at each eval (longtrain eval ruler)
    ruler_samples: int = 4  # prompts per (task, length)


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    stages: list[StageSection] = field(default_factory=list)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    mesa: MesaSection = field(default_factory=MesaSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    eval: EvalSection = field(default_factory=EvalSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    source_path: str = ""  # where the recipe was read from (not a TOML key)

    # ---- derived -------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or os.path.join("runs", self.run.name))

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.output_dir / "checkpoints"

    def model_config(self) -> ModelConfig:
        """The ModelConfig the recipe asks for (without an HF init_from folder applied)."""
        m = self.model
        overrides = {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                     if f.name not in ("preset", "init_from") and getattr(m, f.name) is not None}
        if "moh" in overrides:
            overrides["moh"] = MoHConfig(**overrides["moh"])
        return model_config(m.preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_path", None)
        return d


# ---- parsing ---------------------------------------------------------------------------------

_SECTIONS = {f.name: f for f in dataclasses.fields(Recipe) if f.name != "source_path"}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    return True


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{where}.{key}'{did_you_mean(key, names, where + '.')}")
        tp = hints[key]
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp) \
                and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, tp):
            raise ConfigError(f"'{where}.{key}' must be of type {_type_name(tp)}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` (value in TOML syntax, bare strings allowed) to raw recipe data."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, value = assignment.split("=", 1)
    parts = [p.strip() for p in path.strip().split(".") if p.strip()]
    if len(parts) < 2:
        raise ConfigError(f"override {assignment!r}: name a section and a key, e.g. training.lr=1e-3")
    if parts[0] not in _SECTIONS:
        raise ConfigError(f"unknown section '{parts[0]}'{did_you_mean(parts[0], list(_SECTIONS))}")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p!r} is not a table")
    node[parts[-1]] = _parse_value(value.strip())


def recipe_from_dict(data: dict[str, Any], source_path: str = "") -> Recipe:
    ck = data.get("checkpoint")
    if isinstance(ck, dict) and "async" in ck:  # `async` is a Python keyword: the field is async_save
        ck["async_save"] = ck.pop("async")
    kwargs: dict[str, Any] = {}
    for section, value in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section '{section}'{did_you_mean(section, list(_SECTIONS))}")
        if section == "stages":
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError("'stages' must be an array of tables ([[stages]])")
            kwargs["stages"] = [_build(StageSection, v, f"stages[{i}]") for i, v in enumerate(value)]
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"'{section}' must be a table ([{section}]), got {value!r}")
        cls = typing.get_type_hints(Recipe)[section]
        if section == "data" and "sources" in value:
            value = dict(value)
            srcs = value.pop("sources")
            if not isinstance(srcs, list) or not all(isinstance(v, dict) for v in srcs):
                raise ConfigError("'data.sources' must be an array of tables ([[data.sources]])")
            kwargs[section] = _build(cls, value, section)
            kwargs[section].sources = [_build(SourceSection, v, f"data.sources[{i}]") for i, v in enumerate(srcs)]
            continue
        kwargs[section] = _build(cls, value, section)
    recipe = Recipe(**kwargs, source_path=source_path)
    validate(recipe)
    return recipe


def resolve_recipe(path: str | os.PathLike) -> Path:
    """A recipe file, or a bare name (no folder) of a shipped recipe: `tiny-cpu` or `tiny-cpu.toml`."""
    from longtrain.shipped import closest_recipes, recipe_names, shipped_recipe

    p = Path(path)
    if p.is_file():
        return p
    if not p.parent.parts:
        found = shipped_recipe(p.name)
        if found is not None:
            return found
        raise ConfigError(f"recipe not found: {path} (no such file, and no shipped recipe by that name; closest "
                          f"shipped recipes: {', '.join(closest_recipes(p.name))}; 'longtrain recipes' lists all "
                          f"{len(recipe_names())})")
    raise ConfigError(f"recipe file not found: {path}")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply `section.key=value` overrides, validate."""
    p = resolve_recipe(path)
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {p} is not valid TOML: {e}") from None
    for o in overrides or []:
        apply_override(data, o)
    return recipe_from_dict(data, str(p))


