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
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from longtrain.errors import ConfigError
from longtrain.parallel.rules import SP_IMPLS, resolve_sp_impl
from longtrain.parallel.rules import choose_dp_replicate
from longtrain.launcher.sizing import (GPUS, HOST_BASELINE_BYTES, GiB, INTERCONNECTS, Memory, StepTime, fsdp_traffic,
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
    host: dict = field(default_factory=dict)  # host memory per node against the node's (--host-memory)


# --host-memory units: single letters and IEC names are binary (G = GiB = 2^30), SI names decimal (GB = 1e9)
SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
              "t": 2**40, "tib": 2**40, "p": 2**50, "pib": 2**50,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}


def parse_size(text: str, option: str = "--host-memory") -> int:
    """Bytes in a size such as '2TiB', '1024GiB', '1.5T', '512G' (binary), '900GB', '2TB' (decimal) or a
    plain number of bytes; ConfigError (one line naming `option` and the value) for anything else or <= 0."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    size = float(m.group(1)) * SIZE_UNITS[unit] if m and unit in SIZE_UNITS else 0.0
    if not size >= 1:
        raise ConfigError(f"{option} must be a size > 0 such as 2TiB, 1024GiB, 1.5T, 512G (binary), 900GB "
                          f"(decimal) or a number of bytes, got {text!r}")
    return int(size)


def _check_args(gpu: str, interconnect: str, gpus: int, mfu: float) -> None:
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; choose one of: {', '.join(GPUS)}")
    if interconnect not in INTERCONNECTS:
        raise ConfigError(f"unknown --interconnect {interconnect!r}; choose one of: {', '.join(INTERCONNECTS)}")
    if gpus <= 0:
        raise ConfigError(f"--gpus must be > 0, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")


def make_plan(recipe: Any, gpus: int, gpu: str = "h100", interconnect: str = "ib", gpus_per_node: int = 8,
              mfu: float = 0.45, sp: int | None = None, host_memory: float | str | None = None) -> Plan:
    """The whole plan as data (what --json prints). `host_memory`: one node's host memory in bytes (or a
    size string, parse_size); default the GPU kind's usual node (GPUS[gpu].host_memory_gib)."""
    _check_args(gpu, interconnect, gpus, mfu)
    g = GPUS[gpu]
    inter_gbs, inter_desc = INTERCONNECTS[interconnect]
    cfg = recipe.model_config()
    t, p = recipe.training, recipe.parallel
    seq = max([recipe.data.seq_len] + [s.seq_len or 0 for s in recipe.stages])
    sp0 = sp or p.sp
    if gpus % sp0:
        raise ConfigError(f"{gpus} GPUs are not divisible by sp = {sp0}")
    gpn = min(gpus_per_node, gpus)
    node = parse_size(str(host_memory)) if host_memory is not None else g.host_memory_gib * GiB
    budget, host_budget = g.memory_gib * GiB * 0.9, node / gpn  # device: 90%; host: the node's share per GPU
    # parallel.dp_replicate as a run on these GPUs resolves it (the same rule, launcher/sizing.py)
    rep0, rep_why = choose_dp_replicate(p.dp_replicate, world=gpus, local_world=gpn, fits=lambda r: recipe_memory(
        recipe, cfg, world=gpus, sp=sp0, replicate=r).total <= budget)
    if gpus % rep0:
        raise ConfigError(f"{gpus} GPUs are not divisible by parallel.dp_replicate = {rep0}")

    def mem(s: int, r: int = rep0, n: int | None = None) -> Memory:
        return recipe_memory(recipe, cfg, world=gpus, sp=s, replicate=r, seq_len=n)

    def times(s: int, r: int = rep0) -> list[StepTime]:
        return [step_time(cfg, g, inter_gbs, world=gpus, sp=s, impl=i, grad_accum=t.grad_accum,
                          micro_batch=t.micro_batch, seq_len=seq, dtype=t.dtype, engine=p.dp_engine,
                          checkpointing=t.activation_checkpointing, mfu=mfu, loss_chunk=t.loss_chunk,
                          mlp_chunk=t.mlp_chunk, replicate=r, gpus_per_node=gpn, ulysses_degree=p.ulysses_degree,
                          zero_stage=p.zero_stage, attn_head_chunk=t.attn_head_chunk) for i in SP_IMPLS]

    m = mem(sp0)
    cands = _candidates(gpus, seq, mem, times, budget, host_budget)
    pick, why = _suggest(cands, g, node, gpn)
    to_gib = {k: ({kk: vv for kk, vv in v.items()} if isinstance(v, dict) else v / GiB) for k, v in asdict(m).items()}
    to_gib["per_token_bytes"] = to_gib.pop("per_token")
    longest_device = longest_fitting_seq(lambda n: mem(sp0, n=n).total, budget, 2 * sp0)
    longest = longest_fitting_seq(lambda n: mem(sp0, n=n).total, budget, 2 * sp0,
                                  host_bytes=lambda n: mem(sp0, n=n).host_total, host_budget=host_budget)
    host = {"node_gib": node / GiB, "per_node_gib": m.host_total * gpn / GiB, "per_gpu_gib": m.host_total / GiB,
            "baseline_gib": HOST_BASELINE_BYTES / GiB, "gpus_per_node": gpn, "fits": m.host_total <= host_budget}
    hint = ("mesa.enabled = true stores the offloaded inputs in 8 bits, " if m.host_offload and not recipe.mesa.enabled
            else "")
    notes = [] if host["fits"] else [
        f"host memory does not fit: {host['per_node_gib']:.0f} GiB per node ({host['per_gpu_gib']:.1f} GiB per GPU "
        f"x {gpn}) of {host['node_gib']:.0f} GiB (--host-memory); {hint}the longest length that fits both is "
        f"{longest:,} tokens"]
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
                "loss_chunk": t.loss_chunk, "mlp_chunk": t.mlp_chunk, "attn_head_chunk": t.attn_head_chunk,
                "head_groups": m.head_groups, "longest_seq_fitting": longest,
                "longest_seq_fitting_device": longest_device,
                "longest_seq_limited_by": "host memory" if longest < longest_device else "device memory",
                "tokens_per_step": (gpus // sp0) * t.micro_batch * t.grad_accum * seq},
        memory_gib=to_gib, step_time=[asdict(x) for x in times(sp0)], candidates=cands,
        suggestion={"sp": pick["sp"], "sp_impl": pick["best_impl"], "why": why,
                    "memory_gib": pick["memory_gib"], "tokens_per_s": pick["tokens_per_s"]},
        sharding=_sharding(recipe, cfg, gpus, gpn, rep0, rep_why, sp0, mem, times, budget), host=host, notes=notes)


def _candidates(gpus: int, seq: int, mem, times, budget: float, host_budget: float) -> list[dict]:
    """Every sp degree (powers of two dividing the GPUs and the sequence): memory, whether it fits the
    device and the host, and its fastest implementation."""
    cands = []
    s = 1
    while s <= gpus:
        if gpus % s == 0 and (s == 1 or seq % (2 * s) == 0):
            mm = mem(s)
            ts = [x for x in times(s) if x.feasible] if s > 1 else times(s)[:1]
            best = max(ts, key=lambda x: x.tokens_per_s)
            cands.append({"sp": s, "dp": gpus // s, "memory_gib": mm.total / GiB, "host_gib": mm.host_total / GiB,
                          "fits": mm.total <= budget and mm.host_total <= host_budget,
                          "fits_device": mm.total <= budget, "best_impl": best.impl if s > 1 else "none",
                          "step_s": best.step_s, "tokens_per_s": best.tokens_per_s})
        s *= 2
    return cands


def _suggest(cands: list[dict], g: Any, node: float, gpn: int) -> tuple[dict, str]:
    fitting = [c for c in cands if c["fits"]]
    if fitting:
        top = max(c["tokens_per_s"] for c in fitting)
        pick = min((c for c in fitting if c["tokens_per_s"] >= 0.97 * top), key=lambda c: c["sp"])
        return pick, (f"smallest sp within 3% of the best throughput that fits in 90% of {g.memory_gib:.0f} GiB"
                      f" and {node / GiB:.0f} GiB of host memory per node")
    pick = min(cands, key=lambda c: c["memory_gib"])
    if any(c["fits_device"] for c in cands):
        return pick, (f"nothing fits {node / GiB:.0f} GiB of host memory per node of {gpn}: store offloaded inputs "
                      "in 8 bits (mesa), checkpoint on the device ('full'), shorten the sequence or add nodes")
    return pick, "nothing fits: turn on activation_checkpointing / mesa / attn_head_chunk, lower micro_batch, or add GPUs"


def _sharding(recipe: Any, cfg: Any, gpus: int, gpn: int, rep0: int, rep_why: str, sp0: int, mem, times,
              budget: float) -> dict | None:
    """FSDP2 only: plain vs hybrid sharding (traffic by link, memory) and the dp_replicate to use."""
    t, p = recipe.training, recipe.parallel
    if p.dp_engine != "fsdp2":
        return None

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
    return {"recipe": p.dp_replicate, "resolved": rep0, "resolved_why": rep_why, "nodes": nodes,
            "plain": mode(1), "hybrid": mode(hyb) if hyb > 1 else None,
            "suggestion": {"dp_replicate": auto, "why": auto_why}}


def longest_fitting_seq(total_bytes, budget: float, multiple: int, cap: int = 2**26, host_bytes=None,
                        host_budget: float = math.inf) -> int:
    """The longest sequence (a multiple of `multiple` x 1024) whose `total_bytes(seq)` fits in `budget`
    and, given `host_bytes`, whose `host_bytes(seq)` fits in `host_budget` (a second budget); 0 if none does."""
    def fits(n: int) -> bool:
        return total_bytes(n) <= budget and (host_bytes is None or host_bytes(n) <= host_budget)

    step = 1024 * multiple
    if not fits(step):
        return 0
    lo = step
    while lo * 2 <= cap and fits(lo * 2):
        lo *= 2
    hi = lo * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
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
               f"mlp_chunk {L['mlp_chunk']}, attn_head_chunk {L['attn_head_chunk']}"
               f"{' (' + str(L['head_groups']) + ' head groups)' if L['head_groups'] > 1 else ''}, "
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
    host = {"activations, checkpointed": M["host_ckpt"], "activations, Mesa + checkpointed": M["host_mesa_ckpt"]}
    for name, v in rows:  # with 'offload' the checkpointed inputs are in host memory: shown beside the device part
        out.append(f"  {name:<38}{v:9.2f}" + (f"   + {host[name]:.2f} in host memory" if host.get(name) else ""))
    out.append(f"  {'total, as configured':<38}{M['total']:9.2f}   ({100 * M['total'] / g['memory_gib']:.0f}% of "
               f"{g['memory_gib']:.0f} GiB)")
    pt = M["per_token_bytes"]
    out.append("  bytes per local token: " + ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in pt.items() if v))
    out += _format_host(pl)
    limit = f" (limited by {L['longest_seq_limited_by']})" if L["longest_seq_limited_by"] == "host memory" else ""
    out.append(f"  longest seq that fits in 90% of {g['memory_gib']:.0f} GiB and {pl.host['node_gib']:.0f} GiB of "
               f"host memory per node at this layout: {L['longest_seq_fitting']:,} tokens{limit}")
    out.append("")
    out.append(f"step time at sp={L['sp']} (assumed {100 * g['mfu_assumed']:.0f}% of peak)")
    out.append("  impl              compute   attention   sp comm   exposed   dp comm    step     tokens/s")
    for s in pl.step_time:
        flag = "" if s["feasible"] else f"   (not possible: {s['note']})"
        out.append(f"  {s['impl']:<16}{s['compute_s']:8.2f}s {s['attention_s']:9.2f}s {s['sp_comm_s']:8.2f}s "
                   f"{s['sp_exposed_s']:8.2f}s {s['dp_comm_s']:8.2f}s {s['step_s']:7.2f}s {s['tokens_per_s']:11,.0f}{flag}")
    out.append("")
    out.append("other sp degrees (best implementation each; fits = device and host memory)")
    out.append("  sp    dp   memory GiB  host GiB/node  fits   impl              step     tokens/s")
    for c in pl.candidates:
        out.append(f"  {c['sp']:<5}{c['dp']:<5}{c['memory_gib']:10.1f}{c['host_gib'] * g['gpus_per_node']:15.0f}   "
                   f"{'yes' if c['fits'] else 'no ':<5}{c['best_impl']:<16}{c['step_s']:7.2f}s "
                   f"{c['tokens_per_s']:11,.0f}")
    if pl.sharding:
        out += _format_sharding(pl)
    sg = pl.suggestion
    out.append("")
    for n in pl.notes:
        out.append(f"note: {n}")
    out.append(f"suggestion: sp={sg['sp']} {sg['sp_impl']} ({sg['why']}): {sg['memory_gib']:.1f} GiB per GPU, "
               f"~{sg['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(out) + "\n"


def _format_host(pl: Plan) -> list[str]:
    """Host memory: offloaded inputs, the loading peak, host_total per GPU and the node's total."""
    M, h, gpn = pl.memory_gib, pl.host, pl.gpu["gpus_per_node"]
    out = []
    if M["host_offload"]:
        width = "Mesa 8-bit" if pl.layout["mesa"] else pl.layout["dtype"]
        out.append(f"  host memory for offloaded inputs ({width}): {M['host_offload']:.2f} GiB per GPU, "
                   f"{M['host_offload'] * gpn:.0f} GiB per node of {gpn}")
    out.append(f"  host memory per rank while loading the model: {M['loading_peak']:.2f} GiB")
    opt = f" + optimizer {M['host_optimizer']:.2f}" if M["host_optimizer"] else ""
    out.append(f"  host memory per GPU: {M['host_total']:.2f} GiB = process baseline {h['baseline_gib']:.2f} + "
               f"max(loading {M['loading_peak']:.2f}, offloaded inputs {M['host_offload']:.2f}{opt}); "
               "pinned staging is the offload store itself")
    out.append(f"  host memory per node: {h['per_node_gib']:.0f} GiB of {h['node_gib']:.0f} GiB "
               f"({'fits' if h['fits'] else 'does not fit'})")
    return out


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
    p.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host memory of one node (of --gpus-per-node GPUs), e.g. 2TiB, 1024GiB, 1.5T, 512G, 900GB "
                        "or bytes: K/M/G/T and KiB/MiB/GiB/TiB are binary (G = 2^30 bytes), KB/MB/GB/TB decimal "
                        "(GB = 1e9); default: the GPU kind's usual node (2 TiB for 8 x H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.45, help="assumed fraction of peak FLOP/s (default 0.45)")
    p.add_argument("--sp", type=int, default=None, help="sp degree to detail (default: the recipe's)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def main(argv: list[str]) -> int:
    # '--host-memory -1G' would read as an option to argparse: join the value so parse_size names it
    argv = [f"{x}={argv[i + 1]}" if x == "--host-memory" and i + 1 < len(argv) else x for i, x in enumerate(argv)
            if not (i > 0 and argv[i - 1] == "--host-memory")]
    a = _parser().parse_args(argv)
    host = parse_size(a.host_memory) if a.host_memory is not None else None  # bad sizes stop before the recipe
    recipe, notes = load_for_plan(a.recipe, a.overrides)
    pl = make_plan(recipe, a.gpus, a.gpu.lower(), a.interconnect.lower(), a.gpus_per_node, a.mfu, a.sp, host)
    pl.notes = notes + pl.notes
    if a.json:
        json.dump(asdict(pl), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_plan(pl))
    return 0
