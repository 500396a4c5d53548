"""Two-phase parallel prefill (method.md §1.4, §9), exactly equal to encoding
`prefix + chunk + question` per chunk in one forward:

* the shared prefix's KV is encoded and stored once (`encode_prefix`);
* phase 1 (`encode_chunks`, question-independent): a micro-batch of chunks, right-padded, each
  row behind the prefix, so every chunk reuses the positions P, P+1, … (PCW); padded slots are
  sliced away, so each chunk's KV is stored exactly once, batch 1;
* phase 2 (`question_nll`, question-dependent): the question runs against each chunk's KV at
  positions P + L_c, …, giving the per-token NLL of Eq. 3. Only the logits scoring needs are
  computed (`logits_to_keep`), never a chunk's full-vocabulary logits (method.md §7 item 12).

Because phase 1 does not see the question, a corpus's chunk KV is reused across questions
(store.py, `ParallelComp.encode`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager, Iterator

import torch

from . import kv as kvops
from .chunking import Chunk
from .compat import forward


@dataclass
class EncodedChunk:
    chunk: Chunk
    kv: list[kvops.LayerKV]
    """The chunk's own tokens' KV (prefix excluded), batch 1."""
    last_logprobs: torch.Tensor
    """(V,) log-probabilities of the token after the chunk: scores the first question token."""

    @property
    def length(self) -> int:
        return len(self.chunk.token_ids)


def micro_batches(chunks: list[Chunk], budget_tokens: int) -> Iterator[list[Chunk]]:
    """Consecutive chunks grouped so that rows × longest chunk ≤ budget_tokens (at least one)."""
    batch: list[Chunk] = []
    for chunk in chunks:
        longest = max([len(c.token_ids) for c in batch] + [len(chunk.token_ids)])
        if batch and longest * (len(batch) + 1) > budget_tokens:
            yield batch
            batch = []
        batch.append(chunk)
    if batch:
        yield batch


@torch.inference_mode()
def encode_prefix(model, prefix_ids: list[int]) -> list[kvops.LayerKV]:
    device = model.device
    if not prefix_ids:
        return _empty_kv(model)
    cache = kvops.to_cache([])
    ids = torch.tensor([prefix_ids], device=device)
    forward(model, ids, cache, position_ids=torch.arange(len(prefix_ids), device=device)[None])
    return kvops.from_cache(cache)


@torch.inference_mode()
def encode_chunks(model, prefix_ids: list[int], chunks: list[Chunk]) -> list[EncodedChunk]:
    """Phase 1 for one micro-batch: rows [prefix ‖ chunk_i ‖ padding], causal, no mask.

    The prefix (a few dozen tokens) is re-run in every row instead of read from its cache: with
    q_len == kv_len and no mask, sdpa and flash attention take their fused causal kernels, which
    on CPU is about 2× faster and far leaner than the explicit-mask path a prefix cache forces
    (measured on SmolLM2, 8K tokens: 17 s vs 32 s). Right padding needs no mask either: a real
    token never attends to a later position. Only the chunk's own KV is kept.
    """
    device, p = model.device, len(prefix_ids)
    lengths = torch.tensor([len(c.token_ids) for c in chunks], device=device)
    ids = torch.zeros(len(chunks), p + int(lengths.max()), dtype=torch.long, device=device)
    for row, c in enumerate(chunks):
        ids[row, : p + len(c.token_ids)] = torch.tensor(prefix_ids + c.token_ids, device=device)
    cache = kvops.to_cache([])
    positions = torch.arange(ids.shape[1], device=device).expand(len(chunks), -1)
    logits = forward(model, ids, cache, positions, logits_to_keep=(p + lengths - 1)[:, None])
    logprobs = torch.log_softmax(logits[:, 0].float(), dim=-1)
    rows = kvops.split_rows(cache, [(p, p + len(c.token_ids)) for c in chunks])
    return [EncodedChunk(c, kv, logprobs[row]) for row, (c, kv) in enumerate(zip(chunks, rows))]


@torch.inference_mode()
def question_nll(
    model,
    prefix: list[kvops.LayerKV],
    encoded: list[EncodedChunk],
    question_ids: list[int],
    observe: ContextManager | None = None,
) -> torch.Tensor:
    """Phase 2: (B, q) NLL of every question token given each chunk (Eq. 3 before averaging).

    `observe` is entered around the forward (e.g. to capture attention for KV compression).
    """
    device, p, q = model.device, kvops.n_tokens(prefix), len(question_ids)
    lengths = torch.tensor([e.length for e in encoded], device=device)
    longest = int(lengths.max())
    cache = kvops.padded_batch_cache(prefix, [e.kv for e in encoded], extra_tokens=q)
    chunk_mask = torch.arange(longest, device=device)[None] < lengths[:, None]
    mask = torch.cat([_with_prefix(chunk_mask, p), chunk_mask.new_ones(len(encoded), q)], dim=1)
    positions = p + lengths[:, None] + torch.arange(q, device=device)[None]
    question = torch.tensor([question_ids], device=device).expand(len(encoded), -1)
    with observe or nullcontext():
        logits = forward(model, question, cache, positions, mask, logits_to_keep=q)
    first = torch.stack([-e.last_logprobs[question_ids[0]] for e in encoded])[:, None]
    if q == 1:
        return first
    rest = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = question[:, 1:, None]
    return torch.cat([first, -rest.gather(-1, targets)[..., 0]], dim=1)


def _with_prefix(chunk_mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    ones = chunk_mask.new_ones(chunk_mask.shape[0], prefix_len)
    return torch.cat([ones, chunk_mask], dim=1).long()


def _empty_kv(model) -> list[kvops.LayerKV]:
    """Zero-length KV for every layer, for prompts without a prefix (no BOS, no instruction)."""
    layers, heads, head_dim = kvops.layout(model)
    empty = torch.zeros(1, heads, 0, head_dim, dtype=model.dtype, device=model.device)
    return [(empty, empty) for _ in range(layers)]
