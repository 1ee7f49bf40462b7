"""A checkpoint written by 2 processes resumes in 1 and in 4 processes with identical weights and
optimizer state, and the data position follows the documented rule (same global sample order)."""

from __future__ import annotations

import torch

from helpers import FAST, TINY, run_train
from longtrain.launcher.checkpoint import read_meta
from longtrain.testing import run_distributed


def _resume_and_dump(rank, world, recipe_path, sets):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    trainer = Trainer(load_recipe(recipe_path, sets))
    trainer.resume()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_sd, optim_sd = get_state_dict(trainer.engine.wrapped, trainer.engine.optimizer, options=opts)
    # which global samples this rank reads in the next step
    lay, mb = trainer.layout, trainer.recipe.training.micro_batch
    starts = [trainer.data.position + (m * lay.dp + lay.dp_rank) * mb for m in range(trainer.recipe.training.grad_accum)]
    next_tokens = [trainer.data.corpus.sample(s + i).tokens for s in starts for i in range(mb)]
    flat_optim = {f"{k}.{n}": v.clone() for k, st in optim_sd["state"].items() for n, v in st.items()
                  if isinstance(v, torch.Tensor)}
    return {"step": trainer.step, "pos": trainer.data.position, "model": {k: v.clone() for k, v in model_sd.items()},
            "optim": flat_optim, "next": next_tokens, "dp_rank": lay.dp_rank}


def test_reshard_2_to_1_and_4(tmp_path):
    out = tmp_path / "run"
    run_train(out, "training.steps=4", "checkpoint.interval=4")
    ckpt = out / "checkpoints" / "step_00000004"
    assert read_meta(ckpt)["world_size"] == 2
    sets = [f"run.output_dir={out}", *FAST, "training.steps=8", "checkpoint.interval=4"]
    results = {w: run_distributed(_resume_and_dump, w, str(TINY), sets) for w in (1, 4)}
    base = results[1][0]
    assert base["step"] == 4 and base["pos"] == 4 * 2 * 2  # 4 steps x dp 2 x micro_batch 2
    for w, per_rank in results.items():
        for r in per_rank:
            assert r["step"] == 4 and r["pos"] == base["pos"]
            assert r["model"].keys() == base["model"].keys()
            for k in base["model"]:
                assert torch.equal(r["model"][k], base["model"][k]), (w, k)
            assert r["optim"].keys() == base["optim"].keys() and len(base["optim"]) > 0
            for k in base["optim"]:
                assert torch.equal(r["optim"][k], base["optim"][k]), (w, k)
    # the same global order continues: the 4 ranks of the next step read consecutive global samples
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.data.sources import load_documents
    from longtrain.launcher.data.tokenizers import build_tokenizer
    from longtrain.testing import PackedCorpus

    rec = load_recipe(str(TINY), sets)
    corpus = PackedCorpus(load_documents("stdlib", max_documents=rec.data.max_documents), build_tokenizer("bytes"),
                          rec.data.seq_len, seed=rec.run.seed)
    expected = [corpus.sample(base["pos"] + i).tokens for i in range(4 * 2)]
    got = [t for r in sorted(results[4], key=lambda r: r["dp_rank"]) for t in r["next"]]
    assert all(torch.equal(a, b) for a, b in zip(expected, got)) and len(got) == len(expected)
