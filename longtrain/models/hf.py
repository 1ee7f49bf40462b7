"""Import and export Hugging Face LLaMA checkpoints (config.json + safetensors).

Import reads a `LlamaForCausalLM` folder: config.json (transformers 4.x keys
`rope_theta`/`rope_scaling` or 5.x `rope_parameters`), `model.safetensors` or
shards listed in `model.safetensors.index.json`. Our RoPE is HF's rotate-half
form, so q/k weights map without permutation. RoPE scaling types: default,
linear, llama3.

Converting to MoH (`moh=MoHConfig(...)`): the first `shared_heads` heads of
every layer (HF head order; with GQA they fill the first kv groups) become the
shared heads, the rest the routed pool. No head is permuted, so a converted
model exports back onto the same HF tensors. A "query_norm" router has no
parameters: with shared + routed = n_heads the converted model equals the dense
one. A "learned" router starts with W_r ~ N(0, init_std) (seeded), W_s = 0 and
W_0 = 0, so shared gates and both stage weights start at exactly 1.

Export writes a plain LLaMA checkpoint (`config.json` + one `model.safetensors`)
that transformers loads. An MoH model adds `"moh": {...}` to config.json and its
router tensors `model.layers.N.self_attn.moh_{router,shared_gate,stage_gate}.weight`
(transformers ignores both and runs all heads). A mixed span plan is stored as
`"longtrain_attention"`. Tensors are written in the model's dtype, so export
then import round-trips bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from longtrain.models.config import ModelConfig, MoHConfig
from longtrain.models.spans import layer_plan
from longtrain.models.llama import Transformer

_ROPE_TYPES = ("default", "linear", "llama3")

# our parameter name (per layer, after "layers.N.") <-> HF name (after "model.layers.N.")
_LAYER_MAP = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.router.weight": "self_attn.moh_router.weight",
    "attn.shared_gate.weight": "self_attn.moh_shared_gate.weight",
    "attn.stage_gate.weight": "self_attn.moh_stage_gate.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_ROUTER_KEYS = ("attn.router.weight", "attn.shared_gate.weight", "attn.stage_gate.weight")
_PASS_THROUGH = ("bos_token_id", "eos_token_id", "pad_token_id")


def _to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise ValueError(f"parameter {name!r} has no Hugging Face LLaMA equivalent")


def _from_hf_name(name: str) -> str | None:
    """Our name for an HF tensor name; None for tensors we do not keep (rotary caches)."""
    for ours, hf in _TOP_MAP.items():
        if name == hf:
            return ours
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        if m.group(2).endswith("rotary_emb.inv_freq"):
            return None
        for ours, hf in _LAYER_MAP.items():
            if m.group(2) == hf:
                return f"layers.{m.group(1)}.{ours}"
    raise ValueError(f"checkpoint tensor {name!r} is not part of a LLaMA model")


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The config.json of an HF folder as a dict."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    return json.loads(f.read_text())


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    src = params if params else legacy
    kind = src.get("rope_type", src.get("type", "default")) if src else "default"
    if kind not in _ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if kind == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling: dict[str, Any] = {"rope_type": kind}
    scaling.update({k: src[k] for k in keys if k in src})
    return theta, scaling


def hf_model_config(path_or_config: str | Path | dict[str, Any], *, moh: MoHConfig | None = None,
                    attention: list[str] | None = None) -> ModelConfig:
    """ModelConfig for an HF LLaMA folder (or its parsed config.json); `moh` converts to MoH.

    `attention` replaces the folder's per-layer span plan (full attention for a plain LLaMA): `full` and
    `window:N` layers use the same weights, so a LLaMA continues as a MASFormer-style mix; `lightning`
    layers have other parameters and are refused."""
    hf = path_or_config if isinstance(path_or_config, dict) else read_hf_config(path_or_config)
    if hf.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{flag}=true is not supported (LLaMA without biases only)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    theta, scaling = _rope_from_hf(hf)
    n_heads = int(hf["num_attention_heads"])
    saved_moh = hf.get("moh")
    if moh is not None and saved_moh is not None and dataclasses.asdict(moh) != saved_moh:
        raise ValueError(f"checkpoint is already MoH ({saved_moh}); cannot convert to {dataclasses.asdict(moh)}")
    cfg = ModelConfig(
        vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads), ffn_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention=list(attention if attention is not None else hf.get("longtrain_attention", ["full"])),
        moh=moh if moh is not None else (MoHConfig(**saved_moh) if saved_moh else None),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    cfg.validate()
    if attention is not None and any(s.kind == "lightning" for s in layer_plan(cfg.attention, cfg.n_layers)):
        raise ValueError(f"attention plan {list(attention)}: lightning layers have no weights in a LLaMA checkpoint "
                         "(extra gate and norm, no GQA); continue-tune with 'full' and 'window:N' layers only")
    return cfg


def hf_tokenizer_path(path: str | Path) -> Path | None:
    """tokenizer.json of an HF folder, or None if it has none."""
    f = Path(path) / "tokenizer.json"
    return f if f.is_file() else None


def _weight_files(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


# how a parameter is given its value: place(param, read) with read(index) -> the source tensor[index]
# (index None = all of it); the default copies all; a sharded trainer copies only its own slice
Place = Callable[[nn.Parameter, Callable[[Any], torch.Tensor]], None]


def _place_all(p: nn.Parameter, read: Callable[[Any], torch.Tensor]) -> None:
    p.copy_(read(None))


@torch.no_grad()
def load_hf_weights(model: Transformer, path: str | Path, *, router_seed: int = 0, place: Place | None = None) -> None:
    """Give `model`'s parameters (materialised, any device) their values from an HF folder.

    Tensors are read lazily, one slice at a time (`safe_open(...).get_slice`): with a `place` that
    reads only the rows a process owns, no process ever holds a whole copy of the model. Router
    weights absent from a dense checkpoint (MoH conversion) are drawn from `router_seed` in
    module order (gates: zeros), so every process draws the same values.
    """
    from safetensors import safe_open

    path, place = Path(path), place or _place_all
    cfg = model.cfg
    handles = {f: safe_open(str(path / f), framework="pt") for f in _weight_files(path)}
    where: dict[str, tuple[str, str]] = {}  # our name -> (file, HF name)
    for f, h in handles.items():
        for name in h.keys():
            ours = _from_hf_name(name)
            if ours is None or (ours == "output.weight" and cfg.tie_embeddings):
                continue
            where[ours] = (f, name)
    expected = {n for n, _ in model.named_parameters()}  # tied output shares the embedding's name
    ours_found = set(where)
    unexpected = sorted(ours_found - expected)
    if unexpected:
        raise ValueError(f"{path}: tensors {unexpected[:4]} do not fit a model with config {cfg}")
    missing = sorted(n for n in expected - ours_found if not n.endswith(_ROUTER_KEYS))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing[:4]}{' …' if len(missing) > 4 else ''}")
    gen = torch.Generator().manual_seed(router_seed)
    for name, p in model.named_parameters():
        if name in where:
            f, hf_name = where[name]
            sl = handles[f].get_slice(hf_name)
            shape = tuple(sl.get_shape())
            if shape != tuple(p.shape):
                raise ValueError(f"{path}: {hf_name} has shape {list(shape)}, the model expects {list(p.shape)}")

            def read(index: Any, sl: Any = sl) -> torch.Tensor:
                return sl[index] if index is not None else sl[:]
        else:  # router weights absent from a dense checkpoint: seeded, the same on every process
            full = (torch.randn(p.shape, generator=gen) * cfg.init_std if name.endswith("router.weight")
                    else torch.zeros(p.shape))  # shared/stage gates: zero logits -> gates exactly 1

            def read(index: Any, full: torch.Tensor = full) -> torch.Tensor:
                return full[index] if index is not None else full
        place(p, read)


def load_hf_checkpoint(path: str | Path, *, moh: MoHConfig | None = None, dtype: torch.dtype = torch.float32,
                       router_seed: int = 0, attention: list[str] | None = None) -> Transformer:
    """Load an HF LLaMA folder into a Transformer (parameters in `dtype`, on CPU).

    `moh` converts to Mixture-of-Head (shared heads = first `shared_heads` heads, see module doc);
    new router weights are seeded by `router_seed`. `attention` sets the per-layer span plan (see
    `hf_model_config`). The source config.json is kept as
    `model.hf_config` (token ids pass through to an export). The model is built on the meta
    device and given memory once; tensors are read one at a time (one copy of the weights).
    """
    path = Path(path)
    hf = read_hf_config(path)
    cfg = hf_model_config(hf, moh=moh, attention=attention)
    model = Transformer.on_meta(cfg)
    model.to_empty(device="cpu")
    model.to(dtype)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    load_hf_weights(model, path, router_seed=router_seed)
    model.reset_buffers()
    model.hf_config = hf
    return model


def _hf_config_of(model: Transformer) -> dict[str, Any]:
    cfg = model.cfg
    if any(s.kind == "lightning" for s in model.spans):
        raise ValueError("lightning attention layers have no Hugging Face LLaMA equivalent; cannot export")
    dtype = next(model.parameters()).dtype
    dname = str(dtype).replace("torch.", "")
    rope_params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    legacy_scaling = None
    if cfg.rope_scaling:
        sc = dict(cfg.rope_scaling)
        kind = sc.pop("rope_type", sc.pop("type", "default"))
        rope_params.update(sc, rope_type=kind)
        legacy_scaling = {"rope_type": kind, **sc}
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_scaling": legacy_scaling,  # transformers 4.x
        "rope_parameters": rope_params,  # transformers 5.x
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": dname, "torch_dtype": dname,
    }
    src = getattr(model, "hf_config", None) or {}
    hf.update({k: src[k] for k in _PASS_THROUGH if k in src})
    if [str(s) for s in model.spans] != ["full"] * cfg.n_layers:
        hf["longtrain_attention"] = list(cfg.attention)
    if cfg.moh is not None:
        hf["moh"] = dataclasses.asdict(cfg.moh)
    return hf


def save_hf_checkpoint(model: Transformer, path: str | Path, *, tokenizer_path: str | Path | None = None) -> Path:
    """Write `model` as an HF LLaMA folder (config.json + model.safetensors [+ tokenizer files])."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = _hf_config_of(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # a tied output is listed once, as the embedding
        tensors[_to_hf_name(name)] = p.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer_path is not None:
        tp = Path(tokenizer_path)
        if tp.is_dir():
            names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
            copied = [n for n in names if (tp / n).is_file()]
            if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
                raise FileNotFoundError(f"{tp}: no tokenizer.json or tokenizer.model")
            for n in copied:
                shutil.copyfile(tp / n, path / n)
        else:
            shutil.copyfile(tp, path / "tokenizer.json")
    return path


__all__ = ["load_hf_checkpoint", "load_hf_weights", "save_hf_checkpoint", "hf_model_config", "hf_tokenizer_path", "read_hf_config"]

