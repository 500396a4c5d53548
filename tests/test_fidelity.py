"""Method fidelity (issue #12): chunk scores independent of whitespace, the question's own tokens
located in the suffix, the optional restated instruction, and no empty answers."""

from __future__ import annotations

import pytest
import torch

import parallelcomp.decode as decode
import parallelcomp.decode_kernel as decode_kernel
from parallelcomp import ParallelComp, ParallelCompConfig
from parallelcomp.decode import Sampling
from parallelcomp.prompts import build_continuation, build_prompt

from .test_smollm2 import GOLD, QUESTION, distractors

DOCS = [
    "Bananas are yellow and grow in bunches on tall plants. They ripen after picking.",
    "The capital of France is Paris, a city on the Seine.\n\nIt has many bridges.",
    "Rust is a systems programming language focused on safety and speed.",
    "Copper turns green over the years when it is left outside in the rain.",
]


def _scores(engine, docs, question="What is the capital of France?"):
    out = engine.generate(question, documents=docs, max_new_tokens=1)
    return [c.score for c in out.chunks], [c.index for c in out.chunks if c.kept]


@pytest.mark.parametrize("score_tokens", ["question", "suffix"])
def test_trailing_blank_lines_change_neither_scores_nor_ranking(make_engine, score_tokens):
    engine = make_engine("qwen2", chunk_tokens=24, keep_chunks=2, score_tokens=score_tokens)
    clean, kept = _scores(engine, DOCS)
    assert len(clean) == len(DOCS)
    for padded in ([d + "\n\n" for d in DOCS], [d + "\n" for d in DOCS], ["\n" + d + " \n\n" for d in DOCS[::-1]][::-1]):
        scores, padded_kept = _scores(engine, padded)
        assert scores == pytest.approx(clean, abs=0.05) and padded_kept == kept


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("restate", [False, True])
def test_question_span_holds_exactly_the_question_text(tokenizer, chat, restate):
    question = "Which river runs through Paris?"
    parts = build_prompt(tokenizer, "Answer briefly.", question, chat, restate_instruction=restate)
    first, end = parts.question_span
    assert tokenizer.decode(parts.question_ids[first:end]).strip() == question
    assert 0 < first and end < len(parts.question_ids)  # template on both sides
    suffix = tokenizer.decode(parts.question_ids)
    assert ("Answer briefly." in suffix) == restate  # restated between the documents and the question
    assert suffix.index("Question:") > (suffix.find("Answer briefly.") if restate else -1)
    assert parts.scored("suffix") == slice(0, len(parts.question_ids))
    assert parts.scored("question") == slice(first, end)
    target = build_continuation(tokenizer, "Paris is on the Seine.")
    assert target.question_span == (0, len(target.question_ids))


def test_restated_instruction_reaches_the_model(make_engine, tokenizer, monkeypatch):
    seen = []
    real = decode.forward

    def spy(model, ids, *args, **kwargs):
        seen.append(ids[0].tolist())
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(decode, "forward", spy)
    for restate in (False, True):
        # two kept chunks: the question step runs the whole suffix (with one it starts after the head)
        engine = make_engine("llama", keep_chunks=2, pack_documents=False, restate_instruction=restate)
        seen.clear()
        assert engine.generate("Where?", documents=DOCS[:2], max_new_tokens=1).stats.step_head_tokens == 0
        question_step = tokenizer.decode(seen[0])
        assert (engine.config.instruction in question_step) == restate
        assert question_step.index("Question: Where?") > (question_step.find(engine.config.instruction))


def test_eos_is_never_the_first_new_token(make_engine, monkeypatch):
    """The model wants EOS at every step: the answer is one token (the runner-up), not empty."""
    engine = make_engine("llama", keep_chunks=1)
    eos = min(engine.eos_ids)
    real = decode.forward

    whole = decode_kernel.DecodeStep.__call__

    def wants_eos(logits):
        logits = logits.clone()
        logits[:, -1, eos] = logits[:, -1].max() + 10.0
        return logits

    monkeypatch.setattr(decode, "forward", lambda *args, **kwargs: wants_eos(real(*args, **kwargs)))
    monkeypatch.setattr(decode_kernel.DecodeStep, "__call__", lambda *args: wants_eos(whole(*args)))
    for sampling in (dict(), dict(temperature=1.0, seed=3)):
        out = engine.generate("Where?", documents=DOCS[:1], max_new_tokens=5, **sampling)
        assert len(out.token_ids) == 1 and out.token_ids[0] not in engine.eos_ids
        assert out.stats.finish_reason == "stop"


def test_min_one_token_processor_only_masks_the_first_step():
    procs = Sampling().processors({2, 5}, prompt_tokens=3)
    scores = torch.zeros(1, 8)
    first = procs(torch.zeros(1, 3, dtype=torch.long), scores.clone())
    later = procs(torch.zeros(1, 4, dtype=torch.long), scores.clone())
    assert torch.isinf(first[0, [2, 5]]).all() and torch.isfinite(first[0, [0, 1, 3, 4, 6, 7]]).all()
    assert torch.isfinite(later).all()


@pytest.mark.slow
def test_smollm2_trailing_blank_lines_change_neither_scores_nor_ranking(smol_dir):
    engine = ParallelComp.from_pretrained(smol_dir, config=ParallelCompConfig(keep_chunks=1, chunk_tokens=400))
    docs = distractors(3, 300, engine.tokenizer)
    docs = [d.strip() for d in docs[:2]] + [GOLD] + [docs[2].strip()]
    clean, kept = _scores(engine, docs, QUESTION)
    assert kept == [1]  # the chunk holding the gold document
    for padded in ([d + "\n\n" for d in docs], [d + "\n\n" * (i % 2) for i, d in enumerate(docs)]):
        scores, padded_kept = _scores(engine, padded, QUESTION)
        assert scores == pytest.approx(clean, abs=0.05) and padded_kept == kept
