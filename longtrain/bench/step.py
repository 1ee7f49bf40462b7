"""`longtrain bench step`: tokens/s of longtrain's training step vs a plain PyTorch eager loop.

Both run in this process, alternating step by step (median step time of each), on the same model,
data and optimizer settings (world size 1), so the ratio shows longtrain's own overhead (engine wrapping, global-token loss,
metrics, all-reduces).

--profile: instead, what [profile] costs (docs/profiling.md). One trainer alternates four kinds of
step, round after round: profiling off (as every run without [profile]), off again (the noise between
two identical arms), our named ranges recording without a profiler (longtrain/ranges.py active), and
a step under torch.profiler with the ranges (trace not exported); median step time of each vs off.
"""

from __future__ import annotations

import argparse
import time

import torch

from longtrain.bench.common import print_table, write_json


class _PlainLoop:
    """The textbook eager loop: same model, data and AdamW; no engine, no distributed calls."""

    def __init__(self, recipe) -> None:
        from longtrain.launcher.data.corpus import build_corpus, corpus_tokenizer
        from longtrain.launcher.data.batches import collate
        from longtrain.models import Transformer

        torch.manual_seed(recipe.run.seed)
        d = recipe.data
        spec = corpus_tokenizer(d, "bytes" if d.tokenizer == "auto" else d.tokenizer, explicit=d.tokenizer != "auto")
        self.corpus, _ = build_corpus(recipe.data, seq_len=recipe.data.seq_len, seed=recipe.run.seed, tokenizer=spec,
                                      local_main=True)
        self.collate = collate
        self.model = Transformer(recipe.model_config())
        t = self.t = recipe.training
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                     weight_decay=t.weight_decay)
        self.pos = 0

    def step(self) -> int:
        mb = self.t.micro_batch
        b = self.collate(self.corpus.batch(self.pos, mb), False)
        self.pos += mb
        logits = self.model(b["tokens"], b["positions"])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), b["labels"].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return b["labels"].numel()


def _timed(fn) -> tuple[float, float]:
    t0 = time.perf_counter()
    n = fn()
    return float(n), time.perf_counter() - t0


def _compare(recipe, steps: int, warmup: int) -> tuple[float, float]:
    """Alternate one longtrain step and one plain step so machine noise hits both alike."""
    from longtrain.launcher.trainer import Trainer

    trainer = Trainer(recipe)
    plain = _PlainLoop(recipe)
    ours_t, plain_t, ours_n, plain_n = [], [], 0.0, 0.0
    for i in range(warmup + steps):
        n1, t1 = _timed(lambda: trainer.train_step()["tokens"])
        n2, t2 = _timed(plain.step)
        if i >= warmup:
            ours_t.append(t1)
            plain_t.append(t2)
            ours_n, plain_n = n1, n2
    ours_t.sort()
    plain_t.sort()
    return ours_n / ours_t[len(ours_t) // 2], plain_n / plain_t[len(plain_t) // 2]


def _save_cost(rank: int, world: int, recipe_path: str, sets: list[str], steps: int) -> dict:
    """Seconds the training loop is blocked by a checkpoint save, sync vs async (median over `steps`
    saves, one after every step), next to the median step time without a save."""
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = {}
    for mode in ("sync", "async"):
        recipe = load_recipe(recipe_path, [*sets, f"checkpoint.async={str(mode == 'async').lower()}",
                                           f"run.output_dir=/tmp/longtrain-bench-save-{mode}"])
        trainer = Trainer(recipe)
        trainer.checkpointer.prepare()
        step_t, save_t = [], []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            trainer.train_step()
            trainer.checkpointer.poll()
            t1 = time.perf_counter()
            trainer.save()
            t2 = time.perf_counter()
            if i:  # the first step and save warm up
                step_t.append(t1 - t0)
                save_t.append(t2 - t1)
        trainer.checkpointer.wait()
        step_t.sort()
        save_t.sort()
        out[mode] = {"step_s": step_t[len(step_t) // 2], "save_blocking_s": save_t[len(save_t) // 2]}
    return out


def _profile_cost(rank: int, world: int, recipe_path: str, sets: list[str], steps: int, warmup: int) -> dict:
    """Median tokens/s of each arm in the --profile mode (module doc), alternating round by round."""
    import torch.profiler

    from longtrain import ranges
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    trainer = Trainer(load_recipe(recipe_path, sets))

    def off() -> float:
        return trainer.train_step()["tokens"]

    def recording() -> float:
        ranges.ACTIVE = True
        try:
            return trainer.train_step()["tokens"]
        finally:
            ranges.ACTIVE = False

    def profiled() -> float:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True):
            return recording()

    arms = {"off": off, "off (again)": off, "ranges recording": recording, "torch.profiler + ranges": profiled}
    times: dict[str, list[float]] = {k: [] for k in arms}
    tokens = 0.0
    for i in range(warmup + steps):
        for name, fn in arms.items():
            tokens, t = _timed(fn)
            if i >= warmup:
                times[name].append(t)
    return {k: tokens / sorted(v)[len(v) // 2] for k, v in times.items()}


def _worker(rank: int, world: int, recipe_path: str, sets: list[str], steps: int, warmup: int):
    from longtrain.launcher.config import load_recipe

    return _compare(load_recipe(recipe_path, sets), steps, warmup)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="longtrain bench step", description=__doc__)
    ap.add_argument("--recipe", default="recipes/tiny-cpu.toml")
    ap.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--engine", action="append", default=None, help="fsdp2 and/or ddp (default both)")
    ap.add_argument("--compile", action="store_true",
                    help="also run each engine with training.compile = true (compiled vs eager tokens/s)")
    ap.add_argument("--save", action="store_true",
                    help="instead: how long a checkpoint save blocks the loop, sync vs checkpoint.async")
    ap.add_argument("--profile", action="store_true",
                    help="instead: tokens/s with [profile] off vs our ranges recording vs torch.profiler on")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from longtrain.testing import run_distributed

    if args.profile:
        sets = [*args.overrides, "checkpoint.resume=none", "run.output_dir=/tmp/longtrain-bench-profile"]
        (res,) = run_distributed(_profile_cost, 1, args.recipe, sets, args.steps, args.warmup,
                                 threads=torch.get_num_threads(), timeout=1800)
        rows = [{"arm": k, "tokens_per_s": v, "vs_off": v / res["off"]} for k, v in res.items()]
        print_table(rows)
        write_json("step-profile", {"recipe": args.recipe, "steps": args.steps, "overrides": args.overrides,
                                    "rows": rows}, args.out)
        return 0

    if args.save:
        sets = [*args.overrides, "checkpoint.resume=none", "checkpoint.keep_last=1"]
        (res,) = run_distributed(_save_cost, 1, args.recipe, sets, args.steps, threads=torch.get_num_threads(),
                                 timeout=1800)
        rows = [{"save": m, **v, "blocking_vs_sync": v["save_blocking_s"] / res["sync"]["save_blocking_s"]}
                for m, v in res.items()]
        print_table(rows)
        write_json("step-save", {"recipe": args.recipe, "steps": args.steps, "overrides": args.overrides,
                                 "rows": rows}, args.out)
        return 0

    rows = []
    for engine in args.engine or ["fsdp2", "ddp"]:
        for compiled in ([False, True] if args.compile else [False]):
            sets = [*args.overrides, f"parallel.dp_engine={engine}", "checkpoint.resume=none",
                    "run.output_dir=/tmp/longtrain-bench-step", f"training.compile={str(compiled).lower()}"]
            # a fresh process per arm, so one arm's state (or compiled code) cannot touch the next
            (ours, plain), = run_distributed(_worker, 1, args.recipe, sets, args.steps, args.warmup,
                                             threads=torch.get_num_threads(), timeout=1800)
            rows.append({"engine": engine, "compile": compiled, "longtrain_tok_s": ours,
                         "plain_eager_tok_s": plain, "ratio": ours / plain})
    for r in rows:
        if r["compile"]:
            eager = next(e for e in rows if e["engine"] == r["engine"] and not e["compile"])
            r["compiled_vs_eager"] = r["longtrain_tok_s"] / eager["longtrain_tok_s"]
    print_table(rows, ["engine", "compile", "longtrain_tok_s", "plain_eager_tok_s", "ratio", "compiled_vs_eager"])
    write_json("step", {"recipe": args.recipe, "steps": args.steps, "overrides": args.overrides, "rows": rows},
               args.out)
    return 0
