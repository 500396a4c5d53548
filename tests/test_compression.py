"""Per-chunk KV compression (issue 3, method.md §3) against an independent eager oracle."""

from __future__ import annotations

import pytest
import torch
from .conftest import tiny_model
from .reference import eager_run, snapkv_scores, top_indices

from parallelcomp import ConfigError, InputError, ParallelCompConfig
from parallelcomp import kv as kvops
from parallelcomp.chunking import Chunk
from parallelcomp.compression import BatchCompressor, keep_topk
from parallelcomp.prefill import encode_chunks, encode_prefix, question_nll
from parallelcomp.prompts import build_prompt

DOCS = [
    "The capital of France is Paris, a city on the Seine. " * 8,
    "Bananas are yellow and grow in bunches on tall plants. " * 6,
    "Rust is a systems programming language focused on safety. " * 7,
]
QUESTION = "What is the capital of France?"


def _assert_same_selection(ours: list[int], ref: list[int], scores: list[float]) -> None:
    """Equal kept sets; a difference is tolerated only between float-level ties at the cut."""
    if ours == ref:
        return
    cut = sorted(scores, reverse=True)[len(ref) - 1]
    differing = set(ours) ^ set(ref)
    assert all(abs(scores[j] - cut) < 1e-5 for j in differing), (ours, ref)


@pytest.mark.parametrize("family,pooling,gqa_reduce,observation", [
    ("llama", "max", "mean", "question"), ("qwen2", "max", "mean", "last"),
    ("qwen2", "avg", "max", "question"), ("qwen3", "max", "max", "last")])
def test_selection_equals_eager_reference(tokenizer, family, pooling, gqa_reduce, observation):
    """Phase-2 scores on a batch of three chunks keep exactly the oracle's tokens per
    layer and KV head, and the kept KV equals the oracle's KV at those tokens. Observation rows:
    the question's own tokens (here 2..8 of a 12-token suffix) or the last 8."""
    model = tiny_model(family, len(tokenizer))
    oracle = tiny_model(family, len(tokenizer), attn="eager")  # same seed → same weights
    config = ParallelCompConfig(kv_budget_tokens=20, pooling=pooling, gqa_reduce=gqa_reduce,
                                snap_observation=observation)
    span = (2, 9)
    gen = torch.Generator().manual_seed(1)
    prefix_ids = [1] + torch.randint(3, len(tokenizer), (5,), generator=gen).tolist()
    question_ids = torch.randint(3, len(tokenizer), (12,), generator=gen).tolist()
    chunks = [Chunk(i, torch.randint(3, len(tokenizer), (n,), generator=gen).tolist(), ()) for i, n in
              enumerate([60, 45, 18])]  # the last one fits its budget: left untouched

    prefix = encode_prefix(model, prefix_ids)
    encoded = encode_chunks(model, prefix_ids, chunks)
    comp = BatchCompressor.for_batch(config, len(prefix_ids), encoded, len(question_ids), span)
    question_nll(model, prefix, encoded, question_ids, slice(*span), comp.observe)
    assert not any(m._forward_hooks for m in model.modules())
    ours = {i: {layer: keep_topk(s, 20)[0].tolist() for layer, s in layers.items()}
            for i, layers in comp.scores.items()}
    compressed = comp.apply(encoded)

    p, h_kv = len(prefix_ids), model.config.num_key_value_heads
    assert compressed[2] is encoded[2]  # budget ≥ length: the exact same KV
    for i in (0, 1):
        chunk = chunks[i].token_ids
        attentions, cache = eager_run(oracle, prefix_ids + chunk + question_ids)
        q0 = p + len(chunk)  # the question's first row
        rows = range(q0 + span[0], q0 + span[1]) if observation == "question" else range(q0 + 12 - 8, q0 + 12)
        for layer, attention in enumerate(attentions):
            scores = snapkv_scores(attention, p, len(chunk), list(rows), 7, h_kv, pooling, gqa_reduce)
            keys, values = compressed[i].kv[layer]
            assert keys.shape == values.shape == (1, h_kv, 20, keys.shape[-1])
            for head in range(h_kv):
                ref = top_indices(scores[head], 20)
                _assert_same_selection(ours[i][layer][head], ref, scores[head])
                index = [p + j for j in ours[i][layer][head]]
                torch.testing.assert_close(keys[0, head], cache.layers[layer].keys[0, head, index],
                                           atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(values[0, head], cache.layers[layer].values[0, head, index],
                                           atol=1e-4, rtol=1e-4)


class _QuestionCache:
    """Forward pre-hook recording the cache the question step starts from: the last batch-1 call
    with the question's length (phase 2 of a single chunk has that shape too, and comes first)."""

    def __init__(self, model, q: int):
        self.q, self.layers = q, None
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        if ids is not None and ids.shape == (1, self.q) and cache is not None:
            self.layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _question_ids(tokenizer, config):
    return build_prompt(tokenizer, config.instruction, QUESTION, config.use_chat_template)


@pytest.mark.parametrize("observation", ["question", "last"])
def test_engine_merged_kv_equals_reference_and_reports_bytes(tokenizer, make_engine, observation):
    """One document, one chunk: the KV the question sees is prefix + the oracle's kept tokens,
    and stats/ChunkReport state its real size."""
    engine = make_engine("llama", kv_budget_tokens=30, keep_chunks=1, snap_observation=observation)
    parts = _question_ids(tokenizer, engine.config)
    chunk = tokenizer(DOCS[0].strip(), add_special_tokens=False)["input_ids"]  # chunk edges are stripped
    spy = _QuestionCache(engine.model, len(parts.question_ids))
    out = engine.generate(QUESTION, documents=[DOCS[0]], max_new_tokens=3)
    spy.handle.remove()

    assert [c.kv_tokens for c in out.chunks] == [30] and out.chunks[0].n_tokens == len(chunk)
    p = len(parts.prefix_ids)
    assert out.stats.p0 == p + len(chunk)  # positions come from the uncompressed chunk
    merged = spy.layers
    assert out.stats.kv_bytes == kvops.n_bytes(merged)
    per_token = kvops.n_bytes(merged) // (p + 30)
    assert out.stats.kv_bytes_uncompressed == per_token * (p + len(chunk))
    assert out.stats.kv_tokens == p + 30

    oracle = tiny_model("llama", len(tokenizer), attn="eager")
    attentions, cache = eager_run(oracle, parts.prefix_ids + chunk + parts.question_ids)
    h_kv = oracle.config.num_key_value_heads
    q0, (first, end) = p + len(chunk), parts.question_span
    rows = range(q0 + first, q0 + end) if observation == "question" else range(q0 + len(parts.question_ids) - 8,
                                                                                q0 + len(parts.question_ids))
    assert end - first < 8  # the two settings observe different rows
    for layer, attention in enumerate(attentions):
        ref_keys = cache.layers[layer].keys[0]  # (H_kv, T, D)
        torch.testing.assert_close(merged[layer][0][0, :, :p], ref_keys[:, :p], atol=1e-4, rtol=1e-4)
        scores = snapkv_scores(attention, p, len(chunk), list(rows), 7, h_kv)
        for head in range(h_kv):
            kept = merged[layer][0][0, head, p:]  # (30, D): recover indices by nearest key
            ours = torch.cdist(kept, ref_keys[head, p : p + len(chunk)]).argmin(dim=-1).tolist()
            _assert_same_selection(ours, top_indices(scores[head], 30), scores[head])
            torch.testing.assert_close(kept, ref_keys[head, [p + j for j in ours]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("setting", [{"kv_budget_tokens": 10_000}, {"kv_budget_ratio": 1.0}])
def test_budget_at_least_chunk_length_is_a_noop(tokenizer, make_engine, setting):
    model = tiny_model("qwen2", len(tokenizer))
    plain = make_engine(model=model, chunk_tokens=120, keep_chunks=2).generate(QUESTION, documents=DOCS,
                                                                              max_new_tokens=8)
    same = make_engine(model=model, chunk_tokens=120, keep_chunks=2, **setting).generate(
        QUESTION, documents=DOCS, max_new_tokens=8)
    assert same.token_ids == plain.token_ids
    assert same.stats.kv_bytes == same.stats.kv_bytes_uncompressed == plain.stats.kv_bytes
    assert [c.kv_tokens for c in same.chunks] == [c.kv_tokens for c in plain.chunks]
    assert [c.kv_tokens for c in plain.chunks if c.kept] == [c.n_tokens for c in plain.chunks if c.kept]


def test_ratio_budget_reports_and_bytes(tokenizer, make_engine):
    model = tiny_model("mistral", len(tokenizer))
    plain = make_engine(model=model, chunk_tokens=120, keep_chunks=2).generate(QUESTION, documents=DOCS,
                                                                              max_new_tokens=4)
    half = make_engine(model=model, chunk_tokens=120, keep_chunks=2, kv_budget_ratio=0.5).generate(
        QUESTION, documents=DOCS, max_new_tokens=4)
    kept = [c for c in half.chunks if c.kept]
    assert [c.index for c in kept] == [c.index for c in plain.chunks if c.kept]  # NLL ranking unchanged
    assert [c.kv_tokens for c in kept] == [-(-c.n_tokens // 2) for c in kept]
    assert half.stats.kv_bytes_uncompressed == plain.stats.kv_bytes
    per_token = plain.stats.kv_bytes // plain.stats.kv_tokens
    assert half.stats.kv_bytes == per_token * half.stats.kv_tokens
    assert half.stats.kv_tokens == half.stats.prefix_tokens + sum(c.kv_tokens for c in kept)
    assert half.stats.p0 == plain.stats.p0


def test_keep_topk_sorted_and_ties_go_to_earlier_tokens():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 0.5, 3.0, 2.0]]])
    assert keep_topk(scores, 3).tolist() == [[[1, 2, 4]]]
    assert keep_topk(scores, 2).tolist() == [[[1, 2]]]


def test_model_is_vanilla_after_a_compressed_call(tokenizer, make_engine):
    model = tiny_model("llama", len(tokenizer))
    ids = torch.tensor([tokenizer("Hello there, how are you", add_special_tokens=False)["input_ids"]], device=model.device)
    with torch.no_grad():
        before = model(ids).logits
    make_engine(model=model, chunk_tokens=120, keep_chunks=2, kv_budget_tokens=16).generate(
        QUESTION, documents=DOCS, max_new_tokens=3)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.parametrize("values", [{"kv_budget_tokens": 0}, {"kv_budget_tokens": -4}, {"kv_budget_ratio": 0.0},
                                    {"kv_budget_ratio": 1.5}, {"kv_budget_tokens": 8, "kv_budget_ratio": 0.5},
                                    {"snap_window": 0}, {"pool_kernel": 6}])
def test_bad_compression_config_is_a_config_error(values):
    with pytest.raises(ConfigError):
        ParallelCompConfig(**values)


def test_window_larger_than_question_is_an_input_error(make_engine):
    engine = make_engine("llama", kv_budget_tokens=16, snap_window=500, snap_observation="last")
    with pytest.raises(InputError, match="snap_window"):
        engine.generate(QUESTION, documents=DOCS, max_new_tokens=2)
    with pytest.raises(InputError, match="snap_window"):
        make_engine("llama", kv_budget_tokens=16, snap_observation="last").score("Paris is", documents=DOCS)
    # observing the question's own tokens needs no window: the same short target is scored
    assert make_engine("llama", kv_budget_tokens=16, snap_observation="question").score(
        "Paris is", documents=DOCS).n_tokens >= 1


def test_compression_scores_even_when_no_question_logits_are_needed(tokenizer):
    """A scored span of only the first question token needs no logits (phase 1 scored it), but
    compression still observes the question's attention in every layer."""
    model = tiny_model("llama", len(tokenizer))
    gen = torch.Generator().manual_seed(2)
    prefix_ids = [1] + torch.randint(3, len(tokenizer), (5,), generator=gen).tolist()
    question_ids = torch.randint(3, len(tokenizer), (6,), generator=gen).tolist()
    chunks = [Chunk(0, torch.randint(3, len(tokenizer), (40,), generator=gen).tolist(), ())]
    encoded = encode_chunks(model, prefix_ids, chunks)
    comp = BatchCompressor.for_batch(ParallelCompConfig(kv_budget_tokens=10), len(prefix_ids), encoded, 6, (0, 6))
    nll = question_nll(model, encode_prefix(model, prefix_ids), encoded, question_ids, slice(0, 1), comp.observe)
    assert nll.shape == (1, 1)
    assert sorted(comp.scores[0]) == list(range(model.config.num_hidden_layers))
