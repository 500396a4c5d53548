"""Encode once, ask many: the corpus path and the chunk KV store (store.py, corpus.py) give the same
output as a cold run, token for token, and a damaged or foreign store file is never used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parallelcomp import Corpus, InputError, ParallelComp, ParallelCompConfig, store
from parallelcomp.config import PAPER_CALIBRATION_RULES
from parallelcomp.output import ReuseStats
from parallelcomp.prefill import Head

from .conftest import tiny_model
from .test_core import text

QUESTION = "Where is the copper garden?"
# Five documents of 25-40 tokens, chunk_tokens=40: one document per chunk, three micro-batches.
DOCS = [text(100 + i, n) for i, n in enumerate([30, 22, 35, 28, 25])]
BASE = dict(keep_chunks=2, chunk_tokens=40, prefill_batch_tokens=80)


def outputs_equal(a, b):
    assert a.token_ids == b.token_ids and a.text == b.text
    assert [(c.index, c.kept, c.n_tokens, c.kv_tokens, c.lexical) for c in a.chunks] == \
           [(c.index, c.kept, c.n_tokens, c.kv_tokens, c.lexical) for c in b.chunks]
    # a few fp32 ulps: on a GPU a question head run apart from its chunk's phase 2 picks other GEMM kernels
    assert [c.score for c in a.chunks] == pytest.approx([c.score for c in b.chunks], rel=1e-6, abs=1e-6)
    assert a.stats.p0 == b.stats.p0 and a.stats.kv_bytes == b.stats.kv_bytes


def engine(tokenizer, family="llama", model=None, **config):
    model = model if model is not None else tiny_model(family, len(tokenizer))
    return ParallelComp(model, tokenizer, ParallelCompConfig(**{**BASE, **config}))


@pytest.mark.parametrize("extra", [{}, {"kv_budget_ratio": 0.5}, {"calibration_rules": PAPER_CALIBRATION_RULES},
                                   {"lexical_weight": 1.0}, {"lexical_weight": 1.0, "lexical_fold_case": True}],
                         ids=["plain", "compression", "calibration", "lexical", "lexical-folded"])
def test_corpus_path_equals_documents_path(family, tokenizer, extra):
    cold = engine(tokenizer, family, **extra, kv_store_bytes=0)  # no store: every call encodes
    ref = cold.generate(QUESTION, documents=DOCS, max_new_tokens=10)
    assert ref.stats.encoded_chunks == 5 and ref.stats.reused_chunks == 0

    pc = engine(tokenizer, family, model=cold.model, **extra)
    corpus = pc.encode(DOCS)
    assert (corpus.n_documents, len(corpus.chunks), corpus.encoded_chunks) == (5, 5, 5)
    assert corpus.bytes_held > 0 and corpus.n_tokens == ref.stats.tokens_in
    for call in range(2):
        out = pc.generate(QUESTION, corpus=corpus, max_new_tokens=10)
        outputs_equal(out, ref)
        assert out.stats.reused_chunks == 5 and out.stats.encoded_chunks == 0
        assert out.stats.reused_tokens == corpus.n_tokens and out.stats.reuse_seconds_saved > 0
        assert out.stats.reused_prefix_tokens == call * len(corpus.prefix_ids)  # kept from the first call
    assert len(set(ref.token_ids)) > 1, "degenerate output makes this comparison weak"


def test_documents_path_hits_the_store_on_the_second_call_and_questions_do_not_rechunk(tokenizer):
    pc = engine(tokenizer)
    first = pc.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    again = pc.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(again, first)
    assert (first.stats.encoded_chunks, again.stats.reused_chunks, again.stats.encoded_chunks) == (5, 5, 0)
    longer = pc.generate("Which of the stones lie under the purple cloud, north of the window?", documents=DOCS,
                         max_new_tokens=30)
    assert longer.stats.reused_chunks == 5  # chunk boundaries never depend on the question
    # the documents were tokenized once: later calls found them in the engine's memo
    assert (first.stats.reused_documents, again.stats.reused_documents, longer.stats.reused_documents) == (0, 5, 5)
    assert first.stats.chunk_seconds > 0 and again.stats.chunk_seconds > 0
    corpus = pc.encode(DOCS)
    assert corpus.reused_documents == 5 and 0 < corpus.chunk_seconds < corpus.encode_seconds
    streamed = pc.stream(QUESTION, corpus=corpus, max_new_tokens=8)
    assert "".join(streamed) == first.text and streamed.output.token_ids == first.token_ids
    s = streamed.output.stats
    assert (s.chunk_seconds, s.reused_documents) == (0, 0)  # a corpus= call chunks nothing
    assert s.ttft_seconds == s.prefill_seconds + s.first_token_seconds
    assert s.to_dict()["ttft_seconds"] == s.ttft_seconds  # in --json and the wrappers' stats too
    assert repr(corpus) == (f"Corpus(5 documents, 5 chunks of <= 40 tokens, {corpus.n_tokens} tokens, 0 encoded and "
                            f"5 reused in {corpus.encode_seconds:.2f} s, {corpus.bytes_held / 2**20:.1f} MiB held)")


def test_a_chunk_encoded_alone_is_stored_as_a_cold_run_over_all_stores_it(family, tokenizer):
    """Phase 1 runs each chunk in its own forward, so a chunk's KV depends on the chunk alone: a
    store filled one document at a time holds, bit for bit, what a cold run over all of them
    stores (BASE's budget groups two chunks of different lengths per micro-batch). Before, the
    padded batch's length changed the rounding (bf16 SmolLM2: KV 0.09 apart), so a chunk
    recomputed after a store miss differed from its cold-run twin, and answers changed with what
    the store held."""
    from parallelcomp.kv import plain

    cold = engine(tokenizer, family)
    ref = cold.encode(DOCS)
    pc = engine(tokenizer, family, model=cold.model)
    for doc in reversed(DOCS):
        pc.encode([doc])
    assert pc.encode(DOCS).reused_chunks == len(ref.keys) == 5
    for key in ref.keys:
        a, b = cold.store._lru[key], pc.store._lru[key]
        assert torch.equal(a.last_logprobs, b.last_logprobs)
        for layer_a, layer_b in zip(a.kv, b.kv):
            assert all(torch.equal(x, y) for x, y in zip(plain(layer_a), plain(layer_b)))


def test_without_packing_documents_hit_the_store_in_any_order_and_company(tokenizer):
    """Packed (the default), documents that shared a chunk form other chunks in another order, and
    those miss. With pack_documents=False each document has chunks of its own, so the same
    documents hit in any order and beside others, and each has its own score."""
    packed = engine(tokenizer, chunk_tokens=80)
    assert [len(c.spans) for c in packed.encode(DOCS[:3]).chunks] == [2, 1]
    assert packed.encode([DOCS[2], DOCS[0], DOCS[1]]).encoded_chunks == 2
    pc = engine(tokenizer, model=packed.model, chunk_tokens=80, pack_documents=False)
    first = pc.encode(DOCS[:3])
    assert [[s.document for s in c.spans] for c in first.chunks] == [[0], [1], [2]]
    again = pc.encode([DOCS[2], DOCS[0], DOCS[4], DOCS[1]])
    assert (again.encoded_chunks, again.reused_chunks) == (1, 3)
    out = pc.generate(QUESTION, documents=[DOCS[1], DOCS[0]], max_new_tokens=4)
    assert out.stats.reused_chunks == 2 and [c.documents for c in out.chunks] == [(0,), (1,)]


def test_score_with_a_corpus_equals_score_with_documents(tokenizer):
    pc = engine(tokenizer)
    target = "The copper garden lies north of the river stone."
    ref = pc.score(target, documents=DOCS)
    corpus = pc.encode(DOCS)
    got = pc.score(target, corpus=corpus)
    assert got.token_nlls == pytest.approx(ref.token_nlls, abs=1e-6)
    assert [c.kept for c in got.chunks] == [c.kept for c in ref.chunks]


def test_a_chunk_shared_by_two_corpora_is_stored_once(tokenizer):
    pc = engine(tokenizer)
    a = pc.encode(DOCS[:3])
    b = pc.encode(DOCS[2:])
    assert (a.encoded_chunks, b.encoded_chunks, b.reused_chunks) == (3, 2, 1)
    assert a.keys[2] == b.keys[0]
    assert len(pc.store._lru) == 5


def test_a_document_repeated_in_one_micro_batch_is_encoded_once(tokenizer):
    pc = engine(tokenizer, kv_store_bytes=1)  # nothing stored: the repeat is served in the batch
    docs = [DOCS[0], DOCS[0], DOCS[1]]  # one micro-batch holds the first two chunks
    out = pc.generate(QUESTION, documents=docs, max_new_tokens=6)
    assert (out.stats.encoded_chunks, out.stats.reused_chunks) == (2, 1)
    assert out.stats.reused_tokens == out.chunks[1].n_tokens
    # reference: one chunk per micro-batch and no store, so the document is encoded twice
    ref = engine(tokenizer, model=pc.model, kv_store_bytes=1, prefill_batch_tokens=40)
    expected = ref.generate(QUESTION, documents=docs, max_new_tokens=6)
    assert (expected.stats.encoded_chunks, expected.stats.reused_chunks) == (3, 0)
    outputs_equal(out, expected)


def test_an_lru_budget_smaller_than_one_chunk_still_answers(tokenizer):
    pc = engine(tokenizer, kv_store_bytes=1)
    first = pc.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    second = pc.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(second, first)
    assert second.stats.reused_chunks == 0 and second.stats.store_bytes == 0


def test_the_memory_tier_defaults_to_a_third_of_the_memory_its_entries_live_in(tokenizer, monkeypatch):
    """RAM for a model on the CPU; the GPU's own memory (not the host's RAM) for one on CUDA."""
    import psutil

    from parallelcomp import guard

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 3 << 30}))
    assert guard.total_bytes(torch.device("cuda")) == 3 << 30
    assert guard.total_bytes(torch.device("cpu")) == psutil.virtual_memory().total
    pc = engine(tokenizer)
    assert pc.store.memory_bytes == guard.total_bytes(pc.model.device) // 3


def test_a_second_question_reuses_each_chunks_question_head_and_answers_as_a_cold_engine(family, tokenizer):
    """Phase 2 keeps each chunk's question head (the suffix before the question text) with the
    chunk; a later question runs from its own first token and answers as an engine without a store."""
    pc = engine(tokenizer, family, restate_instruction=True)
    first = pc.generate(QUESTION, documents=DOCS, max_new_tokens=2)
    head = first.stats.question_scored[0]
    assert first.stats.reused_head_tokens == 0 and head > 4
    out = pc.generate("Which stone is purple?", documents=DOCS, max_new_tokens=10)
    assert out.stats.question_scored[0] == head and out.stats.reused_head_tokens == 5 * head
    cold = engine(tokenizer, family, model=pc.model, restate_instruction=True, kv_store_bytes=0)
    ref = cold.generate("Which stone is purple?", documents=DOCS, max_new_tokens=10)
    assert ref.stats.reused_head_tokens == 0
    outputs_equal(out, ref)
    # compression observes the head's rows too: it runs them, and leaves the kept heads as they are
    squeezed = engine(tokenizer, family, model=pc.model, restate_instruction=True, kv_budget_ratio=0.5)
    for question in (QUESTION, "Which stone is purple?"):
        assert squeezed.generate(question, documents=DOCS, max_new_tokens=1).stats.reused_head_tokens == 0


@pytest.mark.parametrize("after", [True, False], ids=["history after documents", "history before documents"])
def test_every_turn_of_a_conversation_over_one_corpus_reuses_its_chunks_and_answers_as_a_cold_engine(
        family, tokenizer, after):
    """The documents open the chat's first user turn and the later turns follow them
    (prompts.documents_turn), so the chunks' prefix, and their keys, stay the same from turn to
    turn. With the history before the documents (history_after_documents=False; the only layout
    until 2026-12-06) every turn encodes them again."""
    pc = engine(tokenizer, family, history_after_documents=after)
    cold = engine(tokenizer, family, model=pc.model, kv_store_bytes=0, history_after_documents=after)
    history, ran = [{"role": "system", "content": "Answer from the documents."}], 0
    for turn, question in enumerate([QUESTION, "Which stone is purple?", QUESTION]):
        out = pc.generate(question, documents=DOCS, history=history, max_new_tokens=6)
        outputs_equal(out, cold.generate(question, documents=DOCS, history=history, max_new_tokens=6))
        assert (out.stats.reused_chunks, out.stats.encoded_chunks) == ((5, 0) if turn and after else (0, 5))
        # from the 2nd turn on each chunk carries all the last turn's phase 2 ran, up to its question's
        # last token (this turn's suffix begins with the last one's: prompts.build_prompt, store.head)
        assert out.stats.reused_head_tokens == (5 * (ran - 1) if turn and after else 0)
        ran = out.stats.question_scored[1]
        # and each turn's head replaces the last turn's, which it begins with (store.keep_head)
        assert [len(entry.heads) for entry in pc.store._lru.values()] == [1] * (5 if after else 5 * (turn + 1))
        if not turn:
            suffix = out.stats.question_tokens
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": out.text or "?"}]
    assert (out.stats.question_tokens > suffix) == after  # the first question again: its turns follow the chunks
    if after:  # a corpus encoded behind the conversation's system message serves every turn
        corpus = pc.encode(DOCS, history=history[:1])
        out = pc.generate(QUESTION, corpus=corpus, history=history, max_new_tokens=6)
        assert (out.stats.encoded_chunks, corpus.encoded_chunks) == (0, 0)  # all in the store already
        fresh = engine(tokenizer, family, model=pc.model)
        corpus = fresh.encode(DOCS, history=history[:1])
        outputs_equal(fresh.generate(QUESTION, corpus=corpus, history=history, max_new_tokens=6), out)
        other = engine(tokenizer, family, model=pc.model)  # a corpus without the system message
        assert other.generate(QUESTION, corpus=other.encode(DOCS), history=history,
                              max_new_tokens=6).stats.encoded_chunks == 5  # another prefix: encoded again


def test_a_call_that_needs_more_than_the_reserve_gets_shorter_chunks_instead_of_untrained_positions(tokenizer):
    """engine._chunk: the tiny models' 1,024-token window leaves a reserve of 128 tokens after
    full chunks. An ordinary question fits it; a conversation whose turns follow the documents
    needs more, and its chunks are cut so that the turns and the answer still end inside the
    window, as a cold engine with `reserve_tokens=256` chunks them. A corpus from `encode` is cut
    the same way, and so are the chunks before a long target of `score`; a fixed `chunk_tokens`
    is not, and warns; documents that leave room after their chunks are not cut at all."""
    pc = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=2))
    context = text(7, 1500)  # one long document: every chunk but the last fills its budget
    out = pc.generate(QUESTION, context=context, max_new_tokens=6)
    assert out.stats.chunk_tokens == pc.window - out.stats.prefix_tokens - 128
    assert out.stats.n_chunks > 1 and not out.stats.exceeds_window
    history = [{"role": "system", "content": "Answer from the documents."}, {"role": "user", "content": QUESTION},
               {"role": "assistant", "content": text(8, 120)}]
    asked = dict(history=history, max_new_tokens=6)
    least = pc.window - len(pc.prompt_parts(QUESTION, True, history).prefix_ids) - 128  # behind the system message
    wide = ParallelComp(pc.model, tokenizer, ParallelCompConfig(keep_chunks=2, reserve_tokens=256, kv_store_bytes=0))
    for call in range(2):  # the second call finds its shorter chunks in the store
        out = pc.generate("Which stone is purple?", context=context, **asked)
        assert 128 < out.stats.question_tokens + 6 <= 256
        assert out.stats.chunk_tokens == least - 128 and not out.stats.exceeds_window
        assert out.stats.p0 + out.stats.question_tokens + 6 <= pc.window
        assert (out.stats.encoded_chunks, out.stats.reused_chunks) == ((out.stats.n_chunks, 0) if call == 0
                                                                       else (0, out.stats.n_chunks))
    outputs_equal(out, wide.generate("Which stone is purple?", context=context, **asked))
    corpus = pc.encode(context=context, history=history[:1])
    assert corpus.chunk_tokens == least
    over_corpus = pc.generate("Which stone is purple?", corpus=corpus, **asked)
    outputs_equal(over_corpus, out)
    assert (over_corpus.stats.chunk_tokens, over_corpus.stats.encoded_chunks) == (least - 128, 0)
    scored = pc.score(text(11, 150), context=context)  # a target of over 128 tokens after the chunks: cut for it
    assert scored.stats.chunk_tokens == pc.window - scored.stats.prefix_tokens - 256
    fixed = ParallelComp(pc.model, tokenizer, ParallelCompConfig(keep_chunks=2, chunk_tokens=least))
    with pytest.warns(UserWarning, match="untrained positions"):  # chunks kept as they are, at that price
        kept = fixed.generate("Which stone is purple?", context=context, **asked)
    assert kept.stats.exceeds_window and kept.stats.chunk_tokens == least
    short = [text(9, 150), text(10, 150)]  # one chunk of ~300 tokens: room for the turns after it
    roomy = pc.generate("Which stone is purple?", documents=short, **asked)
    assert roomy.stats.chunk_tokens == least and roomy.stats.n_chunks == 1 and not roomy.stats.exceeds_window


def test_the_question_step_after_the_kept_chunks_head_equals_running_the_whole_suffix(family, tokenizer,
                                                                                     monkeypatch):
    """With one kept chunk the question step attends to what that chunk's phase 2 attended to, at
    the same positions, so it starts after the question tokens phase 2 ran (a conversation's
    earlier turns and the question up to its last token): the answer is the one the whole suffix
    gives, token for token, and the step runs only the question's last token and the template
    after it."""
    from dataclasses import replace

    history = [{"role": "system", "content": "Answer from the documents."}, {"role": "user", "content": QUESTION},
               {"role": "assistant", "content": text(12, 40)}]
    pc = engine(tokenizer, family, keep_chunks=1)
    ask = dict(documents=DOCS, history=history, max_new_tokens=10)
    out = pc.generate("Which stone is purple?", **ask)
    first, end = out.stats.question_scored
    assert out.stats.step_head_tokens == end - 1 and first > 40 and end - first > 1
    real = ParallelComp.score_chunks
    monkeypatch.setattr(ParallelComp, "score_chunks", lambda self, *a, **kw: replace(real(self, *a, **kw), head=None))
    whole = engine(tokenizer, family, model=pc.model, keep_chunks=1).generate("Which stone is purple?", **ask)
    assert whole.stats.step_head_tokens == 0 and len(whole.token_ids) == 10
    outputs_equal(out, whole)
    three = engine(tokenizer, family, model=pc.model, keep_chunks=3).generate("Which stone is purple?", **ask)
    assert three.stats.step_head_tokens == 0  # several kept chunks: the question attends to them all


def test_a_head_replaces_those_it_begins_with_up_to_their_question_and_another_templates_stays():
    """store.keep_head takes the question tokens phase 2 ran, with the log-probabilities after the
    template's head (where the question starts). A held head whose ids up to its question the new
    one begins with (the last question with that template, a conversation's last turn, which the
    next turn's suffix repeats) is replaced; one that parts from it sooner (another template's)
    stays. store.head serves a question head whole, with the log-probabilities after it, from a
    held head that begins with it and knows them; else the longest start it shares, short of its
    last id."""
    def head(ids, at):
        return Head([(torch.zeros(1, 1, len(ids), 2),) * 2], {at: torch.full((3,), float(at))})
    chunks, report = store.ChunkStore(1 << 20), ReuseStats()
    chunks.put("c", store.Entry([(torch.zeros(1, 1, 4, 2),) * 2], torch.zeros(3), 0.0), {}, [], [], report)
    first = (7, 8, 3, 3)  # the template's head (7, 8), then the question up to its last token
    restated = (7, 5, 6, 8, 3, 3)  # another template's head (7, 5, 6, 8), the same question
    second = (7, 8, 4, 4, 4)  # the first template again, another question
    turn2 = (7, 8, 4, 4, 4, 9, 1, 2, 2, 1, 0, 5)  # a conversation on: that question, its answer, the next
    for ids, at in ((first, 2), (restated, 4)):
        chunks.keep_head("c", list(ids), head(ids, at), report)
    entry = chunks._lru["c"]
    assert list(entry.heads) == [first, restated]
    chunks.keep_head("c", list(second), head(second, 2), report)
    assert list(entry.heads) == [restated, second]  # `first` parted from it only after (7, 8)
    chunks.keep_head("c", list(turn2), head(turn2, 11), report)
    assert list(entry.heads) == [restated, turn2] and chunks.bytes_held == entry.nbytes
    whole = chunks.head("c", [7, 5, 6, 8])  # the other template's head, asked with a new question
    assert whole.length == 4 and whole.last_logprobs.tolist() == [4.0] * 3
    again = chunks.head("c", list(turn2[:11]))  # turn 2's head: whole, with the first question token's
    assert again.length == 11 and again.last_logprobs.tolist() == [11.0] * 3
    turn3 = chunks.head("c", list(turn2 + (6, 1, 2, 2, 1, 0)))  # the next turn runs from turn 2's last token
    assert turn3.length == 12 and turn3.last_logprobs is None
    label = chunks.head("c", [7, 8])  # held only inside turn 2, without the log-probabilities after it
    assert label.length == 1 and label.last_logprobs is None


def test_the_lru_evicts_least_recently_used_chunks_within_its_budget(tokenizer):
    probe = engine(tokenizer)
    keys = probe.encode(DOCS).keys
    plain = max(probe.store.bytes_of(k) for k in keys)  # a chunk's KV and the log-probabilities after it
    probe.generate(QUESTION, documents=DOCS, max_new_tokens=1)
    one_chunk = max(probe.store.bytes_of(k) for k in keys)  # and the question tokens phase 2 kept with it
    pc = engine(tokenizer, model=probe.model, kv_store_bytes=int(2.5 * one_chunk))
    out = pc.generate(QUESTION, documents=DOCS, max_new_tokens=4)
    assert out.stats.store_evicted == 3 and out.stats.store_bytes <= 2.5 * one_chunk
    again = pc.generate(QUESTION, documents=DOCS, max_new_tokens=4)
    assert again.stats.reused_chunks < 5
    outputs_equal(again, out)
    small = engine(tokenizer, model=probe.model, kv_store_bytes=int(2.5 * plain))
    corpus = small.encode(DOCS)  # encode reports what its own filling evicted
    assert corpus.encoded_chunks == 5 and 0 < corpus.encoding.store_evicted == 5 - len(small.store._lru)


def files(root: Path) -> list[Path]:
    """The chunk KV files of a disk tier."""
    return sorted(root.glob("v1/*/*/*.safetensors"))


def document_files(root: Path) -> list[Path]:
    """The documents' chunking files of a disk tier."""
    return sorted(root.glob("documents/*/*/*.safetensors"))


def test_disk_tier_serves_a_fresh_engine_and_misses_for_another_model_dtype_template_chunk_size_or_kernel(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    ref = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    assert len(files(tmp_path)) == 5
    fresh = engine(tokenizer, model=model, kv_store_dir=str(tmp_path))  # empty memory tier
    out = fresh.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    assert (out.stats.reused_chunks, out.stats.store_disk_hits, out.stats.store_rejected) == (5, 5, {})

    variants = {
        "model": engine(tokenizer, model=tiny_model("llama", len(tokenizer), seed=1), kv_store_dir=str(tmp_path)),
        "dtype": engine(tokenizer, model=tiny_model("llama", len(tokenizer)).to(torch.bfloat16),
                        kv_store_dir=str(tmp_path)),
        "template": engine(tokenizer, model=model, kv_store_dir=str(tmp_path), instruction="Answer tersely."),
        "chunk size": engine(tokenizer, model=model, kv_store_dir=str(tmp_path), chunk_tokens=72),
        "attention kernel": engine(tokenizer, model=model, kv_store_dir=str(tmp_path), attention_kernel="matmul"),
    }
    for name, pc in variants.items():
        out = pc.generate(QUESTION, documents=DOCS, max_new_tokens=2)
        # Content addressing: with 72-token chunks, a chunk that still holds exactly one whole
        # document has the same tokens as before and hits; the packed ones miss.
        same = sum(len(c.spans) == 1 and c.spans[0].complete for c in out.chunks) if name == "chunk size" else 0
        assert out.stats.reused_chunks == same and out.stats.store_rejected == {}, name
        assert out.stats.n_chunks > same, name


def test_a_disk_tier_entry_is_verified_then_moved_to_the_model_device(tokenizer, tmp_path):
    """Files hold CPU tensors; a hit is moved to the device the caller names (a GPU model's: the
    first CUDA run found disk-tier KV left on the CPU). The meta device stands in for a GPU."""
    from parallelcomp import kv as kvops
    from parallelcomp.output import ReuseStats

    pc = engine(tokenizer, kv_store_dir=str(tmp_path))
    corpus = pc.encode(DOCS)
    pc.store.clear()  # the memory tier forgets; the files stay
    chunk, key = corpus.chunks[0], corpus.keys[0]
    report = ReuseStats()
    entry = pc.store.get(key, pc._model_identity()[0], list(corpus.prefix_ids), chunk.token_ids, report,
                         kvops.layout(pc.model), device="meta")
    assert report.store_disk_hits == 1 and report.store_rejected == {}
    assert {t.device.type for layer in entry.kv for t in layer} == {"meta"}
    assert entry.last_logprobs.device.type == "meta"


def test_the_key_does_not_depend_on_where_the_model_lives(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    keys = []
    for place in ("a", "b/c"):
        model.save_pretrained(tmp_path / place)
        tokenizer.save_pretrained(tmp_path / place)
        keys.append(ParallelComp.from_pretrained(tmp_path / place, ParallelCompConfig(**BASE), dtype="float32")
                    .encode(DOCS).keys)
    assert keys[0] == keys[1]


def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    path.write_bytes(bytes(data))


def _rewrite(path: Path, **meta_changes) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**meta, **meta_changes})


def _as_format_1(path: Path) -> None:
    """The file as format /1 wrote it: the same key, identity and tensors, a SHA-256 checksum."""
    import hashlib

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    del meta["xxh3_128"]
    save_file(tensors, str(path), metadata={**meta, "format": "pc-chunk-kv/1", "sha256": digest.hexdigest()})


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    (lambda p: _flip(p, 0.6), "checksum"),  # bits flipped inside the KV payload
    (lambda p: _rewrite(p, format="pc-chunk-kv/0"), "format"),
    (lambda p: _as_format_1(p), "format"),  # written before the checksum became XXH3-128
    (lambda p: _rewrite(p, format="pc-chunk-kv/2"), "format"),  # KV from a padded batch of chunks
    (lambda p: _rewrite(p, identity=json.dumps({"model": "another"})), "identity"),
])
def test_a_damaged_foreign_or_old_file_is_dropped_recomputed_and_reported(tokenizer, tmp_path, damage, reason):
    model = tiny_model("llama", len(tokenizer))
    ref = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    victim = files(tmp_path)[0]
    damage(victim)
    out = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    assert out.stats.store_rejected == {reason: 1}
    assert (out.stats.store_disk_hits, out.stats.encoded_chunks) == (4, 1)
    assert victim.exists()  # rewritten from the recomputed KV
    again = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS,
                                                                                 max_new_tokens=8)
    assert again.stats.store_rejected == {} and again.stats.store_disk_hits == 5


# A full disk as Python's own writes report it, and as safetensors' writer reported it in a
# benchmark that filled this machine's disk (2026-12-02): its own exception type, not an OSError.
DISK_FULL = [OSError(28, "No space left on device"),
             SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")]


@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "SafetensorError"])
def test_a_full_disk_or_unwritable_directory_warns_and_still_answers(tokenizer, tmp_path, monkeypatch, error):
    model = tiny_model("llama", len(tokenizer))
    ref = engine(tokenizer, model=model, kv_store_bytes=0).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.warns(UserWarning, match="cannot write"):
        out = engine(tokenizer, model=model, kv_store_dir=str(blocker / "store")).generate(
            QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    assert out.stats.store_write_errors == 10  # five chunks, five documents' chunking

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a write cut short leaves behind
        raise error

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.warns(UserWarning, match="No space left on device"):
        out = engine(tokenizer, model=model, kv_store_dir=str(tmp_path / "store")).generate(
            QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    assert out.stats.store_write_errors == 10 and files(tmp_path / "store") == []
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []  # no partial file left


@pytest.mark.parametrize("budget", ["explicit", "default"])
def test_disk_budget_deletes_least_recently_used_files(tokenizer, tmp_path, monkeypatch, budget):
    """A budget of three files' bytes, given, or by default half of a file system with room for six."""
    probe = engine(tokenizer, kv_store_dir=str(tmp_path / "probe"))
    ref = probe.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    size = max(p.stat().st_size for p in files(tmp_path / "probe"))
    if budget == "explicit":
        pc = engine(tokenizer, model=probe.model, kv_store_dir=str(tmp_path / "s"), kv_store_disk_bytes=3 * size)
    else:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=6 * size))
        pc = engine(tokenizer, model=probe.model, kv_store_dir=str(tmp_path / "s"))
    assert pc.store.disk_bytes == 3 * size
    out = pc.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    kept, documents = files(tmp_path / "s"), document_files(tmp_path / "s")
    assert sum(p.stat().st_size for p in kept + documents) <= 3 * size and 1 <= len(kept) < 5
    assert len(documents) == 5  # written after the chunks, so the newest: deleted last
    assert out.stats.store_disk_evicted == 5 - len(kept)  # every deletion is reported


def test_files_the_disk_tier_cannot_delete_or_read_leave_the_answer_alone(tokenizer, tmp_path, monkeypatch):
    """Another user's files (unlink refused) stay and count; a directory where a file belongs is
    no file: that chunk is recomputed and the write warns; encode reports the disk budget's
    deletions."""
    probe = engine(tokenizer, kv_store_dir=str(tmp_path / "probe"))
    ref = probe.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    size = max(p.stat().st_size for p in files(tmp_path / "probe"))
    small = engine(tokenizer, model=probe.model, kv_store_dir=str(tmp_path / "enc"), kv_store_bytes=0,
                   kv_store_disk_bytes=2 * size)
    assert small.encode(DOCS).encoding.store_disk_evicted > 0
    real = Path.unlink

    def refused(path, missing_ok=False):
        if path.suffix == ".safetensors":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    pc = engine(tokenizer, model=probe.model, kv_store_dir=str(tmp_path / "s"), kv_store_disk_bytes=2 * size)
    out = pc.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    assert out.stats.store_disk_evicted == 0 and len(files(tmp_path / "s")) == 5  # none could be deleted
    monkeypatch.undo()
    first = files(tmp_path / "probe")[0]
    first.unlink()
    first.mkdir()  # a directory in the file's place
    with pytest.warns(UserWarning, match="cannot write"):
        again = engine(tokenizer, model=probe.model, kv_store_dir=str(tmp_path / "probe")).generate(
            QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(again, ref)
    assert again.stats.encoded_chunks == 1 and again.stats.store_write_errors == 1


@pytest.mark.parametrize("rescan_writes,scans", [(64, 1), (2, 5)])
def test_the_disk_tier_is_scanned_when_its_total_passes_the_budget_or_every_few_writes(
        tokenizer, tmp_path, monkeypatch, rescan_writes, scans):
    """Ten files (five chunks, five documents' chunking) written under a budget they stay below:
    one scan of the directory (the first write), not one per write; with a rescan every 2 writes
    (other processes' files), five."""
    import parallelcomp.store as store_module

    calls = []
    real = store_module._stored_files
    monkeypatch.setattr(store_module, "_stored_files", lambda root: calls.append(root) or real(root))
    monkeypatch.setattr(store_module, "RESCAN_WRITES", rescan_writes)
    pc = engine(tokenizer, kv_store_dir=str(tmp_path / "s"), kv_store_disk_bytes=10**12)
    out = pc.generate(QUESTION, documents=DOCS, max_new_tokens=2)
    assert len(files(tmp_path / "s")) == 5 and out.stats.store_disk_evicted == 0
    assert len(calls) == scans
    assert pc.store._disk_held == sum(p.stat().st_size for p in files(tmp_path / "s") + document_files(tmp_path / "s"))


@pytest.mark.parametrize("memory", ["held", "none", "two chunks"])
def test_the_disk_tier_is_written_after_the_last_token_unless_the_memory_tier_cannot_hold_a_chunk(
        tokenizer, tmp_path, memory):
    """Held chunks reach the disk only once the answer is complete (none when the first token
    arrives, all five after the last), and their writing is timed; a chunk the memory tier does
    not hold (no memory tier) or drops (a budget of two chunks) is written before it goes."""
    probe = engine(tokenizer)
    ref = probe.generate(QUESTION, documents=DOCS, max_new_tokens=8)
    one_chunk = max(probe.store.bytes_of(k) for k in probe.encode(DOCS).keys)
    budget = {"held": {}, "none": {"kv_store_bytes": 0}, "two chunks": {"kv_store_bytes": int(2.5 * one_chunk)}}
    pc = engine(tokenizer, model=probe.model, kv_store_dir=str(tmp_path), **budget[memory])
    stream = pc.stream(QUESTION, documents=DOCS, max_new_tokens=8)
    first = next(iter(stream))
    on_disk = {"held": 0, "none": 5, "two chunks": 5 - len(pc.store._lru)}[memory]
    assert len(files(tmp_path)) == on_disk and (memory != "two chunks" or 0 < on_disk < 5)
    text = first + "".join(stream)
    assert text == ref.text and len(files(tmp_path)) == 5
    assert stream.output.stats.store_write_seconds > 0 and stream.output.stats.store_write_errors == 0
    fresh = engine(tokenizer, model=probe.model, kv_store_dir=str(tmp_path), kv_store_bytes=0)
    outputs_equal(fresh.generate(QUESTION, documents=DOCS, max_new_tokens=8), ref)


def test_temporary_files_a_killed_writer_left_are_deleted_and_reported(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).encode(DOCS[:2])
    folder = files(tmp_path)[0].parent
    abandoned, live = folder / ".abc.123.dead.tmp", folder / ".abc.456.live.tmp"  # _write's naming
    for path in (abandoned, live):
        path.write_bytes(b"partial")
    old = time.time() - store.ABANDONED_WRITE_SECONDS - 60
    os.utime(abandoned, (old, old))
    out = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    assert out.stats.store_rejected == {"abandoned write": 1} and out.stats.store_disk_hits > 0
    assert not abandoned.exists() and live.exists()


def test_chunks_a_closed_stream_left_unwritten_go_to_disk_with_the_next_call_encode_or_clear(tokenizer, tmp_path):
    pc = engine(tokenizer, kv_store_dir=str(tmp_path / "a"))
    stream = pc.stream(QUESTION, documents=DOCS, max_new_tokens=8)
    next(iter(stream))
    stream.close()
    assert files(tmp_path / "a") == []
    out = pc.generate(QUESTION, documents=DOCS[:2], max_new_tokens=2)  # every chunk a memory hit
    assert out.stats.encoded_chunks == 0 and len(files(tmp_path / "a")) == 5 and out.stats.store_write_seconds > 0

    pc = engine(tokenizer, model=pc.model, kv_store_dir=str(tmp_path / "b"))
    assert pc.encode(DOCS).encoded_chunks == 5 and len(files(tmp_path / "b")) == 5

    pc = engine(tokenizer, model=pc.model, kv_store_dir=str(tmp_path / "c"))
    stream = pc.stream(QUESTION, documents=DOCS, max_new_tokens=8)
    next(iter(stream))
    stream.close()
    pc.store.clear()
    assert len(files(tmp_path / "c")) == 5


_FILL = """
import sys, torch
sys.path[:0] = [{core!r}, {repo!r}]
from transformers import AutoTokenizer
from parallelcomp import ParallelComp, ParallelCompConfig
from tests.conftest import tiny_model
from tests.test_store import BASE, DOCS
tok = AutoTokenizer.from_pretrained({tok!r})
pc = ParallelComp(tiny_model("llama", len(tok)), tok, ParallelCompConfig(**BASE, kv_store_dir={store!r}))
print(pc.encode(DOCS).encoded_chunks)
"""


def test_two_processes_filling_one_directory_at_once(tokenizer, tmp_path, smol_dir):
    repo = Path(__file__).resolve().parent.parent
    script = _FILL.format(core=str(repo / "core"), repo=str(repo), tok=str(smol_dir), store=str(tmp_path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert len(files(tmp_path)) == 5 and not list(tmp_path.rglob("*.tmp"))
    model = tiny_model("llama", len(tokenizer))
    ref = engine(tokenizer, model=model, kv_store_bytes=0).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    out = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    assert out.stats.store_disk_hits == 5 and out.stats.store_rejected == {}


def test_bad_corpus_arguments_are_typed_errors(tokenizer):
    pc = engine(tokenizer)
    corpus = pc.encode(DOCS[:2])
    with pytest.raises(InputError, match="not both"):
        pc.generate(QUESTION, documents=DOCS, corpus=corpus)
    with pytest.raises(InputError, match="another model"):
        engine(tokenizer, model=tiny_model("llama", len(tokenizer), seed=3)).generate(QUESTION, corpus=corpus)
    with pytest.raises(InputError, match="corpus is empty"):
        pc.generate(QUESTION, corpus=Corpus(corpus.identity, corpus.prefix_ids, (), (), 0, 40))
    with pytest.raises(InputError, match="must be a Corpus"):
        pc.generate(QUESTION, corpus=DOCS)
    with pytest.raises(InputError, match="documents is empty"):
        pc.encode([])
    with pytest.raises(InputError, match="not both"):
        pc.encode(DOCS, context="one text")
    # a setting of generate given to encode or score: named, instead of Python's TypeError
    with pytest.raises(InputError, match=r"encode\(\) has no argument max_new_tokens; .*answer settings go to generate"):
        pc.encode(DOCS, max_new_tokens=8)
    with pytest.raises(InputError, match=r"score\(\) has no argument max_new_tokens, temperature; it decodes nothing"):
        pc.score("two words", corpus=corpus, max_new_tokens=8, temperature=0)


def test_a_corpus_encoded_from_one_context_equals_that_context(tokenizer):
    pc = engine(tokenizer)
    text = " ".join(DOCS)
    ref = pc.generate(QUESTION, context=text, max_new_tokens=8)
    got = pc.generate(QUESTION, corpus=pc.encode(context=text), max_new_tokens=8)
    outputs_equal(got, ref)
    assert got.stats.reused_chunks == got.stats.n_chunks > 1


def test_wrappers_hit_the_store_with_no_api_change(tokenizer):
    """A retriever returning the same documents again: LangChain's LLM and LlamaIndex's
    synthesizer reuse every chunk's KV, and the documents' chunking, without knowing the store
    exists."""
    from langchain_core.messages import AIMessage, HumanMessage
    from llama_index.core.schema import NodeWithScore, TextNode

    from pc_integrations.langchain import ChatParallelComp, ParallelCompLLM
    from pc_integrations.llama_index import ParallelCompSynthesizer

    pc = engine(tokenizer)
    llm = ParallelCompLLM(engine=pc, max_new_tokens=6)
    first = llm.generate([QUESTION], documents=DOCS).generations[0][0]
    second = llm.generate([QUESTION], documents=DOCS).generations[0][0]
    assert second.text == first.text
    assert (first.generation_info["stats"]["encoded_chunks"], second.generation_info["stats"]["reused_chunks"]) == (5, 5)
    assert second.generation_info["stats"]["reused_documents"] == 5

    synth = ParallelCompSynthesizer(pc, max_new_tokens=6)
    nodes = [NodeWithScore(node=TextNode(text=d), score=1.0) for d in DOCS]
    response = synth.synthesize(QUESTION, nodes)
    assert response.metadata["parallelcomp"]["stats"]["reused_chunks"] == 5
    assert response.metadata["parallelcomp"]["stats"]["reused_documents"] == 5

    chat = ChatParallelComp(engine=pc, max_new_tokens=6)  # a conversation: every turn hits
    messages = [HumanMessage(QUESTION)]
    for question in ("Which stone is purple?", "And the cloud?"):
        answer = chat.invoke(messages, documents=DOCS)
        assert answer.response_metadata["stats"]["reused_chunks"] == 5
        messages = [*messages, AIMessage(answer.content or "?"), HumanMessage(question)]


def _tokenized_documents(monkeypatch, tokenizer, docs: list[str]) -> list[str]:
    """From now on, the texts of `docs` (or of their pieces) that the tokenizer is called on."""
    calls: list[str] = []
    real = type(tokenizer).__call__

    def call(self, text, **kwargs):
        if isinstance(text, str) and len(text) > 20 and any(text in d for d in docs):
            calls.append(text)
        return real(self, text, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", call)
    return calls


def test_a_fresh_engine_reads_the_documents_chunking_from_the_disk_tier_and_tokenizes_none(
        tokenizer, tmp_path, monkeypatch):
    docs = DOCS + [text(200, 120)]  # the last one is cut into pieces
    model = tiny_model("llama", len(tokenizer))
    ref = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=docs, max_new_tokens=8)
    assert ref.stats.split_documents == [5] and len(document_files(tmp_path)) == 6
    assert (ref.stats.reused_documents, ref.stats.store_disk_documents) == (0, 0)
    tokenized = _tokenized_documents(monkeypatch, tokenizer, docs)
    out = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=docs, max_new_tokens=8)
    outputs_equal(out, ref)
    assert [c.spans for c in out.chunks] == [c.spans for c in ref.chunks]
    assert (out.stats.reused_documents, out.stats.store_disk_documents, out.stats.store_rejected) == (6, 6, {})
    assert tokenized == []
    engine(tokenizer, model=model).generate(QUESTION, documents=docs, max_new_tokens=1)  # no disk tier
    assert len(tokenized) > 6  # each document, and the long one's pieces again


def test_documents_chunking_is_keyed_by_tokenizer_and_chunk_budget(tokenizer, tmp_path):
    import copy

    from parallelcomp.output import ReuseStats
    from parallelcomp.store import tokenizer_identity

    model = tiny_model("llama", len(tokenizer))
    engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=1)
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["copper-garden"])
    ids = tokenizer_identity(tokenizer), tokenizer_identity(other)
    assert ids[0] != ids[1] and tokenizer_identity(copy.deepcopy(tokenizer)) == ids[0]
    pc = engine(tokenizer, model=model, kv_store_dir=str(tmp_path))
    report = ReuseStats()
    budget = pc.encode(DOCS).chunk_tokens
    assert pc.store.pieces(ids[0], DOCS[0], budget, report) is not None
    assert pc.store.pieces(ids[1], DOCS[0], budget, report) is None
    assert pc.store.pieces(ids[0], DOCS[0], budget + 1, report) is None and report.store_rejected == {}
    out = engine(tokenizer, model=model, kv_store_dir=str(tmp_path), chunk_tokens=72).generate(
        QUESTION, documents=DOCS, max_new_tokens=1)
    assert out.stats.store_disk_documents == 0


def test_a_call_chunked_again_for_its_turns_reports_the_documents_file_its_first_try_rejected(tokenizer, tmp_path):
    """engine._chunk tries the least reserve first, reading that budget's documents file, then
    chunks again for the conversation's turns: the file the first try dropped is still reported."""
    model = tiny_model("llama", len(tokenizer))
    config = ParallelCompConfig(keep_chunks=2, kv_store_dir=str(tmp_path))
    context = text(7, 1500)
    ParallelComp(model, tokenizer, config).generate(QUESTION, context=context, max_new_tokens=6)
    (path,) = document_files(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": text(8, 120)}]
    pc = ParallelComp(model, tokenizer, config)
    out = pc.generate("Which stone is purple?", context=context, history=history, max_new_tokens=6)
    assert out.stats.chunk_tokens == pc.window - out.stats.prefix_tokens - 256
    assert out.stats.store_rejected == {"unreadable": 1} and out.stats.store_disk_documents == 0


def _forge_span(path: Path) -> None:
    """The file rewritten with its first piece's span running past its text, and a valid checksum."""
    from parallelcomp.store import _payload_checksum

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["pieces"][0, 2] = 10**6
    save_file(tensors, str(path), metadata={**meta, "xxh3_128": _payload_checksum(tensors)})


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
    (lambda p: _flip(p, 0.95), "checksum"),  # bits flipped in the token ids
    (lambda p: _rewrite(p, format="pc-doc-pieces/0"), "format"),
    (lambda p: _rewrite(p, budget="41"), "identity"),
    (_forge_span, "shape"),
])
def test_a_damaged_or_forged_documents_file_is_dropped_tokenized_again_and_reported(
        tokenizer, tmp_path, monkeypatch, damage, reason):
    model = tiny_model("llama", len(tokenizer))
    ref = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    victim = document_files(tmp_path)[0]
    damage(victim)
    tokenized = _tokenized_documents(monkeypatch, tokenizer, DOCS)
    out = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    outputs_equal(out, ref)
    assert out.stats.store_rejected == {reason: 1} and len(tokenized) == 1
    assert (out.stats.store_disk_documents, out.stats.store_disk_hits) == (4, 5)
    assert victim.exists()  # written again from the new tokenization
    again = engine(tokenizer, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS,
                                                                                 max_new_tokens=8)
    assert again.stats.store_rejected == {} and again.stats.store_disk_documents == 5


def test_a_tokenizer_that_cannot_be_serialized_keeps_its_chunk_kv_but_not_its_documents_on_disk(
        tokenizer, tmp_path):
    """A custom Python pre-tokenizer (here one that changes nothing) makes `to_str()` raise: no
    identity for the tokenizer, so no documents' files, a warning, and the same answer."""
    import copy

    from tokenizers import pre_tokenizers
    from tokenizers.pre_tokenizers import PreTokenizer

    class Unchanged:
        def pre_tokenize(self, pretok):
            pass

    custom = copy.deepcopy(tokenizer)
    backend = custom.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([PreTokenizer.custom(Unchanged()), backend.pre_tokenizer])
    model = tiny_model("llama", len(tokenizer))
    ref = engine(tokenizer, model=model).generate(QUESTION, documents=DOCS, max_new_tokens=8)
    with pytest.warns(UserWarning) as warned:
        out = engine(custom, model=model, kv_store_dir=str(tmp_path)).generate(QUESTION, documents=DOCS,
                                                                              max_new_tokens=8)
    assert any("cannot be serialized" in str(w.message) for w in warned)
    assert any("cannot be copied" in str(w.message) and "read as control tokens" in str(w.message) for w in warned)
    outputs_equal(out, ref)
    assert len(files(tmp_path)) == 5 and document_files(tmp_path) == []
