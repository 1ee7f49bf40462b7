"""What the training loop eats: this dp rank's micro-batches at the run's data position, prefetched,
and the [[stages]] that change the sequence length (and RoPE θ) on the way.

The data position is the number of samples the whole run has consumed (data/corpus.py states the
sampling rule); step t with global batch G takes samples [P, P+G), micro-batch m on dp rank d
taking P + (m*dp + d)*micro_batch + [0, micro_batch).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch

from longtrain.launcher.config import Recipe
from longtrain.launcher.data.batches import Prefetcher, collate
from longtrain.launcher.data.corpus import build_corpus
from longtrain.parallel.mesh import Layout
from longtrain.parallel.rules import check_sequence_length

log = logging.getLogger("longtrain")

DATA_TRACE_ENV = "LONGTRAIN_DATA_TRACE"  # test hook: where ranks log the samples they train on


class TrainingData:
    """The corpus, the data position and the prefetcher of one training run on this rank."""

    def __init__(self, recipe: Recipe, layout: Layout, tokenizer: str, *, local_main: bool,
                 sync: Callable[[str | None], str | None] | None) -> None:
        r = self.recipe = recipe
        self.layout = layout
        t0 = time.perf_counter()
        self.corpus, self.sources = build_corpus(r.data, seq_len=r.data.seq_len, seed=r.run.seed, tokenizer=tokenizer,
                                                 local_main=local_main, sync=sync)
        self.position = 0
        self.prefetch = Prefetcher(self._make_micro_batches, enabled=r.data.prefetch)
        log.info("data: %s | %d samples of %d tokens (%.1fs)", "; ".join(
            f"{s['name']}: {s['documents']:,} documents, {s['tokens']:,} tokens" + (
                f", weight {s['weight']:g}" if len(self.sources) > 1 else "") for s in self.sources),
            self.corpus.n_samples, r.data.seq_len, time.perf_counter() - t0)

    @property
    def seq_len(self) -> int:
        """The current stage's sequence length in tokens."""
        return self.corpus.seq_len

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all dp ranks."""
        t = self.recipe.training
        return self.layout.dp * t.micro_batch * t.grad_accum

    def tokens_per_step(self) -> int:
        """Tokens per optimizer step at the current stage (all ranks)."""
        return self.global_batch * self.seq_len

    def micro_batches(self, step: int) -> list[dict[str, Any]]:
        """This step's micro-batches for this dp rank (built ahead, during the previous step)."""
        key = (self.position, self.seq_len)
        nxt = (self.position + self.global_batch, self.seq_len) if step + 1 < self.recipe.training.steps else None
        batches = self.prefetch.get(key, nxt)
        if os.environ.get(DATA_TRACE_ENV):
            self._trace_samples(batches, step)
        return batches

    def advance(self) -> None:
        self.position += self.global_batch

    def resume(self, position: int, seq_len: int | None) -> None:
        """Continue at a checkpoint's data position (and the seq_len of the stage it was saved in)."""
        self.position = position
        if seq_len and seq_len != self.seq_len:
            self.corpus = self.corpus.with_seq_len(seq_len)

    def apply_stage(self, step: int) -> float | None:
        """[[stages]]: switch seq_len when a stage starts (also right after a resume); returns the
        stage's rope_theta (None: no change). On a seq_len change the data position is converted
        to the same number of tokens (rounded up) over the re-cut sample order."""
        r = self.recipe
        stage = None
        for s in sorted(r.stages, key=lambda s: s.start_step):
            if s.start_step <= step:
                stage = s
        seq_len = (stage.seq_len if stage and stage.seq_len else None) or r.data.seq_len
        if seq_len != self.seq_len:
            check_sequence_length(seq_len, self.layout.sp, r.parallel.sp_layout, what="stage seq_len")
            old = self.seq_len
            self.position = -(-self.position * old // seq_len)
            self.corpus = self.corpus.with_seq_len(seq_len)
            log.info("stage at step %d: seq_len %d -> %d (data position %d)", step, old, seq_len, self.position)
        return stage.rope_theta if stage and stage.rope_theta else None

    def planned_sources(self) -> list[dict[str, Any]]:
        """Each source's size, and the samples/tokens this run will draw from it (at the first seq_len)."""
        total = self.global_batch * self.recipe.training.steps
        blend = self.corpus.blend
        drawn = self.corpus.source_counts(total if blend is None or total <= blend.total else int(blend.total))
        return [{**info, "run_samples": int(n), "run_tokens": int(n) * self.seq_len}
                for info, n in zip(self.sources, drawn.tolist())]

    def source_scalars(self) -> dict[str, float]:
        """Tokens drawn so far from each source of a mixture, and their shares."""
        if len(self.sources) < 2:
            return {}
        drawn = self.corpus.source_counts(self.position) * self.seq_len
        out: dict[str, float] = {}
        for name, n in zip(self.corpus.names, drawn.tolist()):
            out[f"data/{name}/tokens"] = float(n)
            out[f"data/{name}/share"] = n / max(1, drawn.sum())
        return out

    def close(self) -> None:
        self.prefetch.close()

    def _make_micro_batches(self, key: tuple[int, int]) -> list[dict[str, Any]]:
        position, seq_len = key
        r, lay = self.recipe, self.layout
        corpus = self.corpus if self.corpus.seq_len == seq_len else self.corpus.with_seq_len(seq_len)
        mb, out = r.training.micro_batch, []
        for m in range(r.training.grad_accum):
            start = position + (m * lay.dp + lay.dp_rank) * mb
            out.append(collate(corpus.batch(start, mb), r.data.document_mask))
        return out

    def _trace_samples(self, batches: list[dict[str, Any]], step: int) -> None:
        """Test hook: append (step, global sample index, crc32 of its tokens) for this rank's samples."""
        import zlib

        lay, mb, S = self.layout, self.recipe.training.micro_batch, self.seq_len
        with open(f"{os.environ[DATA_TRACE_ENV]}.rank{lay.rank}", "a") as f:
            for m, b in enumerate(batches):
                rows = b["tokens"].reshape(-1, S)
                start = self.position + (m * lay.dp + lay.dp_rank) * mb
                for i in range(mb):
                    crc = zlib.crc32(rows[i].to(torch.int64).numpy().tobytes())
                    f.write(f"{step + 1} {start + i} {crc}\n")
