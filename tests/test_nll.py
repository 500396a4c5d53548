"""nll.py: phase 2's NLL with the LM head run in vocabulary slices equals the NLL of the whole
logits, on the C log-sum-exp and on torch's; a model whose head is more than a Linear keeps its
own logits; and a reused corpus is scored in one phase-2 forward, while chunks the memory tier
does not hold are scored before the next micro-batch."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from parallelcomp import layer_kernel, nll, prefill
from parallelcomp.compat import same_code
from parallelcomp.nll import plain_head, token_nll

from .conftest import DEVICE, tiny_model
from .test_core import text

needs_kernel = pytest.mark.skipif(
    not layer_kernel.available() or DEVICE.type != "cpu",
    reason="the C log-sum-exp needs an x86-64 CPU with AVX-512 BF16 and a C compiler, and CPU tensors; "
           f"here: {layer_kernel.unavailable_reason() or f'the test device is {DEVICE.type}'}")


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log softmax of the whole logits the head gives in its own dtype, reduced in float64."""
    logits = torch.nn.functional.linear(hidden, weight).double()
    return -torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]


def rows_and_targets(hidden_size: int, vocab: int, dtype: torch.dtype, rows: int = 37):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=g).to(DEVICE, dtype)
    targets = torch.randint(vocab, (rows,), generator=g)
    targets[:3] = torch.tensor([0, vocab - 1, min(nll.SLICE, vocab - 2)])  # the first and last ids, a slice's first
    return hidden, targets.to(DEVICE)


@pytest.mark.parametrize("width", [1000, 4096, 60_000])  # slices that do not divide the vocabulary; one slice
def test_sliced_head_equals_the_whole_logits(family, tokenizer, monkeypatch, width):
    """fp32 models (torch's log-sum-exp per slice), every family, slices of several widths."""
    monkeypatch.setattr(nll, "SLICE", width)
    model = tiny_model(family, len(tokenizer))
    head = plain_head(model)
    hidden, targets = rows_and_targets(model.config.hidden_size, len(tokenizer), model.dtype)
    torch.testing.assert_close(token_nll(hidden, head, targets).double(), reference(hidden, head.weight, targets),
                               atol=1e-5, rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("width", [1000, 4096])
def test_c_logsumexp_gives_the_whole_logits_nll_in_bf16(tokenizer, monkeypatch, width):
    """A bf16 head on the CPU: every slice goes through the C kernel (counted), and the NLL is the
    float64 one of the same bf16 logits to fp32 accuracy."""
    monkeypatch.setattr(nll, "SLICE", width)
    model = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    calls = []
    real = layer_kernel.logsumexp_update
    monkeypatch.setattr(layer_kernel, "logsumexp_update", lambda *a: calls.append(a[0].shape) or real(*a))
    hidden, targets = rows_and_targets(model.config.hidden_size, len(tokenizer), torch.bfloat16)
    got = token_nll(hidden, plain_head(model), targets)
    assert len(calls) == -(-len(tokenizer) // width)
    torch.testing.assert_close(got.double(), reference(hidden, model.lm_head.weight, targets), atol=2e-5, rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_c_logsumexp_update_edges(threads, monkeypatch):
    """Row tails that are not a multiple of 16, a row stride wider than the slice, a slice of
    nothing but -inf before finite ones, and NaN: against torch.logsumexp in float64."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(1)
    wide = (torch.randn(5, 100, generator=g) * 8).to(torch.bfloat16)
    first, second = wide[:, :37], wide[:, 50:93]  # strided views: row stride 100
    first[2] = float("-inf")
    second[3, 7] = float("nan")
    high, total = torch.full((5,), float("-inf")), torch.zeros(5)
    for part in (first, second):
        assert layer_kernel.takes_logits(part)
        layer_kernel.logsumexp_update(part, high, total)
    want = torch.logsumexp(torch.cat([first, second], dim=1).double(), dim=-1)
    got = (high + total.log()).double()
    assert torch.isnan(got[3]) and torch.isnan(want[3])
    keep = torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-6)
    # a row whose slices so far are all -inf stays (-inf, 0)
    high, total = torch.full((1,), float("-inf")), torch.zeros(1)
    layer_kernel.logsumexp_update(torch.full((1, 20), float("-inf"), dtype=torch.bfloat16), high, total)
    assert high.item() == float("-inf") and total.item() == 0


def test_plain_head_only_where_the_logits_are_the_heads(family, tokenizer):
    """Llama's forward (copied by the test families) with a bias-free Linear head: plain. Gemma 2's
    soft-capping, Granite's logit scaling, a head with a bias, or a subclass's own forward: not."""
    model = tiny_model(family, len(tokenizer))
    assert plain_head(model) is model.lm_head
    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    assert plain_head(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0))) is None
    assert plain_head(GraniteForCausalLM(GraniteConfig(**{k: v for k, v in small.items() if k != "head_dim"},
                                                       logits_scaling=4.0))) is None
    biased = tiny_model("llama", len(tokenizer), tie_word_embeddings=False)
    biased.lm_head = nn.Linear(64, len(tokenizer), bias=True)
    assert plain_head(biased) is None

    class Scaled(type(model)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    assert plain_head(Scaled(model.config)) is None
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4))
    assert plain_head(neox) is None  # another decoder attribute (gpt_neox) and head (embed_out)


def test_same_code_compares_decorated_functions_down_to_what_they_wrap():
    """One decorator around different forwards (transformers 5.21 wraps every model's forward in
    the same one) is not the same code; the same forward under it is, docstring aside."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @decorate
    def llama(x):
        """Llama's."""
        return x.model(x)

    @decorate
    def copied(x):
        return x.model(x)

    @decorate
    def other(x):
        return x.gpt_neox(x)

    assert same_code(llama, copied) and not same_code(llama, other)
    assert not same_code(llama, llama.__wrapped__) and not same_code(llama, None)


def test_a_head_that_is_not_plain_scores_through_the_models_logits(make_engine, monkeypatch):
    """With plain_head finding nothing, phase 2 takes the model's logits (its forward, never the
    decoder alone) and ranks the chunks as the sliced head does, to fp32 accuracy."""
    docs = [text(i, 40) for i in range(4)]
    sliced = make_engine("llama", keep_chunks=2, chunk_tokens=48).generate("Which colour?", documents=docs,
                                                                            max_new_tokens=3)
    monkeypatch.setattr(prefill, "plain_head", lambda model: None)
    monkeypatch.setattr(prefill, "last_hidden", lambda *a, **k: pytest.fail("the decoder ran without its head"))
    own = make_engine("llama", keep_chunks=2, chunk_tokens=48).generate("Which colour?", documents=docs,
                                                                         max_new_tokens=3)
    assert [c.kept for c in own.chunks] == [c.kept for c in sliced.chunks]
    torch.testing.assert_close([c.score for c in own.chunks], [c.score for c in sliced.chunks], atol=1e-5, rtol=1e-6)
    assert own.token_ids == sliced.token_ids


def test_question_rows_without_whole_logits():
    """A question token costs a row of vocabulary logits only where the model's head makes them."""
    assert prefill.question_rows(4096, 31, sliced_head=True) == 132
    assert prefill.question_rows(4096, 31, sliced_head=False) == 33
    assert prefill.question_rows(16, 31, sliced_head=True) == 1


def test_a_reused_corpus_is_scored_in_one_forward(make_engine, monkeypatch):
    """Ten chunks in the memory tier and a question budget of their size: one phase-2 forward,
    where whole logits (a quarter of the budget in question tokens) would have taken three."""
    pc = make_engine("llama", chunk_tokens=32, prefill_batch_tokens=256)
    corpus = pc.encode([text(i, 30) for i in range(10)])
    question = "Which colour is named?"
    q = len(pc.prompt_parts(question, True).question_ids)
    assert len(corpus.chunks) == 10 and prefill.question_rows(256, q, False) < 10 <= prefill.question_rows(256, q, True)
    real, calls = prefill.last_hidden, []
    monkeypatch.setattr(prefill, "last_hidden", lambda m, ids, *a, **k: calls.append(ids.shape[0]) or real(m, ids, *a, **k))
    out = pc.generate(question, corpus=corpus, max_new_tokens=1)
    assert calls == [10] and out.stats.reused_chunks == 10


def test_chunks_the_memory_tier_does_not_hold_are_scored_before_the_next_micro_batch(make_engine, monkeypatch):
    """With no memory tier (kv_store_bytes=0) no chunk's KV waits for a later micro-batch: phase 2
    scores each micro-batch's chunks before the next one is encoded, in as many forwards."""
    pc = make_engine("llama", chunk_tokens=32, prefill_batch_tokens=96, kv_store_bytes=0)
    docs = [text(i, 30) for i in range(10)]
    events = []
    real_hidden, real_encode = prefill.last_hidden, pc.phase1
    monkeypatch.setattr(prefill, "last_hidden", lambda m, ids, *a, **k: events.append(("phase 2", ids.shape[0]))
                        or real_hidden(m, ids, *a, **k))
    monkeypatch.setattr(pc, "phase1", lambda batch, *a: events.append(("phase 1", len(batch))) or real_encode(batch, *a))
    out = pc.generate("Which colour is named?", documents=docs, max_new_tokens=1)
    assert out.stats.n_chunks == 10 and out.stats.reused_chunks == 0
    phase1 = [n for what, n in events if what == "phase 1"]
    assert len(phase1) > 1 and events == [e for n in phase1 for e in (("phase 1", n), ("phase 2", n))]
