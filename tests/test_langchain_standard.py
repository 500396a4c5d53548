"""LangChain's own standard test suites (langchain-tests) on `ChatParallelComp`.

Both suites run on a tiny random model (no test of them needs coherent text; about 30 s here),
with a short `max_tokens`. Their async tests need pytest-asyncio's auto mode (pyproject.toml).
Tests switched off, each through the suite's documented properties, with its reason:
`supports_model_override` (one engine holds one model), `max_retries`/`api_key` left out of the
standard parameters (a local engine has no network to retry and no API). Tool calling,
structured output and multimodal inputs are not implemented, so the suite skips those tests.
"""

from __future__ import annotations

import functools

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from parallelcomp import ParallelComp, ParallelCompConfig
from pc_integrations.langchain import ChatParallelComp

from .conftest import tiny_model


@functools.cache
def _tiny_engine() -> ParallelComp:
    from transformers import AutoTokenizer

    from parallelcomp.default_model import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    return ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(chunk_tokens=64))


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
        return {"engine": _tiny_engine(), "max_tokens": 12}
