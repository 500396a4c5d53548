"""Baseline inputs built with ParallelComp's own prompt wording (`parallelcomp.prompts`), so every
method sees the same template, instruction, documents joined by the same separator and question.

Each builder returns the token ids to feed and whether the gold text survived (None: n/a).
"""

from __future__ import annotations

import re

from parallelcomp.prompts import build_continuation, build_prompt
from rank_bm25 import BM25Okapi

from .scoring import spans_kept
from .tasks import Sample

PASSAGE_CHARS = 600  # topk: sentences are grouped into passages of about this many characters


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def middle_truncate(ids: list[int], budget: int) -> list[int]:
    """Keep the first and last halves of the budget (LongBench's truncation)."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def generation_input(method: str, tokenizer, sample: Sample, config, window: int,
                     max_new_tokens: int) -> tuple[list[int], bool | None]:
    """Prompt ids for `full`, `truncate` or `topk`, and whether all gold spans are in it."""
    parts = build_prompt(tokenizer, sample.instruction, sample.question, config.use_chat_template)
    sep = config.document_separator
    budget = window - len(parts.prefix_ids) - len(parts.question_ids) - max_new_tokens
    if method == "full":
        ctx, kept = _encode(tokenizer, sep.join(sample.texts())), True
    elif method == "truncate":
        ctx = middle_truncate(_encode(tokenizer, sep.join(sample.texts())), budget)
        fed = tokenizer.decode(ctx)
        kept = all(g in fed for g in sample.gold_texts())
    elif method == "topk":
        chosen = bm25_select(tokenizer, sample, budget, sep)
        ctx = _encode(tokenizer, sep.join(text for _, text in chosen))
        kept = spans_kept(sample.gold, [span for span, _ in chosen])
    else:
        raise ValueError(f"no baseline input for method {method!r}")
    return parts.prefix_ids + ctx + parts.question_ids, kept


def ppl_input(method: str, tokenizer, sample: Sample, window: int) -> tuple[list[int], list[int]]:
    """(context ids, target ids) for teacher-forced scoring, as `ParallelComp.score` lays them out."""
    parts = build_continuation(tokenizer, sample.target)
    ctx = _encode(tokenizer, sample.context)
    if method == "truncate":
        ctx = middle_truncate(ctx, window - len(parts.prefix_ids) - len(parts.question_ids))
    elif method != "full":
        raise ValueError(f"method {method!r} does not score perplexity")
    return parts.prefix_ids + ctx, parts.question_ids


def passages(sample: Sample) -> list[tuple[tuple[int, int, int], str]]:
    """Retrieval units with their (document, start, end) spans: sentences grouped per document."""
    out = []
    for d, text in enumerate(sample.texts()):
        start = 0
        for m in re.finditer(r"(?<=[.!?\n])\s+", text):
            if m.start() - start >= PASSAGE_CHARS:
                out.append(((d, start, m.start()), text[start:m.start()]))
                start = m.end()
        if start < len(text):
            out.append(((d, start, len(text)), text[start:]))
    return out


def bm25_select(tokenizer, sample: Sample, budget: int, sep: str):
    """The best BM25 passages for the question that fit in `budget` tokens, in document order."""
    units = passages(sample)
    bm25 = BM25Okapi([_words(text) for _, text in units])
    ranked = sorted(range(len(units)), key=bm25.get_scores(_words(sample.question)).__getitem__,
                    reverse=True)
    sep_tokens = len(_encode(tokenizer, sep))
    chosen, used = [], 0
    for i in ranked:
        cost = len(_encode(tokenizer, units[i][1])) + sep_tokens
        if used + cost <= budget:
            chosen.append(i)
            used += cost
    return [units[i] for i in sorted(chosen)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())
