"""Packed documents add no device->host sync inside the model (issue 23, item 2).

Counted on CPU with bench.syncs.HostSyncCounter (aten._local_scalar_dense + Tensor.tolist, each
a pipeline drain on CUDA) over whole training steps with full, window and lightning layers, with
activation checkpointing (recompute), for one process and for sp = 2 (ring and lightning SP).
Before the fix document masks added 4 syncs per step with 4 full layers and 12 with 4 lightning
layers; the acceptance bound is 2 per step (one per micro-batch at grad_accum = 2).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import FAST, TINY
from longtrain.bench.syncs import HostSyncCounter
from longtrain.kernels.documents import DocBounds, as_doc_bounds
from longtrain.testing import run_distributed

SETS = [*FAST, "training.steps=10", "training.grad_accum=2", "checkpoint.interval=1000", "data.prefetch=false",
        "model.attention=[\"full\", \"window:24\", \"lightning\", \"lightning\"]",
        "training.activation_checkpointing=true"]


def short_documents(folder: Path, n: int = 300) -> Path:
    """A JSONL corpus of short documents (9-80 bytes), so every 64-token sample spans several."""
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    path = folder / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(n):
            k = int(torch.randint(2, 14, (1,), generator=g))
            f.write(json.dumps({"text": " ".join(words[int(i)] for i in torch.randint(0, 8, (k,), generator=g))})
                    + "\n")
    return path


def _count_step_syncs(rank: int, world: int, sp: int, impl: str, source: str) -> dict:
    from longtrain.launcher.config import load_recipe
    from longtrain.launcher.trainer import Trainer

    out = {}
    for dm in (False, True):
        sets = [f"run.output_dir={tempfile.mkdtemp()}", *SETS, f"data.source={source}", f"parallel.sp={sp}",
                f"parallel.sp_impl={impl}", f"data.document_mask={str(dm).lower()}"]
        trainer = Trainer(load_recipe(str(TINY), sets))
        trainer.train_step()  # first-step work (communicators, caches) is not per step
        trainer.step += 1
        with HostSyncCounter() as c:
            loss = trainer.train_step()["loss"]
        cu = trainer.data.micro_batches(trainer.step)[0]["cu_seqlens"]
        out[dm] = (c.count, dict(c.sites), loss, None if cu is None else len(cu))
    return out


@pytest.mark.parametrize("world,impl", [(1, "ring"), (2, "ring")])
def test_document_masks_add_no_host_sync(world, impl, tmp_path):
    res = run_distributed(_count_step_syncs, world, world, impl, str(short_documents(tmp_path)), timeout=240)
    for r in res:
        (plain, plain_sites, l0, _), (docs, doc_sites, l1, n_bounds) = r[False], r[True]
        added = {s: n - plain_sites.get(s, 0) for s, n in doc_sites.items() if n > plain_sites.get(s, 0)}
        assert docs - plain <= 2, f"document masks add {docs - plain} host syncs per step: {added}"
        assert plain > 0  # the counter sees the step's own (outside-the-model) syncs
        assert all(not s.startswith(("models/", "kernels/", "parallel/")) for s in added), added
        assert n_bounds >= 5  # 2 rows of 64 tokens hold several documents: the masks really cut
        assert abs(l1 - l0) > 1e-3 and 1.0 < l0 < 7.0  # and change the loss of a model that trains


def test_counter_sees_tolist_item_and_bool():
    x = torch.arange(5)
    with HostSyncCounter() as c:
        x.tolist()
        int(x[1])
        bool(x.any())
        x.sum().item()
        y = x * 2  # no read-back
    assert c.count == 4 and y[0].item() == 0
    assert torch.Tensor.tolist is not None and x.tolist() == [0, 1, 2, 3, 4]


def test_doc_bounds_are_validated_host_data():
    b = DocBounds([0, 3, 3, 10])
    assert b == (0, 3, 3, 10) and b.total == 10 and isinstance(b, tuple)
    assert as_doc_bounds(torch.tensor([0, 4, 8])) == (0, 4, 8) and as_doc_bounds(b) is b
    assert b.window(2, 6) == (0, 1, 6) and b.window(4, 6) is None and b.window(2, 6) is b.window(2, 6)
    assert b.starts_in(3, 4) == [3, 3]
    dev = b.on("cpu")
    assert dev.dtype == torch.int64 and dev.tolist() == [0, 3, 3, 10] and b.on("cpu") is dev
    import pickle

    assert pickle.loads(pickle.dumps(b)) == b
    for bad in ([0], [1, 4], [0, 5, 3]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            DocBounds(bad)
