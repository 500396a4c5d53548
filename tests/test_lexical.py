"""The optional BM25 prior on chunk selection (lexical.py, `lexical_weight`): its match equals the
Okapi formula written out here over the chunks' token ids (or, with `lexical_fold_case`, over the
ids of their case-folded text), the top-K ranks by NLL − λ·match, the NLL scores themselves do not
move, and λ = 0 is the paper's ranking."""

from __future__ import annotations

import math

import pytest

from parallelcomp import ConfigError, ParallelComp, ParallelCompConfig
from parallelcomp import lexical

from .conftest import tiny_model
from .test_core import ids_of, text

QUESTION = "Where is the copper garden?"
# One document per chunk; the fourth holds the question's words.
DOCS = [text(300 + i, 24) for i in range(3)] + ["The copper garden is behind the old mill, " + text(303, 14)] + \
       [text(304, 26)]
BASE = dict(keep_chunks=1, chunk_tokens=40, prefill_batch_tokens=80)


def okapi(chunks: list[list[int]], query: list[int], k1: float = 1.5, b: float = 0.75, eps: float = 0.25) -> list[float]:
    """BM25 Okapi written out (Robertson & Zaragoza 2009, Eq. 3.3), with rank_bm25's floor: a term
    in more than half of the chunks (negative IDF) weighs `eps` × the vocabulary's mean IDF."""
    n, avg = len(chunks), sum(map(len, chunks)) / len(chunks)
    vocabulary = {t for c in chunks for t in c}
    idf = {t: math.log((n - sum(t in c for c in chunks) + 0.5) / (sum(t in c for c in chunks) + 0.5))
           for t in vocabulary}
    floor = eps * sum(idf.values()) / len(idf)
    idf = {t: v if v >= 0 else floor for t, v in idf.items()}
    return [sum(idf[t] * c.count(t) * (k1 + 1) / (c.count(t) + k1 * (1 - b + b * len(c) / avg))
                for t in set(query) if t in c) for c in chunks]


def test_match_is_okapi_over_token_ids_scaled_by_the_best_chunk():
    chunks = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 5], [1, 10, 10, 11, 12, 13, 5], [14, 15, 16], [17, 18, 19, 20]]
    query = [1, 10, 6, 5, 99]  # 5 is in 3 of 5 chunks (floored IDF); 99 occurs nowhere
    ref = okapi(chunks, query)
    assert lexical.match(chunks, query) == pytest.approx([s / max(ref) for s in ref], rel=1e-9)
    assert max(lexical.match(chunks, query)) == 1.0
    assert lexical.match(chunks, [99]) == [0.0] * 5  # no shared term: no prior at all
    assert lexical.match([], [1]) == [] and lexical.match(chunks, []) == [0.0] * 5
    assert lexical.match([[1, 2]], [1]) == [0.0]  # one chunk: every IDF is negative, nothing to prefer


def test_top_k_ranks_by_nll_minus_weighted_match(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    plain = ParallelComp(model, tokenizer, ParallelCompConfig(**BASE)).generate(QUESTION, documents=DOCS,
                                                                                max_new_tokens=6)
    assert [c.lexical for c in plain.chunks] == [0.0] * len(DOCS)  # λ = 0: the paper's ranking, nothing computed
    assert [c.kept for c in plain.chunks].index(True) != 3, "the NLL alone must not already keep the match"

    pc = ParallelComp(model, tokenizer, ParallelCompConfig(**BASE, lexical_weight=1.0))
    out = pc.generate(QUESTION, documents=DOCS, max_new_tokens=6)
    assert [c.score for c in out.chunks] == pytest.approx([c.score for c in plain.chunks], abs=1e-6)  # NLL untouched
    parts = pc.prompt_parts(QUESTION, True)
    query = parts.question_ids[parts.scored("question")]
    ref = okapi([list(pc.encode(DOCS).chunks[i].token_ids) for i in range(len(DOCS))], query)
    assert min(ref) < 0  # these short chunks share most words: the IDF floor is negative, read as no match
    ref = [max(s, 0.0) for s in ref]
    assert [c.lexical for c in out.chunks] == pytest.approx([s / max(ref) for s in ref], rel=1e-6)
    assert max(range(len(DOCS)), key=lambda i: out.chunks[i].lexical) == 3
    ranked = min(out.chunks, key=lambda c: (c.score - 1.0 * c.lexical, c.index))
    assert [c.index for c in out.kept_chunks] == [ranked.index] == [3]
    assert out.stats.n_kept == 1


# The question's "confederation" is two tokens (" confed", "eration"); the fourth document's
# "Confederation" is one (" Confederation"), so over the ids as they are they share no term.
FOLD_QUESTION = "when was the confederation?"
FOLD_DOCS = DOCS[:3] + ["In 1806 a Confederation formed, " + text(303, 14)] + DOCS[4:]


def test_folded_match_is_okapi_over_the_case_folded_text(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    outs = {fold: ParallelComp(model, tokenizer, ParallelCompConfig(**BASE, lexical_weight=100.0, lexical_fold_case=fold))
            .generate(FOLD_QUESTION, documents=FOLD_DOCS, max_new_tokens=2) for fold in (False, True)}
    assert ids_of(tokenizer, " confederation") != ids_of(tokenizer, " Confederation")
    assert max(range(len(FOLD_DOCS)), key=lambda i: outs[False].chunks[i].lexical) != 3  # the word is missed

    ref = [max(s, 0.0) for s in okapi([ids_of(tokenizer, d.casefold()) for d in FOLD_DOCS],
                                      ids_of(tokenizer, FOLD_QUESTION.casefold()))]
    assert [c.lexical for c in outs[True].chunks] == pytest.approx([s / max(ref) for s in ref], rel=1e-9)
    assert [c.index for c in outs[True].kept_chunks] == [3]  # λ = 100: the match decides
    assert [c.score for c in outs[True].chunks] == pytest.approx([c.score for c in outs[False].chunks], abs=1e-6)


def test_folded_terms_are_remembered_by_key_for_the_last_size_sequences(tokenizer):
    folded = lexical.FoldedTerms(tokenizer, size=2)
    ids = ids_of(tokenizer, "The Confederation")
    first = folded(ids, "a")
    assert list(first) == ids_of(tokenizer, "the confederation")
    assert folded([], "a") is first  # a key names its sequence: not folded again
    folded(ids, "b"), folded(ids, "c")  # "a" is the least recently used of three
    assert list(folded([], "a")) == [] and folded(ids) is not folded(ids)  # no key: nothing kept


def test_negative_lexical_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="lexical_weight"):
        ParallelCompConfig(lexical_weight=-1)
