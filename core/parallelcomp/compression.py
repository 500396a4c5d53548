"""Per-chunk KV eviction, SnapKV-style (method.md §3, "Ours-compression").

For every chunk, each of its context tokens is scored by the attention it receives from the
observation rows of the question step, per layer and head:

    A = softmax_fp32(q_rows · Kᵀ · scale)     over every key the row can see: prefix, chunk and
                                               the causal part of the question (padding masked)
    s[j] = Σ_rows A[row, j]                    for the chunk's own tokens j only
    s'   = maxpool1d(s, kernel, stride 1, padding kernel//2)   (or avgpool)

and each layer keeps the top-B tokens per KV head, in their original order, with their original
RoPE positions (p0 is computed from uncompressed lengths and does not change).

Observation rows (`snap_observation`): "question", the question text's own tokens, as Eq. 6
sums the attention of the query tokens; or "last", the last `snap_window` tokens of the suffix,
as the official code does (with a chat template those are mostly template tokens, e.g. ' pin',
'?', '<|im_end|>', '\n', '<|im_start|>', 'ass', 'istant', '\n' with SmolLM2).

GQA: the official code scores and selects per *query* head on a repeat_kv-expanded cache. We
never expand the cache: each query head is scored and pooled exactly as in the official code,
then the G query heads sharing a KV head are combined (`gqa_reduce`: mean by default, or max)
and selection is per KV head. With G = 1 this is the official selection.

No second pass over the chunk: the scores come from phase 2 (`prefill.question_nll`), whose
attention (`attention.chunk_attention`) hands each row's fp32 probabilities to `BatchCompressor.observe`.
A budget ≥ the chunk length leaves that chunk untouched (an exact no-op).
Only chunk tokens are candidates: the shared prefix is stored once, outside the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from . import kv as kvops
from .errors import InputError
from .prefill import EncodedChunk


@dataclass(frozen=True)
class SnapKV:
    """The per-chunk token scorer: observation rows [first, end) of the question, pooling
    kernel, pooling kind, GQA reduction."""

    rows: tuple[int, int]
    kernel: int = 7
    pooling: Literal["max", "avg"] = "max"
    gqa_reduce: Literal["mean", "max"] = "mean"

    @classmethod
    def from_config(cls, config, rows: tuple[int, int]) -> SnapKV:
        return cls(rows, config.pool_kernel, config.pooling, config.gqa_reduce)

    def score(self, attention: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """(B, H_kv, length) scores of keys [start, start + length).

        attention: (B, H_kv, G, w, T) fp32 probabilities of the w observation rows over all keys.
        """
        s = attention.sum(dim=-2)[..., start : start + length]  # (B, H_kv, G, L)
        b, h_kv, g, n = s.shape
        flat = s.reshape(b * h_kv * g, 1, n)
        if self.pooling == "max":
            flat = F.max_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2)
        else:  # zero padding counted at the borders, as F.avg_pool1d does in the official code
            flat = F.avg_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2)
        pooled = flat.view(b, h_kv, g, n)
        return pooled.mean(dim=2) if self.gqa_reduce == "mean" else pooled.amax(dim=2)


def keep_topk(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """(B, H_kv, budget) indices of the highest scores per head, sorted ascending.

    Ties (frequent after max-pooling) go to the earlier token, so the choice is deterministic.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :budget]
    return order.sort(dim=-1).values


def observation_rows(config, question_tokens: int, question_span: tuple[int, int]) -> tuple[int, int]:
    """[first, end) of the question-step rows that score the chunk tokens (`snap_observation`)."""
    if config.snap_observation == "question":
        return question_span
    if config.snap_window > question_tokens:
        msg = (
            f"snap_window={config.snap_window} is larger than the question ({question_tokens} tokens with its "
            "template); compression scores with the last snap_window question tokens: lower snap_window, "
            'ask a longer question, or use snap_observation="question"'
        )
        raise InputError(msg)
    return question_tokens - config.snap_window, question_tokens


class BatchCompressor:
    """Scores the chunks of one micro-batch during phase 2, then keeps each chunk's top-B tokens.

        comp = BatchCompressor.for_batch(config, prefix_len, encoded, question_len, question_span)
        nll = question_nll(..., observe=comp.observe if comp else None)
        encoded = comp.apply(encoded) if comp else encoded

    Row i of phase 2 attends to [prefix (P) ‖ chunk_i (L_i) ‖ question (q)].
    """

    def __init__(self, scorer: SnapKV, prefix_len: int, lengths: list[int], budgets: list[int]):
        self.scorer = scorer
        self.prefix_len, self.lengths, self.budgets = prefix_len, lengths, budgets
        self.rows = {i for i, (n, b) in enumerate(zip(lengths, budgets)) if b < n}
        self.scores: dict[int, dict[int, torch.Tensor]] = {i: {} for i in self.rows}  # row → layer → (1, H_kv, L_i)

    @classmethod
    def for_batch(
        cls, config, prefix_len: int, encoded: list[EncodedChunk], q: int, question_span: tuple[int, int]
    ) -> BatchCompressor | None:
        """None when compression is off or every chunk fits its budget (nothing to score).

        q: question tokens with their template; question_span: the question text's tokens among them.
        """
        if not config.compresses:
            return None
        rows = observation_rows(config, q, question_span)
        lengths = [e.length for e in encoded]
        budgets = [config.kv_budget_for(n) for n in lengths]
        comp = cls(SnapKV.from_config(config, rows), prefix_len, lengths, budgets)
        return comp if comp.rows else None

    def observe(self, row: int, layer: int, probs: torch.Tensor) -> None:
        """Phase 2's attention of `row` in `layer`, (H_kv, G, q, P + L + q) fp32: score its chunk."""
        if row in self.rows:
            first, end = self.scorer.rows
            self.scores[row][layer] = self.scorer.score(probs[None, :, :, first:end], self.prefix_len, self.lengths[row])

    def apply(self, encoded: list[EncodedChunk]) -> list[EncodedChunk]:
        out = []
        for i, enc in enumerate(encoded):
            if i in self.scores:
                layers = self.scores.pop(i)
                keep = [keep_topk(layers[layer], self.budgets[i]) for layer in range(len(enc.kv))]
                enc = EncodedChunk(enc.chunk, kvops.gather_tokens(enc.kv, keep), enc.last_logprobs)
            out.append(enc)
        return out
