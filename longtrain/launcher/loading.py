"""Open a checkpoint as a `Transformer`: a longtrain training checkpoint (DCP) or a Hugging Face folder.

One module for every reader of checkpoints: `model.init_from` (trainer), `longtrain eval`
and `longtrain convert`.

Accepted paths:
  - a DCP checkpoint folder `step_N` (`.metadata` + `meta.json`, the model config in meta.json)
  - a run's `checkpoints/` folder or the run folder itself: its newest complete checkpoint
  - a Hugging Face LLaMA folder (`config.json` + `*.safetensors`)

`describe_checkpoint` reads no weights (config, step, run recipe, tokenizer); `load_model`
reads them. A DCP model is built on the meta device and given memory only once, so an
8B model needs one copy of its weights. `overrides` replace config fields before the
model is built (RoPE θ / scaling, the attention plan, max_seq_len: what continue-tuning
changes without new parameters).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtrain.errors import CheckpointError, ConfigError, LongtrainError
from longtrain.launcher.ckpt_layout import is_complete, looks_like_checkpoint

# config fields a continue-tuning run may change on a loaded model (no parameter shapes change)
OVERRIDABLE = ("rope_theta", "rope_scaling", "attention", "max_seq_len")


@dataclass
class Loaded:
    """A checkpoint and what is known about how it was trained (model None until loaded)."""

    kind: str  # "dcp" | "hf"
    path: Path
    cfg: Any  # ModelConfig
    step: int | None = None
    trained_len: int | None = None
    run_dir: Path | None = None
    run_data: dict[str, Any] = field(default_factory=dict)  # [data] of the run's resolved recipe
    tokenizer_spec: str | None = None
    model: nn.Module | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # the run's whole resolved recipe
    meta: dict[str, Any] = field(default_factory=dict)  # meta.json of a DCP checkpoint

    @property
    def name(self) -> str:
        return f"{self.run_dir.name}/{self.path.name}" if self.run_dir and self.run_dir != self.path else self.path.name


def is_hf_folder(p: str | os.PathLike) -> bool:
    p = Path(p)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def is_dcp_folder(p: str | os.PathLike) -> bool:
    return looks_like_checkpoint(Path(p))


def resolve_checkpoint(path: str | os.PathLike) -> tuple[str, Path]:
    """('dcp' | 'hf', folder) for a DCP checkpoint, a checkpoints/ or run folder, or an HF folder."""
    from longtrain.launcher.checkpoint import Checkpointer

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} is a file; give a checkpoint folder (step_N), a run folder or an HF folder")
    if is_hf_folder(p):
        return "hf", p
    if is_dcp_folder(p):
        if not is_complete(p):
            raise CheckpointError(f"checkpoint {p} is incomplete (needs both .metadata and meta.json; "
                                  "an interrupted save?)")
        return "dcp", p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            latest = Checkpointer(root).latest()
            if latest is not None and is_complete(latest):
                return "dcp", latest
    raise CheckpointError(f"no checkpoint in {p}: no complete checkpoint (a step_N folder with .metadata + "
                          "meta.json) there or in its checkpoints/ folder, and no HF folder (config.json + "
                          "*.safetensors)")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The DCP checkpoint folder for a step folder, a checkpoints/ folder or a run folder (not HF)."""
    kind, p = resolve_checkpoint(path)
    if kind != "dcp":
        raise CheckpointError(f"{p} is a Hugging Face folder, not a training checkpoint")
    return p


def run_recipe(folder: Path) -> tuple[Path | None, dict[str, Any]]:
    """(run folder, resolved recipe) of the run a checkpoint belongs to (run/checkpoints/step_N), if found."""
    folder = Path(folder)
    for run in (folder.parent.parent, folder.parent, folder):
        f = run / "recipe.resolved.toml"
        if f.is_file():
            try:
                return run, tomllib.loads(f.read_text())
            except (OSError, tomllib.TOMLDecodeError):
                return run, {}
    return None, {}


def _hf_module():
    try:
        from longtrain.models import hf
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("longtrain"):
            raise CheckpointError("reading Hugging Face folders needs longtrain.models.hf, which this build lacks") from None
        raise
    return hf


def _apply_overrides(cfg, overrides: dict[str, Any] | None, where: Path):
    if not overrides:
        return cfg
    bad = set(overrides) - set(OVERRIDABLE)
    if bad:
        raise ConfigError(f"cannot change {sorted(bad)} of a loaded checkpoint {where} (only {', '.join(OVERRIDABLE)})")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"checkpoint {where} with {overrides}: {e}") from None
    return cfg


def _dcp_config(p: Path, meta: dict[str, Any]):
    from longtrain.models import ModelConfig

    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"checkpoint {p} has no model configuration in meta.json")
    try:
        cfg = ModelConfig(**meta["model"])
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {p} has a model configuration this version cannot read: {e}") from None
    return cfg


def checkpoint_tokenizer(p: Path, kind: str, recipe: dict[str, Any], _seen: int = 0) -> str | None:
    """The tokenizer a checkpoint was trained with: an HF folder's tokenizer.json, else the run's
    data.tokenizer, where "bytes" defers to the tokenizer of the run's own model.init_from (a chain
    of continue-tuning runs keeps the first run's tokenizer)."""
    if kind == "hf" and (p / "tokenizer.json").is_file():
        return str(p / "tokenizer.json")
    tok = recipe.get("data", {}).get("tokenizer")
    init_from = recipe.get("model", {}).get("init_from")
    if tok in (None, "auto", "bytes") and init_from and _seen < 8:
        return _source_tokenizer(Path(init_from), _seen + 1) or tok
    return tok


def _source_tokenizer(src: Path, seen: int) -> str | None:
    """The tokenizer of an init_from source: its tokenizer.json, else its run's (None: unknown)."""
    if (src / "tokenizer.json").is_file():
        return str(src / "tokenizer.json")
    try:
        kind, q = resolve_checkpoint(src)
    except CheckpointError:
        return None
    return checkpoint_tokenizer(q, kind, run_recipe(q)[1], seen)


def describe_checkpoint(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Loaded:
    """Find the checkpoint, its model configuration, run recipe and tokenizer; no weights read."""
    kind, p = resolve_checkpoint(path)
    run, recipe = run_recipe(p)
    data = dict(recipe.get("data", {}))
    tok = checkpoint_tokenizer(p, kind, recipe)
    if kind == "dcp":
        from longtrain.launcher.checkpoint import read_meta

        meta = read_meta(p)
        cfg = _apply_overrides(_dcp_config(p, meta), overrides, p)
        return Loaded("dcp", p, cfg, int(meta["step"]), meta.get("seq_len"), run, data, tok, recipe=recipe, meta=meta)
    hf = _hf_module()
    try:
        cfg = hf.hf_model_config(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the Hugging Face config of {p}: {e}") from None
    cfg = _apply_overrides(cfg, overrides, p)
    return Loaded("hf", p, cfg, None, None, run, data, tok, recipe=recipe)


def _load_dcp_weights(cfg, p: Path, dtype: torch.dtype) -> nn.Module:
    from longtrain.launcher.checkpoint import safe_load
    from longtrain.models import Transformer

    model = Transformer.on_meta(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.set_rope()  # non-persistent inv_freq: recompute from the config
    sd = model.state_dict()
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    state = {"model": sd}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            safe_load(state, p)
    except (Exception, torch.distributed.checkpoint.api.CheckpointException) as e:  # noqa: BLE001
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"cannot load model weights from {p}: {lines[-1] if lines else type(e).__name__}") from None
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if set(missing) - {"output.weight"} or unexpected:  # DCP would have failed first; belt and braces
        raise CheckpointError(f"checkpoint {p} does not fit its model config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.to(dtype)


def load_model(path: str | os.PathLike | Loaded, *, dtype: torch.dtype = torch.float32,
               overrides: dict[str, Any] | None = None, hf_kwargs: dict[str, Any] | None = None) -> Loaded:
    """Load a DCP training checkpoint or an HF folder into a plain Transformer (CPU, `dtype`).

    `overrides` (see OVERRIDABLE) change the config before the weights are loaded; `hf_kwargs`
    go to `load_hf_checkpoint` (moh, router_seed, attention) for an HF folder."""
    info = path if isinstance(path, Loaded) else describe_checkpoint(path, overrides)
    p = info.path
    if info.kind == "dcp":
        model = _load_dcp_weights(info.cfg, p, dtype)
    else:
        kw = dict(hf_kwargs or {})
        if "attention" not in kw and info.cfg is not None:
            kw["attention"] = list(info.cfg.attention)
        try:
            model = _hf_module().load_hf_checkpoint(str(p), dtype=dtype, **kw)
        except LongtrainError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot load Hugging Face folder {p}: {e}") from None
        if info.cfg is not None:  # RoPE / length overrides given to describe_checkpoint
            model.cfg.rope_theta, model.cfg.rope_scaling = info.cfg.rope_theta, info.cfg.rope_scaling
            model.set_rope()
            model.cfg.max_seq_len = max(model.cfg.max_seq_len, info.cfg.max_seq_len)
    info.model = model
    info.cfg = model.cfg
    return info


def load_checkpoint_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, dict[str, Any]]:
    """(Transformer on CPU in `dtype`, meta) from a DCP training checkpoint; no process group needed."""
    p = find_checkpoint(path)
    info = describe_checkpoint(p)
    if any(s.strip().lower() == "lightning" for s in info.cfg.attention):
        raise ConfigError(f"checkpoint {p} has lightning attention layers ({info.cfg.attention}); a Hugging Face "
                          "LLaMA has no equivalent, so it cannot be exported")
    model = _load_dcp_weights(info.cfg, p, dtype)
    meta = dict(info.meta)
    meta["path"] = str(p)
    return model, meta


def pick_tokenizer(info: Loaded, override: str | None):
    """The tokenizer the model was trained with: `override`, the run's recipe, the HF folder, or bytes."""
    from longtrain.launcher.data.tokenizers import build_tokenizer

    spec = override or info.tokenizer_spec
    vocab = info.cfg.vocab_size
    if spec is None:
        if vocab > 512:
            raise ConfigError(f"cannot tell the tokenizer of {info.path} (vocab {vocab}, no tokenizer.json, no run "
                              "recipe next to it): pass --tokenizer PATH")
        spec = "bytes"
    if spec != "bytes" and not Path(spec).exists():
        raise ConfigError(f"tokenizer not found: {spec}")
    tok = build_tokenizer(spec)
    if tok.vocab_size > vocab:
        raise ConfigError(f"tokenizer {spec} has {tok.vocab_size} ids but the model only {vocab}")
    return tok


def init_from_source(recipe) -> tuple[str, Path, Any]:
    """('hf' | 'dcp', folder, ModelConfig) of a recipe's `model.init_from`; reads no weights.

    A longtrain checkpoint (a `step_N` folder, or a run / checkpoints folder: its newest complete
    checkpoint) brings its own model configuration from meta.json; an HF folder its config.json.
    The recipe may change what needs no new parameters: `model.rope_theta`, `model.rope_scaling`
    (e.g. {type = "linear", factor = 8}: position interpolation) and `model.attention` (a
    MASFormer-style plan over the same weights); `max_seq_len` is the source's, raised to the
    longest seq_len the recipe trains at. `model.moh` converts an HF folder to Mixture-of-Head (a
    longtrain checkpoint must already have the same MoH split)."""
    m = recipe.model
    # max_seq_len is not taken from the recipe (its preset default would shrink a long model): it is the
    # source's, raised below to the longest seq_len trained at
    overrides = {k: getattr(m, k) for k in ("rope_theta", "rope_scaling", "attention") if getattr(m, k) is not None}
    try:
        kind, p = resolve_checkpoint(m.init_from)
        moh = recipe.model_config().moh if m.moh else None
        if kind == "hf":
            cfg = _apply_overrides(_hf_module().hf_model_config(p, moh=moh, attention=m.attention), overrides, p)
        else:
            cfg = describe_checkpoint(p, overrides).cfg
            if moh is not None and (cfg.moh is None or dataclasses.asdict(cfg.moh) != dataclasses.asdict(moh)):
                raise ConfigError(f"checkpoint {p} has moh={cfg.moh}, the recipe asks for {moh}: converting a "
                                  "longtrain checkpoint to MoH goes through an HF export (longtrain convert)")
    except (OSError, ValueError, TypeError, KeyError, CheckpointError) as e:
        raise ConfigError(f"model.init_from {m.init_from}: {e}") from None
    longest = max([recipe.data.seq_len] + [s.seq_len or 0 for s in recipe.stages])
    if longest > cfg.max_seq_len:  # continue-tuned beyond the source's context: the config says so
        cfg = dataclasses.replace(cfg, max_seq_len=longest)
    return kind, p, cfg


def _place_all(p: torch.Tensor, read) -> None:
    p.copy_(read(None))


@torch.no_grad()
def fill_weights(model: nn.Module, recipe, source: tuple[str, Path, Any] | None, place=None) -> None:
    """Give a materialised model its weights: `source` (from `init_from_source`) or, with None, a
    fresh initialisation from `run.seed`. `place(param, read)` stores the part of a value this
    process owns (read(index) -> value[index]); the default stores all of it. With an FSDP2-sharded
    model and `parallel.engines.place_local`, each process reads and holds only its shards."""
    place = place or _place_all
    if source is None:
        model.init_weights(seed=recipe.run.seed,
                           write=lambda p, v: place(p, lambda idx: v[idx] if idx is not None else v))
    else:
        kind, p, cfg = source
        try:
            if kind == "hf":
                hf = _hf_module()
                hf.load_hf_weights(model, p, router_seed=recipe.run.seed, place=place)
                model.hf_config = hf.read_hf_config(p)
            else:
                _load_dcp_into(model, p)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model.init_from {recipe.model.init_from}: {e}") from None
    model.reset_buffers()


def _load_dcp_into(model: nn.Module, p: Path) -> None:
    """Load a DCP checkpoint's model weights into `model` as it is laid out (plain or sharded):
    DCP reads only the pieces each process's tensors cover."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from longtrain.launcher.checkpoint import safe_load

    sd = get_model_state_dict(model)
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    state = {"model": sd}
    try:
        safe_load(state, p)
    except (Exception, torch.distributed.checkpoint.api.CheckpointException) as e:  # noqa: BLE001
        lines = str(e).strip().splitlines()
        raise CheckpointError(f"cannot load model weights from {p}: {lines[-1] if lines else type(e).__name__}") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))


def load_init_from(recipe) -> nn.Module:
    """The model a recipe's `model.init_from` names, whole, on CPU (see `init_from_source`); the
    FSDP2 trainer builds it sharded instead (launcher/build.py: build_sharded_model)."""
    kind, p, cfg = init_from_source(recipe)
    if kind == "dcp":  # no process group needed: the single-process reader
        return _load_dcp_weights(cfg, p, torch.float32)
    from longtrain.models import Transformer

    model = Transformer.on_meta(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    fill_weights(model, recipe, (kind, p, cfg))
    return model


def init_from_tokenizer(init_from: str | os.PathLike) -> str | None:
    """The tokenizer a `model.init_from` source was trained with: its tokenizer.json (HF folder), or
    the tokenizer of the run a longtrain checkpoint belongs to; None when unknown or bytes."""
    tok = _source_tokenizer(Path(init_from), 0)
    return tok if tok and tok not in ("auto", "bytes") else None
