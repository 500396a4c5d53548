"""The fast decode path (docs/decode.md) is exact: a preallocated cache and packed-GQA one-token
attention give the same tokens and logits as a DynamicCache with transformers' own attention."""

from __future__ import annotations

import os
import platform
import shutil
from contextlib import nullcontext

import pytest
import torch
from transformers import AttentionInterface, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from parallelcomp import CalibrationRule
from parallelcomp import attention
from parallelcomp import decode, decode_kernel, hardware
from parallelcomp import kv as kvops
from parallelcomp.config import PAPER_CALIBRATION_RULES

from .conftest import DEVICE, tiny_model

DOCS = [
    "The capital of France is Paris, a city on the Seine. " * 7,
    "Bananas are yellow and grow in bunches on tall plants. " * 6,
    "Rust is a systems programming language focused on safety. " * 6,
]
QUESTION = "What is the capital of France?"
BASE = dict(chunk_tokens=100, keep_chunks=2, calibration_region_tokens=10)
SETTINGS = {
    "plain": {},
    # the paper's three rules, with a λ low enough that a tiny random model has outliers to evict
    "calibration": dict(calibration_rules=[CalibrationRule(region=r.region, depth=r.depth, threshold=0.02)
                                           for r in PAPER_CALIBRATION_RULES]),
    "compression": dict(kv_budget_ratio=0.5),
}


def _old_path(monkeypatch):
    """The decode path before docs/decode.md: DynamicCache, transformers' sdpa for every step."""
    monkeypatch.setattr(kvops, "decode_cache", lambda parts, extra_tokens: kvops.to_cache(kvops.concat(parts)))
    monkeypatch.setattr(decode, "packed_decode", lambda model, kernel=False, causal="": nullcontext())
    monkeypatch.setattr(decode, "one_row_linears", lambda model: nullcontext())  # torch's products too
    monkeypatch.setattr(attention, "packed_one_query",
                        lambda module, q, k, v, **kwargs: sdpa_attention_forward(module, q, k, v, None, **kwargs))
    monkeypatch.setattr(attention, "packed_queries",  # the question step too (repeat_kv, then SDPA)
                        lambda module, q, k, v, mask, **kwargs: sdpa_attention_forward(module, q, k, v, mask, **kwargs))


def _record(engine, monkeypatch, **kwargs):
    """Generate; return the output, each step's logits, cache layer type and path ("modules": the
    model's forward, "whole": decode_kernel.DecodeStep), and packed-attention calls (each call's
    layer, and whether the C kernel ran it); `products` counts the C kernel's one-row products
    (decode_kernel.linear); `queries` lists the layers whose multi-token attention ran packed
    (attention.packed_queries)."""
    steps, packed, products, queries = [], [], [], []
    forward, pack, attend, linear = decode.forward, attention.packed_one_query, decode_kernel.attend, decode_kernel.linear
    pack_queries = attention.packed_queries
    whole = decode_kernel.DecodeStep.__call__

    def spy_forward(model, ids, cache, positions, *args, **kw):
        logits = forward(model, ids, cache, positions, *args, **kw)
        steps.append((logits[0, -1].clone(), type(cache.layers[0]), "modules"))
        return logits

    def spy_whole(step, *args):
        logits = whole(step, *args)
        steps.append((logits[0, -1].clone(), type(step.cache.layers[0]), "whole"))
        return logits

    def spy_pack(module, *args, **kw):
        packed.append([module.layer_idx, False])
        return pack(module, *args, **kw)

    def spy_kernel(*args, **kw):
        packed[-1][1] = True
        return attend(*args, **kw)

    def spy_queries(module, *args, **kw):
        queries.append(module.layer_idx)
        return pack_queries(module, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(decode, "forward", spy_forward)
        m.setattr(decode_kernel.DecodeStep, "__call__", spy_whole)
        m.setattr(attention, "packed_one_query", spy_pack)
        m.setattr(attention, "packed_queries", spy_queries)
        m.setattr(decode_kernel, "attend", spy_kernel)
        m.setattr(decode_kernel, "linear", lambda *a: products.append(1) or linear(*a))
        out = engine.generate(QUESTION, documents=DOCS, max_new_tokens=12, **kwargs)
    return out, steps, packed, len(products), queries


FAMILIES = [("llama", "sdpa"), ("mistral", "sdpa"), ("qwen2", "sdpa"), ("qwen3", "sdpa"), ("llama", "eager")]
# split: the one-token attention over these tiny runs' merged KV (~250 tokens) split into key
# ranges of ≥ 32 keys, as over a long merged KV (attention._split_key_attention)
# kernel: "c-avx2" runs the one-token steps whole in one C call (decode_kernel.DecodeStep),
# "c-avx2-modules" through the model's modules with the C kernels for attention and projections
# (DecodeStep disabled), "torch" on SDPA
CASES = ([(family, attn, setting, "unsplit", "torch") for family, attn in FAMILIES for setting in sorted(SETTINGS)]
         + [(family, "sdpa", "plain", "split", "torch") for family in ("llama", "mistral", "qwen2", "qwen3")]
         + [("llama", "sdpa", setting, "split", "torch") for setting in ("calibration", "compression")]
         + [(family, "sdpa", "plain", "unsplit", kernel) for family in ("llama", "mistral", "qwen2", "qwen3")
            for kernel in ("c-avx2", "c-avx2-modules")]
         + [("llama", "sdpa", setting, "unsplit", kernel) for setting in ("calibration", "compression")
            for kernel in ("c-avx2", "c-avx2-modules")])
# the C kernels need an x86-64 CPU with AVX2 and FMA and a C compiler (tests/test_decode_kernel.py
# fails where those are present and the kernels do not build); the "torch" cases run everywhere.
# With the tiny models on a GPU (PARALLELCOMP_TEST_DEVICE) the engine decodes with torch by design.
needs_kernel = pytest.mark.skipif(
    not decode_kernel.available() or DEVICE.type != "cpu",
    reason=(f"the engine decodes a model on {DEVICE} with torch; the C decode kernels serve CPU models only"
            if DEVICE.type != "cpu" else f"the C decode kernels are unavailable here: {decode_kernel.unavailable_reason()}"))


@pytest.mark.parametrize("family,attn,setting,split,kernel",
                         [pytest.param(*case, marks=needs_kernel) if case[-1] != "torch" else case for case in CASES])
def test_fast_decode_equals_dynamic_cache_path(tokenizer, make_engine, monkeypatch, family, attn, setting, split,
                                               kernel):
    if split == "split":
        monkeypatch.setattr(attention, "SPLIT_KEYS", 32)
    if kernel == "c-avx2-modules":
        monkeypatch.setattr(decode_kernel.DecodeStep, "for_model", classmethod(lambda cls, model, cache: None))
    model = tiny_model(family, len(tokenizer), attn=attn)
    engine = make_engine(model=model, **BASE, **SETTINGS[setting], decode_kernel="torch" if kernel == "torch" else "auto")
    new, new_steps, packed, products, queries = _record(engine, monkeypatch)
    with monkeypatch.context() as m:
        _old_path(m)
        old, old_steps, _, old_products, _ = _record(engine, monkeypatch)
    assert old_products == 0  # the reference is torch's and transformers' arithmetic throughout

    assert {kind for _, kind, _ in new_steps} == {kvops.PreallocatedLayer}
    assert {kind for _, kind, _ in old_steps} == {DynamicLayer}
    # the question step runs through the modules; with "c-avx2" every one-token step runs whole
    whole = kernel == "c-avx2" and attn == "sdpa"
    assert [path for _, _, path in new_steps] == ["modules"] + ["whole" if whole else "modules"] * (len(new_steps) - 1)
    assert new.stats.kernel_steps == (len(new_steps) - 1 if whole else 0)
    # sdpa: every one-token step through the modules runs packed in every layer; eager is never packed
    n_layers = model.config.num_hidden_layers
    on_kernel = kernel != "torch"
    module_steps = 0 if whole else len(new_steps) - 1
    assert packed == ([[layer, on_kernel] for layer in range(n_layers)] * module_steps if attn == "sdpa" else [])
    # sdpa: the question step's masked attention runs packed in every layer (the tiny models are GQA)
    assert queries == (list(range(n_layers)) if attn == "sdpa" else [])
    # every projection and the LM head at each one-token step, and the LM head on the question's last row
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert products == (linears * module_steps + 1 if on_kernel else 0)
    assert new.stats.decode_kernel == ("torch" if kernel == "torch" or attn != "sdpa" else decode_kernel.NAME)
    assert new.token_ids == old.token_ids
    assert len(new.token_ids) == 12 and len(set(new.token_ids)) > 1, "a degenerate answer makes this weak"
    assert len(new_steps) == len(old_steps)
    for (a, _, _), (b, _, _) in zip(new_steps, old_steps):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert new.stats.calibration_evicted == old.stats.calibration_evicted
    if setting == "calibration":  # evictions were compacted into the preallocated buffers
        assert any(new.stats.calibration_evicted.values())
    if setting == "compression":
        assert new.stats.kv_bytes < new.stats.kv_bytes_uncompressed
    assert model.config._attn_implementation == attn
    assert "parallelcomp" not in AttentionInterface._global_mapping


@pytest.mark.parametrize("keys,split_keys,ranges", [(300, attention.SPLIT_KEYS, 0), (301, 64, 4), (300, 32, 8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 2), (4, 4)])
def test_packed_one_query_equals_sdpa_with_repeated_heads(monkeypatch, dtype, tol, heads, kv_heads,
                                                          keys, split_keys, ranges):
    """Unsplit, and split into key ranges (with a remainder at 301 keys), over views of a
    preallocated buffer (gaps between heads, as decode_cache holds them)."""
    torch.manual_seed(0)
    monkeypatch.setattr(attention, "SPLIT_KEYS", split_keys)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # at most 4 ranges per thread
    calls, flash = [], attention.compat.cpu_flash_attention  # calls: the key ranges of each kernel call
    monkeypatch.setattr(attention.compat, "cpu_flash_attention",
                        lambda q, k, v, **kw: calls.append(k.shape[1]) or flash(q, k, v, **kw))
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    query = torch.randn(2, heads, 1, 64, dtype=dtype)
    key, value = torch.randn(2, 2, kv_heads, keys + 20, 64, dtype=dtype)[..., :keys, :].unbind(0)
    out, weights = attention.packed_one_query(module, query, key, value, scaling=0.125)
    assert calls == ([ranges] + [1] * (keys % ranges > 0) if ranges else [])
    groups = heads // kv_heads  # query head h reads KV head h // groups
    ref = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), scale=0.125
    )
    assert weights is None and out.shape == (2, 1, heads, 64)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=tol, rtol=tol)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("batch,mask_batch", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 2)])
def test_packed_queries_equal_sdpa_with_repeated_heads(dtype, tol, heads, kv_heads, batch, mask_batch, mask_kind):
    """The question step's packing equals transformers' sdpa function (which repeats the KV heads),
    over views of a preallocated buffer, under a causal-over-the-question mask that also hides some
    context keys (as calibration does), bool or additive, per row or broadcast over the batch."""
    torch.manual_seed(0)
    q_len, keys = 7, 50
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    query = torch.randn(batch, heads, q_len, 64, dtype=dtype)
    key, value = torch.randn(2, batch, kv_heads, keys + 20, 64, dtype=dtype)[..., :keys, :].unbind(0)
    visible = torch.ones(mask_batch, 1, q_len, keys, dtype=torch.bool)
    visible[..., keys - q_len:] = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    visible[..., 3:9] = torch.rand(mask_batch, 1, q_len, 6) > 0.5
    mask = visible if mask_kind == "bool" else torch.zeros(visible.shape, dtype=dtype).masked_fill(
        ~visible, torch.finfo(dtype).min)
    assert attention._packs_queries(query, key, mask, {})
    out, weights = attention.packed_queries(module, query, key, value, mask, scaling=0.125)
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
    assert weights is None and out.shape == ref.shape == (batch, q_len, heads, 64)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_queries_are_packed_only_where_packing_is_equal():
    query, key = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 10, 8)
    mask = torch.ones(1, 1, 3, 10, dtype=torch.bool)
    assert attention._packs_queries(query, key, mask, {})
    assert not attention._packs_queries(query, key, None, {})  # no mask: transformers' GQA-native causal call
    assert not attention._packs_queries(query[:, :, :1], key, mask, {})  # one token: packed_one_query
    assert not attention._packs_queries(query, torch.zeros(1, 4, 10, 8), mask, {})  # no GQA: nothing repeated
    assert not attention._packs_queries(query, key, mask.expand(1, 4, 3, 10), {})  # a per-head mask
    assert not attention._packs_queries(query, key, mask, {"softcap": 30.0})
    assert not attention._packs_queries(query, key, mask, {"s_aux": torch.zeros(4)})


def test_preallocated_layer_writes_in_place_and_compacts_on_set_layer():
    torch.manual_seed(0)
    k, v = torch.randn(2, 1, 2, 5, 4).unbind(0)
    cache = kvops.decode_cache([[(k, v)]], extra_tokens=3)
    layer = cache.layers[0]
    buffer = layer.keys.data_ptr()
    step_k, step_v = torch.randn(2, 1, 2, 2, 4).unbind(0)
    keys, values = cache.update(step_k, step_v, 0)
    assert keys.data_ptr() == buffer and cache.get_seq_length() == 7
    torch.testing.assert_close(keys, torch.cat([k, step_k], dim=2))
    torch.testing.assert_close(values, torch.cat([v, step_v], dim=2))

    kvops.set_layer(cache, 0, keys[:, :, 1:4].clone(), values[:, :, 1:4].clone())  # e.g. after eviction
    assert cache.get_seq_length() == 3 and layer.keys.data_ptr() == buffer
    keys, _ = cache.update(step_k[:, :, :1], step_v[:, :, :1], 0)
    torch.testing.assert_close(keys, torch.cat([k[:, :, 1:4], step_k[:, :, :1]], dim=2))

    with pytest.raises(RuntimeError, match="decode cache full"):
        cache.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), 0)


def test_model_is_vanilla_after_an_exhausted_and_an_abandoned_stream(tokenizer, make_engine):
    model = tiny_model("qwen3", len(tokenizer))
    engine = make_engine(model=model, **BASE)

    def assert_vanilla():
        assert model.config._attn_implementation == "sdpa"
        assert "parallelcomp" not in AttentionInterface._global_mapping
        assert "parallelcomp" not in AttentionMaskInterface._global_mapping

    engine.generate(QUESTION, documents=DOCS, max_new_tokens=3)
    assert_vanilla()
    stream = engine.stream(QUESTION, documents=DOCS, max_new_tokens=30)
    next(iter(stream))
    assert model.config._attn_implementation == "parallelcomp"  # the packed scope is live while decoding
    stream.close()
    assert_vanilla()


def test_an_architecture_without_known_attention_modules_decodes_as_before(tokenizer, make_engine, monkeypatch):
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    engine = make_engine(model=GPTNeoXForCausalLM(config).eval(), **BASE)  # fused query_key_value, no q_proj
    new, _, packed, _, queries = _record(engine, monkeypatch)
    with monkeypatch.context() as m:
        _old_path(m)
        old, _, _, _, _ = _record(engine, monkeypatch)
    assert new.token_ids == old.token_ids and len(new.token_ids) == 12 and not packed and not queries


def test_flash_attention_is_never_packed(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.config._attn_implementation = "flash_attention_2"  # no kernel needed: nothing may run here
    with attention.packed_decode(model):
        assert model.config._attn_implementation == "flash_attention_2"


def test_the_kernels_build_wherever_they_can():
    """On an x86-64 CPU with AVX2 and FMA and a C compiler on PATH the kernels must build and load."""
    prerequisites = (platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= hardware.cpu_flags()
                     and shutil.which(os.environ.get("CC", "cc")) is not None)
    assert decode_kernel.available() == prerequisites, decode_kernel.unavailable_reason()
