"""Attention-bias calibration (issue 3, method.md §4) on constructed cases, plus scoping."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from parallelcomp import PRESETS, CalibrationRule, ConfigError, InputError, ParallelCompConfig
from parallelcomp.calibration import choose_evictions, chunk_spans, layer_plan, region_mask, rule_labels
from parallelcomp.config import PAPER_CALIBRATION_RULES
from parallelcomp.prompts import build_prompt

from .conftest import tiny_model
from .reference import calibration_evictions, eager_run

DOCS = [
    "The capital of France is Paris, a city on the Seine. " * 7,
    "Bananas are yellow and grow in bunches on tall plants. " * 6,
    "Rust is a systems programming language focused on safety. " * 6,
]
QUESTION = "What is the capital of France?"
BASE = dict(chunk_tokens=100, keep_chunks=2, calibration_region_tokens=10, calibration_query_rows=2)
LAYER = 1  # layers before it are untouched, so an uncalibrated eager run is an exact oracle for it


# ---------------------------------------------------------------------- pure rule maths


def test_regions_per_span_never_cover_prefix_or_question():
    spans = chunk_spans(5, [20, 7])
    assert spans == [(5, 25), (25, 32)]

    def idx(region):
        return region_mask(region, spans, 4, 35).nonzero()[:, 0].tolist()

    assert idx("sink") == [5, 6, 7, 8, 25, 26, 27, 28]
    assert idx("recent") == [21, 22, 23, 24, 28, 29, 30, 31]
    assert idx("middle") == list(range(9, 21))  # the 7-token chunk has no middle
    assert idx("all") == list(range(5, 32))


def test_choose_evictions_outliers_then_lowest_fill():
    attn = torch.tensor([[0.0, 0.9, 0.05, 0.3, 0.2, 0.01, 0.02, 0.03, 0.04, 0.1],
                         [0.0, 0.9, 0.05, 0.01, 0.02, 0.03, 0.01, 0.5, 0.04, 0.06]])
    evictable = torch.tensor([False, False] + [True] * 8)  # 0-1: prefix, never evicted
    outliers = (attn > 0.15) & evictable
    kept, m = choose_evictions(attn, outliers, evictable)
    assert m == 2
    # head 0 drops its outliers 3, 4; head 1 drops outlier 7 and its lowest other token (3, ties → earlier)
    assert kept.tolist() == [[0, 1, 2, 5, 6, 7, 8, 9], [0, 1, 2, 4, 5, 6, 8, 9]]
    kept, m = choose_evictions(attn, torch.zeros_like(outliers), evictable)
    assert m == 0 and kept.tolist() == [list(range(10))] * 2


def test_paper_rules_map_onto_depth():
    plan = layer_plan(PAPER_CALIBRATION_RULES, 32)  # the paper's 1-indexed 1-8 / 9-16 / 25-32
    assert {layer: [r.region for _, r in rules] for layer, rules in plan.items()} == {
        **{i: ["middle"] for i in range(0, 8)}, **{i: ["recent"] for i in range(8, 16)},
        **{i: ["sink"] for i in range(24, 32)}}
    assert sorted(layer_plan(PAPER_CALIBRATION_RULES, 3)) == [0, 1, 2]
    assert list(rule_labels(PAPER_CALIBRATION_RULES, 32)) == [
        "#0 middle layers 0-7", "#1 recent layers 8-15", "#2 sink layers 24-31"]
    assert rule_labels((CalibrationRule(region="sink", depth=(0.9, 1.0)),), 3) == {"#0 sink no layer": []}


def test_prefix_heads_the_first_chunk_when_calibrated():
    assert chunk_spans(5, [20, 7], with_prefix=True) == [(0, 25), (25, 32)]
    assert chunk_spans(5, [], with_prefix=True) == [(0, 5)]
    assert chunk_spans(0, [4], with_prefix=True) == [(0, 4)]
    sink = region_mask("sink", chunk_spans(5, [20, 7], with_prefix=True), 4, 35).nonzero()[:, 0].tolist()
    assert sink == [0, 1, 2, 3, 25, 26, 27, 28]  # BOS and the instruction lead the sink region


# ---------------------------------------------------------------------- constructed case


class _Spy:
    """Forward pre-hook: the last question-step cache (batch 1, q tokens), live and a copy."""

    def __init__(self, model, q: int):
        self.q, self.live, self.copy, self.calls = q, None, None, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache") or kwargs.get("past_key_values")
        if ids is not None and ids.shape == (1, self.q) and cache is not None:
            self.live = cache
            self.copy = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _run(engine, q, **kwargs):
    spy = _Spy(engine.model, q)
    try:
        out = engine.generate(QUESTION, documents=DOCS, max_new_tokens=6, **kwargs)
    finally:
        spy.handle.remove()
    return out, spy


@pytest.mark.parametrize("region,reference,with_prefix", [
    ("middle", "per_chunk", False), ("sink", "per_chunk", False), ("recent", "global", False),
    ("all", "global", False), ("sink", "per_chunk", True), ("sink", "global", True)])
def test_constructed_case_evicts_exactly_the_outliers_plus_fill(tokenizer, make_engine, region, reference,
                                                                with_prefix):
    model = tiny_model("llama", len(tokenizer))
    plain = make_engine(model=model, **BASE)
    config = plain.config
    question_ids = build_prompt(tokenizer, config.instruction, QUESTION, config.use_chat_template).question_ids
    q = len(question_ids)
    before, spy = _run(plain, q)
    merged, p, p0 = spy.copy, before.stats.prefix_tokens, before.stats.p0
    context = merged[0][0].shape[2]
    spans = chunk_spans(p, [c.kv_tokens for c in before.chunks if c.kept], with_prefix)
    if reference == "global":
        spans = [(spans[0][0], spans[-1][1])]
    region_idx = region_mask(region, spans, 10, context).nonzero()[:, 0].tolist()
    candidates = list(range(0 if with_prefix else p, context))

    # oracle: the eager twin's attention at the question step, on the same merged cache
    oracle = tiny_model("llama", len(tokenizer), attn="eager")
    attentions, _ = eager_run(oracle, question_ids, DynamicCache(ddp_cache_data=merged),
                              list(range(p0, p0 + q)))
    h_kv = model.config.num_key_value_heads
    _, a = calibration_evictions(attentions[LAYER], 2, h_kv, "mean", context, candidates, region_idx, 1.0)
    # λ between the 3rd and 4th largest of KV head 0 in the region: a non-trivial, unequal case
    top = sorted((a[0][j] for j in region_idx), reverse=True)
    threshold = (top[2] + top[3]) / 2
    assert top[2] - top[3] > 1e-5
    evicted, _ = calibration_evictions(attentions[LAYER], 2, h_kv, "mean", context, candidates, region_idx,
                                       threshold)
    m = len(evicted[0])
    assert m >= 3

    rule = CalibrationRule(region=region, layers=(LAYER, LAYER), threshold=threshold)
    engine = make_engine(model=model, calibration_rules=[rule], calibration_reference=reference,
                         calibrate_prefix=with_prefix, **BASE)
    out, spy = _run(engine, q)
    assert out.stats.calibration_evicted == {LAYER: m}
    flagged = max(sum(a[g][j] > threshold for j in region_idx) for g in range(h_kv))
    assert out.stats.calibration_evicted_by_rule == {f"#0 {region} layers {LAYER}-{LAYER}": {LAYER: flagged}}
    assert len(out.token_ids) == 6  # decoding after the eviction works
    keys, values = spy.live.layers[LAYER].keys, spy.live.layers[LAYER].values  # after decoding
    assert keys.shape[:2] == (1, h_kv) and keys.shape[2] >= context - m + q  # rectangular
    for head in range(h_kv):
        kept = [j for j in range(context) if j not in evicted[head]]
        assert with_prefix or all(j >= p for j in evicted[head])  # the prefix only when asked
        torch.testing.assert_close(keys[0, head, : context - m], merged[LAYER][0][0, head, kept])
        torch.testing.assert_close(values[0, head, : context - m], merged[LAYER][1][0, head, kept])
    for layer in range(model.config.num_hidden_layers):  # other layers keep every token
        if layer != LAYER:
            torch.testing.assert_close(spy.live.layers[layer].keys[:, :, :context], merged[layer][0])
    token_bytes = merged[LAYER][0][0, 0, 0].numel() * merged[LAYER][0].element_size() * 2 * h_kv
    assert out.stats.kv_bytes == before.stats.kv_bytes - m * token_bytes

    if with_prefix:  # the case the option exists for: the prefix holds outliers, and they go
        assert any(j < p for head in range(h_kv) for j in evicted[head])
    if region == "middle":  # the eager backend goes through the same dispatch, unequal layer lengths included
        eager_engine = make_engine(model=oracle, calibration_rules=[rule], calibration_reference=reference, **BASE)
        assert eager_engine.generate(QUESTION, documents=DOCS, max_new_tokens=6).token_ids == out.token_ids


@pytest.mark.parametrize("preset", ["paper-retrieval", "retrieval", "qa", "paper-calibration", "paper-calibration-compression", "fast"])
def test_presets_run_end_to_end(tokenizer, make_engine, preset):
    engine = make_engine("qwen3", **{**PRESETS[preset], "chunk_tokens": 100, "calibration_region_tokens": 10})
    out = engine.generate(QUESTION, documents=DOCS, max_new_tokens=4)
    assert len(out.token_ids) == 4
    assert out.stats.n_kept == min(engine.config.keep_chunks, out.stats.n_chunks)
    weight = engine.config.lexical_weight  # the kept chunks are the top K by score − λ·lexical
    ranked = sorted(out.chunks, key=lambda c: c.score - weight * c.lexical)[: engine.config.keep_chunks]
    assert {c.index for c in ranked} == {c.index for c in out.chunks if c.kept}
    assert any(c.lexical for c in out.chunks) == bool(weight)
    assert bool(out.stats.calibration_evicted) == bool(engine.config.calibration_rules)
    assert engine.config.calibrate_prefix == bool(engine.config.calibration_rules)  # paper presets: as the code
    assert len(out.stats.calibration_evicted_by_rule) == len(engine.config.calibration_rules)
    shrunk = engine.config.compresses or any(out.stats.calibration_evicted.values())
    assert (out.stats.kv_bytes < out.stats.kv_bytes_uncompressed) == shrunk


def test_a_rule_that_never_fires_is_visible_per_layer(make_engine):
    never = CalibrationRule(region="sink", layers=(0, 1), threshold=1.0)  # no probability exceeds 1
    always = CalibrationRule(region="all", layers=(2, 2), threshold=1e-9)
    engine = make_engine("llama", calibration_rules=[never, always], **BASE)
    stats = engine.generate(QUESTION, documents=DOCS, max_new_tokens=2).stats
    assert stats.calibration_evicted_by_rule["#0 sink layers 0-1"] == {0: 0, 1: 0}
    [(label, per_layer)] = [(k, v) for k, v in stats.calibration_evicted_by_rule.items() if k.startswith("#1")]
    assert label == "#1 all layers 2-2" and per_layer[2] == stats.calibration_evicted[2] > 0


# ---------------------------------------------------------------------- scoping


def _vanilla(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    return logits, generated


def test_model_is_vanilla_after_calibration_and_after_an_abandoned_stream(tokenizer, make_engine):
    model = tiny_model("qwen2", len(tokenizer))
    ids = torch.tensor([tokenizer("Hello there, how are you", add_special_tokens=False)["input_ids"]], device=model.device)
    logits, generated = _vanilla(model, ids)
    engine = make_engine(model=model, calibration_rules=[CalibrationRule(region="all", layers=(0, 2))],
                         kv_budget_ratio=0.5, **BASE)
    engine.generate(QUESTION, documents=DOCS, max_new_tokens=4)

    def assert_vanilla():
        assert model.config._attn_implementation == "sdpa"
        assert "parallelcomp" not in AttentionInterface._global_mapping
        assert "parallelcomp" not in AttentionMaskInterface._global_mapping
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        again_logits, again_generated = _vanilla(model, ids)
        torch.testing.assert_close(again_logits, logits)
        assert again_generated.tolist() == generated.tolist()

    assert_vanilla()
    stream = engine.stream(QUESTION, documents=DOCS, max_new_tokens=30)
    next(iter(stream))
    assert model.config._attn_implementation == "parallelcomp"  # scoped to the call, still running
    stream.close()
    assert_vanilla()


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("rule", [dict(region="sink", layers=(0, 1), threshold=0.0),
                                  dict(region="sink", layers=(0, 1), threshold=1.5),
                                  dict(region="bogus", layers=(0, 1)),
                                  dict(region="sink"),
                                  dict(region="sink", layers=(2, 1)),
                                  dict(region="sink", depth=(0.5, 0.5))])
def test_bad_rules_are_config_errors(rule):
    with pytest.raises(ConfigError):
        CalibrationRule(**rule)
    with pytest.raises(ConfigError):
        ParallelCompConfig(calibration_rules=[rule])


@pytest.mark.parametrize("values", [{"calibration_region_tokens": 0}, {"calibration_query_rows": 0},
                                    {"calibration_reference": "chunk"}])
def test_bad_calibration_settings_are_config_errors(values):
    with pytest.raises(ConfigError):
        ParallelCompConfig(**values)


def test_missing_layers_and_too_many_rows_fail_before_any_forward(make_engine):
    with pytest.raises(ConfigError, match="only 3 layers"):  # at construction, before any call
        make_engine("llama", calibration_rules=[CalibrationRule(region="sink", layers=(1, 5))])
    engine = make_engine("llama", calibration_rules=[CalibrationRule(region="sink", depth=(0.5, 1.0))],
                         calibration_query_rows=500)
    spy = _Spy(engine.model, 0)
    with pytest.raises(InputError, match="calibration_query_rows"):
        engine.generate(QUESTION, documents=DOCS, max_new_tokens=2)
    spy.handle.remove()
    assert spy.calls == 0
