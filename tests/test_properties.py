"""Property-based suite over the public core surfaces (issue #13).

Hypothesis generates calls to `generate`, `stream` (consumed to a random point, then broken off,
closed or dropped) and `score` with arbitrary question/documents/context values and settings of
every type, and `ParallelCompConfig`s of arbitrary values, on the tiny model of conftest.py. For
every generated call:

* it ends, within a deadlock bound, in a valid output or a `ParallelCompError` (never a raw
  TypeError, torch error or hang);
* the next valid call on the same model equals the output of a fresh engine on a fresh model.

CI runs the derandomized "ci" profile (fixed cases, well under a minute); set
HYPOTHESIS_PROFILE=explore for a longer random search.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallelcomp import (
    GenerationOutput,
    ParallelComp,
    ParallelCompConfig,
    ParallelCompError,
    ScoreOutput,
)

from parallelcomp.config import PAPER_CALIBRATION_RULES

from .conftest import tiny_model
from .test_hardening import bounded

settings.register_profile(
    "ci", max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
settings.register_profile("explore", max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BOUND = 60  # seconds per generated call; only a hang reaches it
PROBE = ("Where does the river run?", ["The river runs north past the copper garden.", "Seven stones lie here."])
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def setup(tokenizer):
    """(shared engine, the probe's output on a fresh engine over a fresh model)."""
    fresh = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer).generate(PROBE[0], documents=PROBE[1],
                                                                                 max_new_tokens=4)
    yield ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer), fresh.token_ids
    print(f"\nproperty outcomes ({sum(OUTCOMES.values())} calls): {dict(sorted(OUTCOMES.items()))}")


def probe_equals_fresh(engine: ParallelComp, fresh: list[int]) -> None:
    out = bounded(lambda: engine.generate(PROBE[0], documents=PROBE[1], max_new_tokens=4), BOUND)
    assert out.token_ids == fresh


def outcome(call) -> None:
    """Run `call` under the bound; record and check its outcome class."""
    try:
        result = bounded(call, BOUND)
    except ParallelCompError as err:
        OUTCOMES[type(err).__name__] += 1
        assert str(err), "an error must say what to change"
        return
    assert isinstance(result, (GenerationOutput, ScoreOutput, list)), type(result)
    OUTCOMES["TextStream deltas" if isinstance(result, list) else type(result).__name__] += 1


# ---------------------------------------------------------------------- strategies

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
good_text = st.one_of(
    st.sampled_from(["Where is the stone?", "The river runs north.", "Seven stones lie under the cloud."]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=60).filter(str.strip),
)
bad_text = st.one_of(
    st.text(alphabet=st.one_of(surrogates, st.sampled_from("ab .\n")), min_size=1, max_size=12),
    st.sampled_from(["", "   ", "\n\n", "x" * 3000]),
)
not_text = st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.binary(max_size=8), st.builds(object))
any_text = st.one_of(good_text, good_text, good_text, bad_text, not_text)
good_documents = st.one_of(
    st.none(), st.lists(good_text, min_size=1, max_size=5), st.lists(good_text, min_size=1, max_size=3).map(tuple)
)
bad_documents = st.one_of(
    st.lists(any_text, max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.sets(st.text(max_size=5), max_size=3),
    st.lists(st.text(max_size=5), max_size=3).map(iter),
    not_text,
    any_text,
)
anything = st.one_of(
    not_text, bad_text, st.floats(), st.integers(-3, 5), st.sampled_from([0, 2**63, 10**9, 1e-45, 1e308]),
    st.complex_numbers(max_magnitude=2), st.lists(not_text, max_size=2),
)
good_settings = st.fixed_dictionaries(
    {"max_new_tokens": st.integers(1, 5)},
    optional={
        "stop": st.one_of(st.none(), good_text, st.lists(st.text(max_size=4), max_size=3)),
        "temperature": st.one_of(st.just(0), st.floats(1e-4, 3), st.integers(0, 3)),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(0, 100),
        "seed": st.integers(0, 2**63 - 1),
        "repetition_penalty": st.one_of(st.floats(0.5, 3), st.integers(1, 3)),
        "progress": st.booleans(),
    },
)
bad_setting = st.tuples(
    st.sampled_from(["max_new_tokens", "stop", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
                     "progress", "max_tokens"]),
    st.one_of(anything, st.sampled_from([1025, ["x"] * 33, "y" * 1001, -1])),
)
good_config = st.fixed_dictionaries(
    {},
    optional={
        "chunk_tokens": st.one_of(st.none(), st.integers(16, 200)),
        "keep_chunks": st.integers(1, 5),
        "kv_budget_ratio": st.one_of(st.none(), st.floats(0.01, 1)),
        "snap_window": st.integers(1, 12),
        "pool_kernel": st.sampled_from([1, 3, 7]),
        "prefill_batch_tokens": st.integers(1, 10**6),
        "memory_budget_bytes": st.one_of(st.none(), st.integers(1, 10**12)),
        "calibration_rules": st.sampled_from([(), PAPER_CALIBRATION_RULES]),
        "calibration_query_rows": st.integers(1, 12),
        "calibration_region_tokens": st.integers(1, 200),
        "instruction": good_text,
        "document_separator": good_text,
        "use_chat_template": st.booleans(),
    },
)
bad_config = st.tuples(
    st.sampled_from(["chunk_tokens", "keep_chunks", "kv_budget_ratio", "kv_budget_tokens", "pool_kernel", "instruction",
                     "prefill_batch_tokens", "max_input_chars", "calibration_rules", "attn_implementation", "bogus"]),
    anything,
)


# ---------------------------------------------------------------------- properties


@given(
    data=st.data(),
    surface=st.sampled_from(["generate", "stream", "score"]),
    fault=st.sampled_from([None, None, None, "question", "documents", "context", "setting"]),
    consume=st.integers(0, 3),
    stop_by=st.sampled_from(["break", "close", "drop"]),
)
def test_every_call_ends_in_an_output_or_a_typed_error_and_leaves_the_model_clean(
    setup, data, surface, fault, consume, stop_by
):
    engine, fresh = setup
    question = data.draw(any_text if fault == "question" else good_text, label="question")
    docs = data.draw(bad_documents if fault == "documents" else good_documents, label="documents")
    context = data.draw(any_text, label="context") if fault == "context" else None
    options = data.draw(good_settings, label="settings")
    if fault == "setting":
        name, value = data.draw(bad_setting, label="bad setting")
        options[name] = value

    def call():
        if surface == "generate":
            return engine.generate(question, documents=docs, context=context, **options)
        if surface == "score":
            return engine.score(question, documents=docs, context=context, progress=options.get("progress", False))
        stream = engine.stream(question, documents=docs, context=context, **options)
        deltas = []
        for delta in stream:
            assert isinstance(delta, str) and delta
            deltas.append(delta)
            if len(deltas) >= consume:
                break
        if stop_by == "close":
            stream.close()
        elif stop_by == "drop":
            del stream
        return deltas

    outcome(call)
    probe_equals_fresh(engine, fresh)


@settings(max_examples=40)
@given(
    values=good_config,
    bad=st.one_of(st.none(), bad_config),
    question=st.sampled_from(["Where is the stone?", "Why?"]),
    max_new_tokens=st.integers(1, 4),
)
def test_every_config_builds_a_working_engine_or_fails_typed_and_leaves_the_model_clean(
    setup, values, bad, question, max_new_tokens
):
    engine, fresh = setup
    values = {**values, **dict([bad] if bad else [])}

    def call():
        other = ParallelComp(engine.model, engine.tokenizer, ParallelCompConfig(**values))
        return other.generate(question, documents=PROBE[1] * 3, max_new_tokens=max_new_tokens)

    outcome(call)
    probe_equals_fresh(engine, fresh)
