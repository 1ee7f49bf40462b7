"""Recipe validation: every setting checked once, before any process starts, with one line naming the
key, the bad value and what is allowed (ConfigError, exit 2). Reads the recipe duck-typed (config.py
holds the sections); no torch import."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from longtrain.errors import ConfigError
from longtrain.models.config import PRESETS
from longtrain.parallel.rules import SP_IMPL_CHOICES, SP_LAYOUTS


def did_you_mean(name: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(options)})"


def _positive(name: str, value: int | float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"'{name}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"'{name}' must be one of {', '.join(options)}; got {value!r}{did_you_mean(value, list(options))}")


def validate(r: Any) -> None:
    """Check values and cross-section consistency; raise ConfigError naming the key."""
    _check_training(r)
    _check_data_basics(r.data)
    _check_parallel(r)
    _check_checkpoint_and_metrics(r)
    if r.mesa.enabled:
        r.mesa.kernel_config()  # the kernels' own validation, once
    _check_model(r)
    _check_stages(r.stages)
    _check_data_sources(r.data)
    _check_data_options(r.data)
    _check_eval(r.eval)
    _check_profile(r)


def _check_training(r: Any) -> None:
    """[training] (and checkpoint.save_on_signal): numbers, choices, checkpointing and chunk settings."""
    t = r.training
    for name in ("steps", "micro_batch", "grad_accum", "lr", "max_bad_steps", "collective_timeout_s"):
        _positive(f"training.{name}", getattr(t, name))
    from longtrain.launcher.signals import check_names

    try:
        check_names(r.checkpoint.save_on_signal)
    except ValueError as e:
        raise ConfigError(f"'checkpoint.save_on_signal': {e}") from None
    _positive("training.warmup", t.warmup, allow_zero=True)
    _positive("training.grad_clip", t.grad_clip, allow_zero=True)
    _positive("training.weight_decay", t.weight_decay, allow_zero=True)
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"'training.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
    _choice("training.schedule", t.schedule, ("cosine", "linear", "constant"))
    _choice("training.dtype", t.dtype, ("fp32", "bf16"))
    _choice("training.device", t.device, ("auto", "cpu", "cuda"))
    from longtrain.models.memory import check_chunk, check_head_chunk, checkpoint_policy

    try:
        t.activation_checkpointing = checkpoint_policy(t.activation_checkpointing)
        check_chunk("'training.loss_chunk'", t.loss_chunk)
        check_chunk("'training.mlp_chunk'", t.mlp_chunk)
        check_head_chunk(t.attn_head_chunk)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("'training.") else f"'training.activation_checkpointing': {e}") from None
    if t.activation_checkpointing == "offload" and t.compile:
        raise ConfigError("training.activation_checkpointing = 'offload' with training.compile = true is not "
                          "supported (the host copies run outside compiled graphs); use 'full' or turn compile off")


def _check_data_basics(d: Any) -> None:
    """[data] sequence length, document cap, format and passkey fraction."""
    _positive("data.seq_len", d.seq_len)
    _positive("data.max_documents", d.max_documents, allow_zero=True)
    _choice("data.format", d.format, ("auto", "text", "json", "parquet"))
    if not 0 <= d.passkey_fraction <= 1:
        raise ConfigError(f"'data.passkey_fraction' must be in [0, 1], got {d.passkey_fraction}")


def _check_parallel(r: Any) -> None:
    """[parallel]: sequence parallelism, the data-parallel engine, and where the optimizer may be offloaded."""
    t, p = r.training, r.parallel
    _positive("parallel.sp", p.sp)
    _choice("parallel.sp_impl", p.sp_impl, SP_IMPL_CHOICES)
    _choice("parallel.sp_layout", p.sp_layout, SP_LAYOUTS)
    _choice("parallel.dp_engine", p.dp_engine, ("fsdp2", "ddp", "deepspeed"))
    _positive("parallel.ulysses_degree", p.ulysses_degree, allow_zero=True)
    from longtrain.parallel.rules import check_dp_replicate  # hybrid sharding: one rule for config, plan, run

    check_dp_replicate(p.dp_replicate, p.dp_engine)
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"'parallel.zero_stage' must be 0, 1, 2 or 3, got {p.zero_stage}")
    if t.optimizer_offload and p.dp_engine == "ddp":
        raise ConfigError("'training.optimizer_offload' = true needs parallel.dp_engine = \"fsdp2\" (CPUOffloadPolicy) "
                          "or \"deepspeed\" (ZeRO offload_optimizer); DDP keeps the optimizer on the device")
    if t.optimizer_offload and p.dp_engine == "deepspeed" and p.zero_stage == 0:
        raise ConfigError("'training.optimizer_offload' = true with DeepSpeed needs parallel.zero_stage >= 1 "
                          "(ZeRO's offload_optimizer), got 0")


def _check_checkpoint_and_metrics(r: Any) -> None:
    _positive("checkpoint.interval", r.checkpoint.interval)
    _positive("checkpoint.keep_last", r.checkpoint.keep_last)
    _positive("metrics.log_every", r.metrics.log_every)


def _check_model(r: Any) -> None:
    """[model]: the preset, model.init_from (a folder; its config.json read), else the built config and
    the longest sequence against its limit."""
    d = r.data
    if r.model.preset is not None and r.model.preset not in PRESETS:
        raise ConfigError(f"unknown 'model.preset' {r.model.preset!r}{did_you_mean(r.model.preset, list(PRESETS))}")
    if r.model.init_from is not None and not Path(r.model.init_from).is_dir():
        raise ConfigError(f"'model.init_from' folder not found: {r.model.init_from} (point it at a local Hugging Face "
                          "LLaMA folder, a longtrain run folder or a step_N checkpoint: edit the recipe or pass "
                          "--set model.init_from=DIR)")
    if r.model.init_from is not None and (Path(r.model.init_from) / "config.json").is_file():
        from longtrain.models.hf import hf_model_config  # reads config.json only: the plan and MoH split must fit

        try:
            hc = hf_model_config(r.model.init_from, moh=r.model_config().moh if r.model.moh else None,
                                 attention=r.model.attention)
        except (OSError, TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"model.init_from {r.model.init_from}: {e}") from None
        _check_head_groups(r, hc)
    if r.model.init_from is None:
        try:
            mc = r.model_config()
            mc.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        _check_head_groups(r, mc)
        max_len = max([d.seq_len] + [s.seq_len or 0 for s in r.stages])
        if max_len > mc.max_seq_len:
            raise ConfigError(f"'data.seq_len' {max_len} exceeds the model's limit 'model.max_seq_len' = {mc.max_seq_len}")


def _check_stages(stages: Any) -> None:
    for i, s in enumerate(stages):
        _positive(f"stages[{i}].start_step", s.start_step, allow_zero=True)
        if s.seq_len is not None:
            _positive(f"stages[{i}].seq_len", s.seq_len)
        if s.rope_theta is not None:
            _positive(f"stages[{i}].rope_theta", s.rope_theta)


def _check_data_sources(d: Any) -> None:
    """data.source, or each [[data.sources]] entry (found, weighted, filtered; names made unique)."""
    if not d.sources and d.source not in ("stdlib",) and not d.source.startswith("passkey") \
            and not _source_exists(d.source):
        raise ConfigError(f"'data.source' not found: {d.source}")
    names = set()
    for i, s in enumerate(d.sources):
        where = f"data.sources[{i}]"
        if not s.path:
            raise ConfigError(f"'{where}.path' is missing")
        if s.path != "stdlib" and not _source_exists(s.path):
            raise ConfigError(f"'{where}.path' not found: {s.path}")
        if not s.weight > 0:
            raise ConfigError(f"'{where}.weight' must be > 0, got {s.weight}")
        for key in ("max_epochs", "min_doc_tokens", "max_doc_tokens", "long_doc_tokens"):
            _positive(f"{where}.{key}", getattr(s, key), allow_zero=True)
        if not s.long_doc_upsample > 0:
            raise ConfigError(f"'{where}.long_doc_upsample' must be > 0, got {s.long_doc_upsample}")
        if s.max_doc_tokens and s.max_doc_tokens < s.min_doc_tokens:
            raise ConfigError(f"'{where}.max_doc_tokens' {s.max_doc_tokens} < min_doc_tokens {s.min_doc_tokens}")
        _choice(f"{where}.format", s.format, ("auto", "text", "json", "parquet"))
        s.name = s.name or Path(s.path.rstrip("/")).name or f"source{i}"
        if s.name in names:
            raise ConfigError(f"'{where}.name' {s.name!r} is used twice: give the sources distinct names")
        names.add(s.name)


def _check_data_options(d: Any) -> None:
    """data.passkey_options / ruler_options keys, data.ruler_fraction, data.tokenizer."""
    if d.passkey_options:
        import inspect

        from longtrain.launcher.eval.passkey import mix_passkey_documents

        known = [n for n, p in inspect.signature(mix_passkey_documents).parameters.items()
                 if p.kind == p.KEYWORD_ONLY and n not in ("seed", "seq_len")]
        for k in d.passkey_options:
            if k not in known:
                raise ConfigError(f"unknown key 'data.passkey_options.{k}'{did_you_mean(k, known, 'data.passkey_options.')}")
    if not 0 <= d.ruler_fraction < 1:
        raise ConfigError(f"'data.ruler_fraction' must be in [0, 1), got {d.ruler_fraction}")
    if d.ruler_options:
        from longtrain.launcher.eval.ruler_scoring import RulerOptions

        known = ["kinds", "min_chars", *(f.name for f in dataclasses.fields(RulerOptions))]
        for k in d.ruler_options:
            if k not in known:
                raise ConfigError(f"unknown key 'data.ruler_options.{k}'{did_you_mean(k, known, 'data.ruler_options.')}")
    if d.tokenizer not in ("auto", "bytes") and not Path(d.tokenizer).exists():
        raise ConfigError(f"'data.tokenizer' not found: {d.tokenizer} (use \"bytes\" or a tokenizer.json / HF folder)")


def _check_eval(e: Any) -> None:
    if e.every < 0:
        raise ConfigError(f"'eval.every' must be >= 0, got {e.every}")
    if e.ruler_tasks:
        from longtrain.launcher.eval.ruler_scoring import TASKS

        bad = [t for t in e.ruler_tasks if t not in TASKS]
        if bad:
            raise ConfigError(f"unknown 'eval.ruler_tasks' {', '.join(bad)}; choose from {', '.join(TASKS)}")
        _positive("eval.ruler_samples", e.ruler_samples)


def _check_profile(r: Any) -> None:
    """[profile]: steps within the run, ranks >= 0 (against the world size once it is known: the trainer)."""
    pr = r.profile
    steps = pr.step_list()
    if isinstance(pr.steps, str) and not steps:
        raise ConfigError(f"'profile.steps' range {pr.steps!r} is empty (write it low-high, e.g. \"10-12\")")
    bad = [s for s in steps if s < 1 or s > r.training.steps]
    if bad:
        raise ConfigError(f"'profile.steps' asks for step {bad[0]}, outside this run's steps 1..{r.training.steps} "
                          "(training.steps)")
    if not pr.ranks:
        raise ConfigError("'profile.ranks' is empty: name at least one rank (e.g. [0])")
    if any(x < 0 for x in pr.ranks):
        raise ConfigError(f"'profile.ranks' must be ranks >= 0, got {pr.ranks}")


def _check_head_groups(r: Any, mc: Any) -> None:
    """training.attn_head_chunk against the model's heads and the Ulysses split."""
    from longtrain.models.memory import check_head_chunk, head_groups_split
    from longtrain.parallel.rules import ulysses_split_degree

    c = r.training.attn_head_chunk
    try:
        check_head_chunk(c, mc.n_heads, mc.n_kv_heads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c == "auto" or not c or c >= mc.n_heads:
        return
    if mc.moh is not None:
        raise ConfigError(f"'training.attn_head_chunk' = {c} with MoH attention: MoH routes heads per token and "
                          "is not run in head groups (use 'auto', which leaves MoH layers whole, or 0)")
    p = r.parallel
    u = ulysses_split_degree(p.sp, p.sp_impl, p.ulysses_degree)
    kv = max(1, c * mc.n_kv_heads // mc.n_heads)
    if u > 1 and not head_groups_split(c, kv, u):
        raise ConfigError(f"'training.attn_head_chunk' = {c}: a group of {c} query / {kv} key-value heads does not "
                          f"split over the {u} Ulysses ranks of parallel.sp_impl = {p.sp_impl!r} (use a multiple "
                          f"of {u} query heads, or 'auto')")


def _source_exists(source: str) -> bool:
    import glob

    return any(Path(s).exists() or glob.glob(s) for s in source.split(","))
