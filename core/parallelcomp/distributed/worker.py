"""`ChunkWorker`: what one Ray actor holds, a model replica (a whole `ParallelComp` engine) and its
shard of the chunk KV store, and the stages it runs for the driver. Knows nothing about Ray
(engine.py wraps it with `ray.remote`), so it is an ordinary class in tests.

Per question the worker returns only scores; the (compressed) KV of its own K best chunks waits
under the call's id until the driver has picked the global top-K and `take`s the ones it kept
(the global K best are always among the workers' local K best), then `release`s the call.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .. import kv as kvops
from ..chunking import Chunk
from ..config import ParallelCompConfig
from ..engine import ParallelComp
from ..output import ReuseStats
from ..prompts import PromptParts
from . import transfer

_CALLS_KEPT = 8
"""Calls whose kept KV a worker holds at most; an older call's is dropped (its driver gave up)."""


@dataclass
class Shard:
    """A worker's answer to `score`: no KV, only what the driver needs to pick the global top-K."""

    scores: dict[int, float]
    raw_bytes: dict[int, int]
    report: ReuseStats
    store_bytes: int
    seconds: float


class ChunkWorker:
    def __init__(self, model: str, config: ParallelCompConfig, device: str, dtype: str, threads: int):
        self.engine = ParallelComp.from_pretrained(model, config, device=device, dtype=dtype, threads=threads)
        self._kept: OrderedDict[str, dict[int, list[kvops.LayerKV | kvops.Tiled]]] = OrderedDict()

    def describe(self) -> dict:
        """What the driver checks before it trusts this worker's KV (same model identity)."""
        import parallelcomp

        fields, digest = self.engine._model_identity()
        return {"identity": digest, "fields": fields, "threads": torch.get_num_threads(),
                "package": parallelcomp.__file__, "pid": os.getpid()}

    def fill(self, config: ParallelCompConfig, prefix_ids: list[int], chunks: list[Chunk],
             keys: dict[int, str]) -> tuple[ReuseStats, int]:
        """Phase 1 of these chunks into this worker's store: (what the store did, bytes held)."""
        self.engine.config = config
        report = ReuseStats()
        with self.engine.layers():
            held = self.engine.fill_store(chunks, keys, prefix_ids, report)
        self.engine.store.flush(report)
        return report, held

    def score(self, call: str, config: ParallelCompConfig, parts: PromptParts, chunks: list[Chunk],
              keys: dict[int, str], matches: dict[int, float]) -> Shard:
        """Phases 1-2, compression and the local top-K of these chunks for one question, ranked
        with the driver's lexical `matches` (computed over the whole corpus)."""
        start = time.perf_counter()
        self.engine.config = config  # the driver's: an engine variant may change it between calls
        report = ReuseStats()
        with self.engine.layers():
            prefix = self.engine.prefix_kv(parts.prefix_ids, report)
            scored = self.engine.score_chunks(parts, chunks, keys, prefix, report, matches)
        self._kept.setdefault(call, {}).update({chunk.index: kv for chunk, kv in scored.kept})
        while len(self._kept) > _CALLS_KEPT:
            self._kept.popitem(last=False)
        return Shard(scored.scores, scored.raw_bytes, report, scored.store_bytes, time.perf_counter() - start)

    def take(self, call: str, indices: list[int]) -> dict[int, list[np.ndarray]]:
        """The kept KV of these chunks (numpy, zero-copy through the object store), untiled."""
        return {i: transfer.pack([kvops.plain(layer) for layer in self._kept[call][i]]) for i in indices}

    def flush(self) -> ReuseStats:
        """Write the chunks this worker encoded to its disk tier (the driver asks after the
        answer's last token: the store writes behind, store.py)."""
        report = ReuseStats()
        self.engine.store.flush(report)
        return report

    def release(self, call: str) -> None:
        """Drop the call's candidates."""
        self._kept.pop(call, None)
