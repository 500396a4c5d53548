"""Optional lexical prior for chunk selection: BM25 of the question over the chunks' token ids.

The paper ranks chunks by the question's NLL alone (Eq. 3). With a small model that signal is
weak on open questions: SmolLM2-135M kept SQuAD's gold paragraph in 42 of 60 samples at 16K-32K,
and in 53 of 60 with this prior at λ = 2 (docs/lexical-prior.md). With
`ParallelCompConfig.lexical_weight` = λ > 0 the top-K ranks each chunk by

    NLL(question | chunk) − λ · BM25(question, chunk) / max over the corpus's chunks of BM25

so λ is in nats: the most on-topic chunk of the corpus gains λ against a chunk sharing no term
with the question. The match is computed over the whole call's chunks before phase 1 (IDF needs
every chunk), so the top-K stays online (eviction.TopK), and a distributed run ranks exactly as
one process (the driver computes it once for all workers).

Terms are the model's token ids: no word tokenizer, no language assumption, and the chunks'
ids are already there. With `lexical_fold_case` they are the ids of the case-folded text
(`FoldedTerms`), so that a word the tokenizer splits differently by case still matches. BM25 itself is rank_bm25's Okapi (the implementation LangChain's
BM25Retriever uses), with its defaults k1=1.5, b=0.75.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from typing import Hashable, Sequence

from rank_bm25 import BM25Okapi


def match(chunks: Sequence[Sequence[int]], query: Sequence[int]) -> list[float]:
    """Per chunk, BM25 of `query` over `chunks` (token ids) divided by the best chunk's, in [0, 1].
    All zeros when no chunk shares a term with the query. A negative BM25 (rank_bm25's IDF floor
    is negative when most terms are in most chunks, e.g. one or two chunks) counts as no match."""
    if not chunks or not query:
        return [0.0] * len(chunks)
    scores = BM25Okapi([list(c) for c in chunks]).get_scores(list(query)).clip(min=0.0)
    best = float(scores.max())
    return [float(s) / best if best > 0 else 0.0 for s in scores]


def rank(nll: float, matched: float, weight: float) -> float:
    """The score the top-K keeps the lowest of: `nll` less `weight` nats per unit of `matched`
    (a chunk's `match`)."""
    return nll - weight * matched


class FoldedTerms:
    """Token ids of the case-folded text of a token sequence (decode, `str.casefold`, encode),
    remembered by key (a chunk's store key) for the last `size` sequences: every question over a
    corpus reads the same chunks, and folding 128K tokens again costs ~0.4 s on a laptop CPU."""

    def __init__(self, tokenizer, size: int = 4096):
        self._tokenizer = tokenizer
        self._size = size
        self._seen: OrderedDict[Hashable, array] = OrderedDict()

    def __call__(self, ids: Sequence[int], key: Hashable | None = None) -> array:
        if key is not None and key in self._seen:
            self._seen.move_to_end(key)
            return self._seen[key]
        text = self._tokenizer.decode(list(ids)).casefold()
        terms = array("l", self._tokenizer(text, add_special_tokens=False)["input_ids"])
        if key is not None:
            self._seen[key] = terms
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
        return terms
