"""LangChain's own standard test suites (langchain-tests) on `ChatParallelComp`.

Three classes, so that every test runs once, on the cheapest model it can pass on:
- `TestChatParallelCompUnit` (tiny random model): the whole unit suite, including `bind_tools`
  over every tool type and `with_structured_output` for every method.
- `TestChatParallelCompIntegration` (tiny random model, short `max_tokens`): every integration
  test except CONTENT_TESTS, tool-message histories included.
- `TestChatParallelCompTools` (the embedded SmolLM2-135M, marked slow): CONTENT_TESTS only.
  These assert what the model writes (`args == {"input": 3}` read from the question, a joke whose
  strings end, a non-empty argument), which random weights cannot write. Each class skips the
  other's tests, with that reason (an autouse fixture; the suite forbids overriding its tests
  except to mark an expected failure).

`has_tool_calling`, `has_tool_choice` and `has_structured_output` are derived by the suite
(`bind_tools` is overridden and takes `tool_choice`), so forced calls use `tool_choice="any"`;
every tool call and structured answer is grammar-constrained (parallelcomp/grammar.py).
Switched off, each through the suite's documented properties, with its reason:
`supports_model_override` (one engine holds one model), `max_retries`/`api_key` left out of the
standard parameters (a local engine has no network to retry and no API). Multimodal inputs are
not supported (text-only models), so the suite skips those. An expected failure is marked with
its reason below. Async tests need pytest-asyncio's auto mode (pyproject.toml).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from parallelcomp import ParallelComp, ParallelCompConfig, StructuredOutputError
from pc_integrations.langchain import ChatParallelComp

from .conftest import tiny_model


@functools.cache
def _tiny_engine() -> ParallelComp:
    from transformers import AutoTokenizer

    from parallelcomp.default_model import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    return ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(chunk_tokens=64))


@functools.cache
def _smol_engine() -> ParallelComp:
    # float32: greedy bf16 output differs between CPU kernels (AMX vs AVX-512 BF16), and what
    # these tests assert is what the model writes. In bf16 on an AMD EPYC (AVX-512 BF16, no AMX)
    # SmolLM2 closed test_json_mode's joke after "setup" alone; float32 writes both keys there.
    return ParallelComp.from_pretrained(dtype=torch.float32)


class _Standard:
    @property
    def chat_model_class(self) -> type[ChatParallelComp]:
        return ChatParallelComp

    @property
    def standard_chat_model_params(self) -> dict:
        # Left out: `max_retries` and (unit suite) `api_key`. A local engine has no transient
        # network failures to retry and no API, so ChatParallelComp refuses them like any
        # unknown setting; temperature, max_tokens, timeout and stop are accepted.
        params = dict(super().standard_chat_model_params)
        for name in ("max_retries", "api_key"):
            params.pop(name, None)
        return params

    @property
    def supports_model_override(self) -> bool:
        return False  # one engine holds one model: a per-call `model=` is refused


class TestChatParallelCompUnit(_Standard, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {"engine": _tiny_engine()}


class TestChatParallelCompIntegration(_Standard, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {"engine": _tiny_engine(), "max_tokens": 40}  # a forced call without arguments: ~30 tokens

    @pytest.fixture(autouse=True)
    def _model_independent_only(self, request):
        if request.node.originalname in CONTENT_TESTS:
            pytest.skip("asserts what the model writes, which random weights cannot: runs on SmolLM2 in "
                        "TestChatParallelCompTools")


CONTENT_TESTS = {
    "test_tool_calling", "test_tool_calling_async", "test_bind_runnables_as_tools", "test_tool_choice",
    "test_structured_few_shot_examples", "test_structured_output", "test_structured_output_async",
    "test_structured_output_pydantic_2_v1", "test_structured_output_optional_param", "test_json_mode",
    "test_agent_loop", "test_unicode_tool_call_integration",
}


FULL_ONLY = {
    "test_tool_calling_async": "the async twin of test_tool_calling, which runs here; ChatParallelComp's ainvoke "
                               "is checked equal to invoke in tests/test_langchain.py "
                               "(test_chat_model_renders_history_with_the_chat_template)",
    "test_structured_output_async": "the async twin of test_structured_output, which runs here for the same three "
                                    "schema kinds; ainvoke equals invoke in tests/test_langchain.py",
    "test_structured_output_pydantic_2_v1": "test_structured_output with a pydantic.v1 model (which runs here for "
                                            "pydantic 2, TypedDict and JSON schema); 32 s of SmolLM2 on 2 cores",
}
"""Standard content tests left to PARALLELCOMP_STANDARD_FULL=1, each a variant of one that runs
here; together about 1.5 min of SmolLM2 on the 2-core machine (idle, 2026-12-01). Every other
content test, the two strict xfails included, runs in CI."""


@pytest.mark.slow
class TestChatParallelCompTools(_Standard, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _content_only(self, request):
        if request.node.originalname not in CONTENT_TESTS:
            pytest.skip("does not depend on what the model writes: runs on the tiny model in "
                        "TestChatParallelCompIntegration")
        if request.node.originalname in FULL_ONLY and os.environ.get("PARALLELCOMP_STANDARD_FULL") != "1":
            pytest.skip(FULL_ONLY[request.node.originalname] + "; PARALLELCOMP_STANDARD_FULL=1 runs it")

    @property
    def chat_model_params(self) -> dict:
        # Without a repetition penalty the 135M model repeats a clause inside the joke's JSON
        # string until the token limit; 1.3 is too strong (it writes 10 for the 3 in the
        # question); 1.05 passes both. 80 tokens hold every call and answer the suite asks for.
        return {"engine": _smol_engine(), "max_tokens": 80, "repetition_penalty": 1.05}

    @property
    def supports_json_mode(self) -> bool:
        return True  # with_structured_output(method="json_mode"): any JSON object, by grammar

    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)  # as in the suite
    @pytest.mark.xfail(strict=True, reason=(
        "model capability: the test binds get_weather without tool_choice, so the model must decide "
        "to call it; SmolLM2-135M answers 'What is the weather in San Francisco, CA?' in text (the "
        "'auto' grammar allows text or a call). Forced calls pass (test_tool_calling, test_tool_choice)."))
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(strict=True, raises=StructuredOutputError, reason=(
        "model capability: SmolLM2-135M does not finish the call's Chinese and emoji argument strings within "
        "max_tokens=80; the grammar then raises StructuredOutputError instead of returning a cut call"))
    def test_unicode_tool_call_integration(self, model) -> None:
        super().test_unicode_tool_call_integration(model)

