"""Bad input gets a typed ParallelCompError that says what to change, and nothing is cut silently."""

from __future__ import annotations

import pytest

from parallelcomp import ConfigError, InputError, ParallelComp, ParallelCompConfig, ParallelCompError


@pytest.fixture(scope="module")
def pc(tokenizer):
    from .conftest import tiny_model

    return ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=1))


@pytest.mark.parametrize(
    "question, kwargs, match",
    [
        ("", {"documents": ["a doc"]}, "question is empty"),
        ("   ", {"documents": ["a doc"]}, "question is empty"),
        (42, {"documents": ["a doc"]}, "question must be a string"),
        ("Q?", {"documents": []}, "documents is empty"),
        ("Q?", {"documents": ["ok", "  \n"]}, "document 1 is empty"),
        ("Q?", {"documents": ["ok", 3]}, "document 1 is a int"),
        ("Q?", {"documents": "one string"}, "use context="),
        ("Q?", {"documents": ["a"], "context": "b"}, "not both"),
        ("Q?", {"context": 5}, "context must be a string"),
        ("Q?", {"documents": ["a"], "stop": 3}, "stop must be a string or a list"),
        ("Q?", {"documents": ["a"], "max_new_tokens": 0}, "max_new_tokens must be a positive"),
        ("Q?", {"documents": ["a"], "temperature": -1}, "temperature must be >= 0"),
        ("Q?", {"documents": ["a"], "top_p": 0}, "top_p must be in"),
    ],
)
def test_bad_call_arguments(pc, question, kwargs, match):
    with pytest.raises(InputError, match=match):
        pc.generate(question, **kwargs)


def test_question_longer_than_the_chunk_budget(pc):
    with pytest.raises(InputError, match="shorten the question or lower max_new_tokens"):
        pc.generate("why " * 1200, documents=["short doc"], max_new_tokens=8)


def test_huge_document_is_refused_before_any_work(pc):
    with pytest.raises(InputError, match="max_input_chars"):
        pc.generate("Q?", documents=["x" * 10_000_000])


@pytest.mark.parametrize(
    "values, match",
    [
        ({"keep_chunks": 0}, "keep_chunks"),
        ({"chunk_tokens": -5}, "chunk_tokens"),
        ({"prefill_batch_tokens": 0}, "prefill_batch_tokens"),
        ({"kv_budget_tokens": 10, "kv_budget_ratio": 0.5}, "not both"),
        ({"pool_kernel": 4}, "odd"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_config(values, match):
    with pytest.raises(ConfigError, match=match):
        ParallelCompConfig(**values)


def test_chunk_tokens_above_the_model_window(tokenizer):
    from .conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(ConfigError, match="exceeds the model's trained window of 1024"):
        ParallelComp(model, tokenizer, ParallelCompConfig(chunk_tokens=4096))


def test_unknown_preset_and_errors_share_one_base():
    with pytest.raises(ParallelCompError, match="unknown preset"):
        ParallelCompConfig.preset("nope")
    assert issubclass(InputError, ParallelCompError) and issubclass(ConfigError, ParallelCompError)


def test_split_and_evicted_documents_are_reported(tokenizer):
    from .conftest import tiny_model

    pc = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=1, chunk_tokens=40))
    long_doc = "\n\n".join(f"Paragraph {i} tells about the river and the stone." for i in range(12))
    out = pc.generate("Where is the river?", documents=["A short note.", long_doc], max_new_tokens=2)
    assert out.stats.split_documents == [1]
    pieces = [long_doc[s.start : s.end] for c in out.chunks for s in c.spans if s.document == 1]
    assert "\n\n".join(pieces) == long_doc  # split at paragraph breaks, only the breaks dropped (#12)
    assert sum(c.kept for c in out.chunks) == 1 and out.stats.n_chunks == len(out.chunks) > 2
    kept_docs = {d for c in out.chunks if c.kept for d in c.documents}
    assert set(out.stats.evicted_documents) == {0, 1} - kept_docs
