"""`longtrain plan RECIPE --gpus N [--gpu h100] [--interconnect ib]`: size a job before running it.

Memory per GPU (parameters, gradients, optimizer, activations with/without Mesa and activation
checkpointing, logits) and step time (compute; sequence-parallel communication for ring, tokenring,
ulysses and hybrid; data-parallel gradient traffic), for the recipe's layout and for every other
sp degree, with a suggested sp degree and implementation.

The activation count follows what this repository's model saves for backward (per token per
layer; see `activation_bytes_per_token`), so the same formula is checked against measured peaks of
real CPU steps in tests/test_plan.py (within 20%). Everything else is a first-order model: FLOPs
at an assumed fraction of peak (--mfu), bytes over a link at its bandwidth, no latency terms.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from longtrain.errors import ConfigError
from longtrain.parallel.rules import SP_IMPLS, resolve_sp_impl
from longtrain.launcher.sizing import (GPUS, GiB, INTERCONNECTS, Memory, StepTime, choose_dp_replicate, fsdp_traffic,
                                      recipe_memory, step_time)

@dataclass
class Plan:
    recipe: str
    gpus: int
    gpu: dict
    interconnect: dict
    model: dict
    layout: dict
    memory_gib: dict
    step_time: list
    candidates: list = field(default_factory=list)
    suggestion: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    sharding: dict | None = None  # FSDP2: plain vs hybrid (parallel.dp_replicate) traffic and memory


def make_plan(recipe: Any, gpus: int, gpu: str = "h100", interconnect: str = "ib", gpus_per_node: int = 8,
              mfu: float = 0.45, sp: int | None = None) -> Plan:
    """The whole plan as data (what --json prints)."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; choose one of: {', '.join(GPUS)}")
    if interconnect not in INTERCONNECTS:
        raise ConfigError(f"unknown --interconnect {interconnect!r}; choose one of: {', '.join(INTERCONNECTS)}")
    if gpus <= 0:
        raise ConfigError(f"--gpus must be > 0, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    g = GPUS[gpu]
    inter_gbs, inter_desc = INTERCONNECTS[interconnect]
    cfg = recipe.model_config()
    t, p = recipe.training, recipe.parallel
    seq = max([recipe.data.seq_len] + [s.seq_len or 0 for s in recipe.stages])
    sp0 = sp or p.sp
    if gpus % sp0:
        raise ConfigError(f"{gpus} GPUs are not divisible by sp = {sp0}")
    gpn = min(gpus_per_node, gpus)
    common = dict(micro_batch=t.micro_batch, seq_len=seq, dtype=t.dtype)
    budget = g.memory_gib * GiB * 0.9
    # parallel.dp_replicate as a run on these GPUs resolves it (the same rule, launcher/sizing.py)
    rep0, rep_why = choose_dp_replicate(p.dp_replicate, world=gpus, local_world=gpn, fits=lambda r: recipe_memory(
        recipe, cfg, world=gpus, sp=sp0, replicate=r).total <= budget)
    if gpus % rep0:
        raise ConfigError(f"{gpus} GPUs are not divisible by parallel.dp_replicate = {rep0}")

    def mem(s: int, r: int = rep0) -> Memory:
        return recipe_memory(recipe, cfg, world=gpus, sp=s, replicate=r)

    def times(s: int, r: int = rep0) -> list[StepTime]:
        return [step_time(cfg, g, inter_gbs, world=gpus, sp=s, impl=i, grad_accum=t.grad_accum,
                          engine=p.dp_engine, checkpointing=t.activation_checkpointing, mfu=mfu,
                          loss_chunk=t.loss_chunk, mlp_chunk=t.mlp_chunk, replicate=r,
                          gpus_per_node=gpn, ulysses_degree=p.ulysses_degree, zero_stage=p.zero_stage, **common) for i in SP_IMPLS]

    m = mem(sp0)
    st = times(sp0)
    cands = []
    s = 1
    while s <= gpus:
        layout_ok = gpus % s == 0 and (s == 1 or seq % (2 * s) == 0)
        if layout_ok:
            mm = mem(s)
            ts = [x for x in times(s) if x.feasible] if s > 1 else times(s)[:1]
            best = max(ts, key=lambda x: x.tokens_per_s)
            cands.append({"sp": s, "dp": gpus // s, "memory_gib": mm.total / GiB, "fits": mm.total <= budget,
                          "best_impl": best.impl if s > 1 else "none", "step_s": best.step_s,
                          "tokens_per_s": best.tokens_per_s})
        s *= 2
    fitting = [c for c in cands if c["fits"]]
    if fitting:
        top = max(c["tokens_per_s"] for c in fitting)
        pick = min((c for c in fitting if c["tokens_per_s"] >= 0.97 * top), key=lambda c: c["sp"])
        why = (f"smallest sp within 3% of the best throughput that fits in 90% of {g.memory_gib:.0f} GiB")
    else:
        pick = min(cands, key=lambda c: c["memory_gib"])
        why = "nothing fits: turn on activation_checkpointing / mesa, lower micro_batch, or add GPUs"
    to_gib = {k: ({kk: vv for kk, vv in v.items()} if isinstance(v, dict) else v / GiB) for k, v in asdict(m).items()}
    to_gib["per_token_bytes"] = to_gib.pop("per_token")
    longest = longest_fitting_seq(lambda n: recipe_memory(recipe, cfg, world=gpus, sp=sp0, seq_len=n,
                                                          replicate=rep0).total, budget, 2 * sp0)
    sharding = None
    if p.dp_engine == "fsdp2":
        def mode(r: int) -> dict:
            tr = fsdp_traffic(cfg.n_params, world=gpus, replicate=r, gpus_per_node=gpn, grad_accum=t.grad_accum,
                              param_bytes=2 if t.dtype == "bf16" else 4)
            return {"dp_replicate": r, "shard_group": tr["group"], "intra_node_gb": tr["intra_bytes"] / 1e9,
                    "inter_node_gb": tr["inter_bytes"] / 1e9, "dp_comm_s": times(sp0, r)[0].dp_comm_s,
                    "memory_gib": mem(sp0, r).total / GiB, "fits": mem(sp0, r).total <= budget}

        nodes = gpus // gpn if gpus > gpn and gpus % gpn == 0 else 1
        hyb = rep0 if rep0 > 1 else nodes
        auto, auto_why = choose_dp_replicate("auto", world=gpus, local_world=gpn,
                                             fits=lambda r: mem(sp0, r).total <= budget)
        sharding = {"recipe": p.dp_replicate, "resolved": rep0, "resolved_why": rep_why, "nodes": nodes,
                    "plain": mode(1), "hybrid": mode(hyb) if hyb > 1 else None,
                    "suggestion": {"dp_replicate": auto, "why": auto_why}}
    return Plan(
        recipe=recipe.source_path or recipe.run.name, gpus=gpus,
        gpu={"key": gpu, **asdict(g), "mfu_assumed": mfu, "gpus_per_node": gpn},
        interconnect={"key": interconnect, "gbs_per_gpu": inter_gbs, "what": inter_desc},
        model={"preset": recipe.model.preset, "n_params": cfg.n_params, "n_layers": cfg.n_layers, "dim": cfg.dim,
               "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
               "vocab_size": cfg.vocab_size, "moh": asdict(cfg.moh) if cfg.moh else None},
        layout={"world": gpus, "dp": gpus // sp0, "sp": sp0, "sp_impl": resolve_sp_impl(p.sp_impl, cfg.n_heads, cfg.n_kv_heads), "seq_len": seq,
                "micro_batch": t.micro_batch, "grad_accum": t.grad_accum, "dtype": t.dtype, "engine": p.dp_engine,
                "zero_stage": p.zero_stage if p.dp_engine == "deepspeed" else None,
                "activation_checkpointing": t.activation_checkpointing, "mesa": recipe.mesa.enabled,
                "loss_chunk": t.loss_chunk, "mlp_chunk": t.mlp_chunk, "longest_seq_fitting": longest,
                "tokens_per_step": (gpus // sp0) * t.micro_batch * t.grad_accum * seq},
        memory_gib=to_gib, step_time=[asdict(x) for x in st], candidates=cands,
        suggestion={"sp": pick["sp"], "sp_impl": pick["best_impl"], "why": why,
                    "memory_gib": pick["memory_gib"], "tokens_per_s": pick["tokens_per_s"]}, sharding=sharding)


def longest_fitting_seq(total_bytes, budget: float, multiple: int, cap: int = 2**26) -> int:
    """The longest sequence (a multiple of `multiple` x 1024) whose `total_bytes(seq)` fits in `budget`;
    0 if none does."""
    step = 1024 * multiple
    if total_bytes(step) > budget:
        return 0
    lo = step
    while lo * 2 <= cap and total_bytes(lo * 2) <= budget:
        lo *= 2
    hi = lo * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if total_bytes(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def load_for_plan(path: str, overrides: list[str]) -> tuple[Any, list[str]]:
    """The recipe as `longtrain train` reads it, except that missing local paths (HF init_from
    folder, data files, tokenizer) do not stop a plan: sizes come from model.preset."""
    import tomllib
    from pathlib import Path

    from longtrain.launcher.config import apply_override, load_recipe, recipe_from_dict, resolve_recipe

    try:
        return load_recipe(path, overrides), []
    except ConfigError as e:
        if "not found" not in str(e) or "recipe" in str(e).split(":")[0]:
            raise
    data = tomllib.loads(resolve_recipe(path).read_text())
    for o in overrides:
        apply_override(data, o)
    notes = []
    model, d = data.setdefault("model", {}), data.setdefault("data", {})
    if model.get("init_from") and not Path(model["init_from"]).is_dir():
        notes.append(f"model.init_from {model.pop('init_from')} not found here: sizes from preset "
                     f"{model.get('preset')!r}")
        stages = [st.get("seq_len") or 0 for st in data.get("stages", [])]
        model.setdefault("max_seq_len", max([d.get("seq_len", 0), *stages, 8192]))
    if d.get("source") and d["source"] != "stdlib" and not d["source"].startswith("passkey"):
        import glob

        if not any(Path(x).exists() or glob.glob(x) for x in d["source"].split(",")):
            notes.append(f"data.source {d['source']} not found here (not needed for a plan)")
            d["source"] = "stdlib"
    if d.get("tokenizer", "bytes") != "bytes" and not Path(d["tokenizer"]).exists():
        d["tokenizer"] = "bytes"
    r = recipe_from_dict(data, str(path))
    return r, notes


def format_plan(pl: Plan) -> str:
    g, L, M = pl.gpu, pl.layout, pl.memory_gib
    out = []
    out.append(f"plan for {pl.recipe} on {pl.gpus} x {g['name']} ({g['gpus_per_node']} per node, "
               f"{g['intra_link']} {g['intra_gbs']:.0f} GB/s; between nodes {pl.interconnect['what']}, "
               f"{pl.interconnect['gbs_per_gpu']:g} GB/s per GPU)")
    mo = pl.model
    moh = f", MoH {mo['moh']['shared_heads']}+{mo['moh']['routed_heads']} of {mo['n_heads']} heads" if mo["moh"] else ""
    out.append(f"model {mo['preset'] or 'custom'}: {mo['n_params'] / 1e9:.2f}B params, {mo['n_layers']} layers, "
               f"dim {mo['dim']}, {mo['n_heads']} q / {mo['n_kv_heads']} kv heads x {mo['head_dim']}{moh}")
    out.append(f"layout: dp {L['dp']} x sp {L['sp']} ({L['sp_impl']}), seq {L['seq_len']:,} "
               f"({L['seq_len'] // L['sp']:,} tokens per GPU), micro_batch {L['micro_batch']} x grad_accum "
               f"{L['grad_accum']}, {L['dtype']}, {L['engine']}"
               f"{' ZeRO-' + str(L['zero_stage']) if L['zero_stage'] is not None else ''}, "
               f"activation checkpointing {L['activation_checkpointing']}, loss_chunk {L['loss_chunk']}, "
               f"mlp_chunk {L['mlp_chunk']}, "
               f"Mesa {'on' if L['mesa'] else 'off'}; {L['tokens_per_step']:,} tokens per step")
    out.append("")
    out.append("memory per GPU                          GiB")
    rows = [("parameters", M["params"]), ("gradients", M["grads"]), ("optimizer (AdamW m, v)", M["optimizer"]),
            ("gathered layers + optimizer temporaries", M["transient"]),
            ("activations, no checkpointing", M["activations_plain"]),
            ("activations, checkpointed", M["activations_ckpt"]),
            ("activations, Mesa 8-bit", M["activations_mesa"]),
            ("activations, Mesa + checkpointed", M["activations_mesa_ckpt"]),
            ("activations, as configured", M["activations"]),
            ("output projection + loss", M["logits"]),
            ("MLP tile (recompute)", M["mlp_tile"])]
    for name, v in rows:
        out.append(f"  {name:<38}{v:9.2f}")
    out.append(f"  {'total, as configured':<38}{M['total']:9.2f}   ({100 * M['total'] / g['memory_gib']:.0f}% of "
               f"{g['memory_gib']:.0f} GiB)")
    pt = M["per_token_bytes"]
    out.append("  bytes per local token: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in pt.items() if v))
    if M["host_offload"]:
        out.append(f"  host memory for offloaded inputs: {M['host_offload']:.2f} GiB per GPU, "
                   f"{M['host_offload'] * g['gpus_per_node']:.0f} GiB per node of {g['gpus_per_node']}")
    out.append(f"  host memory per rank while loading the model: {M['loading_peak']:.2f} GiB")
    out.append(f"  longest seq that fits in 90% of {g['memory_gib']:.0f} GiB at this layout: "
               f"{L['longest_seq_fitting']:,} tokens")
    out.append("")
    out.append(f"step time at sp={L['sp']} (assumed {100 * g['mfu_assumed']:.0f}% of peak)")
    out.append("  impl              compute   attention   sp comm   exposed   dp comm    step     tokens/s")
    for s in pl.step_time:
        flag = "" if s["feasible"] else f"   (not possible: {s['note']})"
        out.append(f"  {s['impl']:<16}{s['compute_s']:8.2f}s {s['attention_s']:9.2f}s {s['sp_comm_s']:8.2f}s "
                   f"{s['sp_exposed_s']:8.2f}s {s['dp_comm_s']:8.2f}s {s['step_s']:7.2f}s {s['tokens_per_s']:11,.0f}{flag}")
    out.append("")
    out.append("other sp degrees (best implementation each)")
    out.append("  sp    dp   memory GiB  fits   impl              step     tokens/s")
    for c in pl.candidates:
        out.append(f"  {c['sp']:<5}{c['dp']:<5}{c['memory_gib']:10.1f}   {'yes' if c['fits'] else 'no ':<5}"
                   f"{c['best_impl']:<16}{c['step_s']:7.2f}s {c['tokens_per_s']:11,.0f}")
    if pl.sharding:
        out += _format_sharding(pl)
    sg = pl.suggestion
    out.append("")
    for n in pl.notes:
        out.append(f"note: {n}")
    out.append(f"suggestion: sp={sg['sp']} {sg['sp_impl']} ({sg['why']}): {sg['memory_gib']:.1f} GiB per GPU, "
               f"~{sg['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(out) + "\n"


def _format_sharding(pl: Plan) -> list[str]:
    """The FSDP2 section: plain vs hybrid bytes per GPU per step, by link, and the dp_replicate to use."""
    sh, gpn = pl.sharding, pl.gpu["gpus_per_node"]
    out = ["", f"FSDP2 sharding at sp={pl.layout['sp']} (bytes each GPU sends per step: parameter all-gathers "
           "fwd+bwd per micro-batch, gradient reduce-scatter; hybrid adds the all-reduce of each rank's gradient "
           "shard across replicas)",
           "  mode                       shard group  intra-node GB  inter-node GB   dp comm  memory GiB  fits"]
    for key in ("plain", "hybrid"):
        x = sh[key]
        if x is None:
            continue
        name = (f"plain over {pl.gpus} GPUs" if key == "plain" else
                f"hybrid {x['dp_replicate']} x {x['shard_group']}")
        out.append(f"  {name:<27}{x['shard_group']:>11}{x['intra_node_gb']:15.2f}{x['inter_node_gb']:15.2f}"
                   f"{x['dp_comm_s']:9.2f}s{x['memory_gib']:12.1f}  {'yes' if x['fits'] else 'no'}")
    if sh["hybrid"] is None:
        out.append(f"  (one node of {gpn} GPUs: hybrid sharding would only replicate inside the node)")
    sg = sh["suggestion"]
    out.append(f"  recipe parallel.dp_replicate = {sh['recipe']!r} -> {sh['resolved']} here ({sh['resolved_why']}); "
               f"suggested: {sg['dp_replicate']} ({sg['why']})")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtrain plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs")
    p.add_argument("--gpu", default="h100", help=f"GPU model: {', '.join(GPUS)}")
    p.add_argument("--interconnect", default="ib", help=f"between nodes: {', '.join(INTERCONNECTS)}")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.45, help="assumed fraction of peak FLOP/s (default 0.45)")
    p.add_argument("--sp", type=int, default=None, help="sp degree to detail (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    recipe, notes = load_for_plan(a.recipe, a.overrides)
    pl = make_plan(recipe, a.gpus, a.gpu.lower(), a.interconnect.lower(), a.gpus_per_node, a.mfu, a.sp)
    pl.notes = notes
    if a.json:
        json.dump(asdict(pl), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_plan(pl))
    return 0
