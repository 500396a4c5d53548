"""`ChatParallelComp`: a LangChain chat model over a `ParallelCompLLM` (the `ChatHuggingFace` pattern).

The engine builds its own single-turn chat prompt, so a message list becomes one question:

    system messages (their text, in order)
    earlier turns as a transcript ("User: ...", "Assistant: ...", "Tool: ...")
    the last message's text (a user or tool message: the turn to answer)

joined by blank lines. Documents go in as kwargs (`chat.invoke(messages, documents=[...])`) and
are chunked exactly as in `ParallelCompLLM`; the prompt-splitting rule applies to the rendered
text. `generation_info` (sources, chunks, stats) lands in `AIMessage.response_metadata`, token
counts in `AIMessage.usage_metadata`. Tool calling (`bind_tools`) is not implemented: small
local models do not emit reliable tool calls; expose the corpus to agents with
`create_parallelcomp_tool` instead.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, SystemMessage, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from pydantic import ConfigDict, model_validator

from parallelcomp import InputError

from ..common import aiter_in_thread
from .llms import ParallelCompLLM, usage_from_info

_ROLES = {"human": "User", "ai": "Assistant", "tool": "Tool", "function": "Tool", "chat": "User"}


class ChatParallelComp(BaseChatModel):
    """Chat-message front end of `ParallelCompLLM`: `ChatParallelComp(llm=ParallelCompLLM(engine=pc))`.

    `ChatParallelComp(engine=pc, max_new_tokens=64)` is a shortcut that builds the LLM.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    llm: ParallelCompLLM
    """Does the generation; its fields (max_new_tokens, temperature, stop, timeout, ...) apply here."""
    streaming: bool = False
    """`invoke` streams internally, so every token reaches `on_llm_new_token` (LangChain's
    standard `streaming` parameter)."""

    @model_validator(mode="before")
    @classmethod
    def _build_llm(cls, data: Any) -> Any:
        if isinstance(data, dict) and "llm" not in data and "engine" in data:
            own = set(BaseChatModel.model_fields) | {"streaming"}
            llm_fields = (set(ParallelCompLLM.model_fields) | {"max_tokens"}) - own
            data = dict(data)
            data["llm"] = ParallelCompLLM(**{k: data.pop(k) for k in list(data) if k in llm_fields})
        return data

    @property
    def _llm_type(self) -> str:
        return "parallelcomp-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.llm._identifying_params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(ls_provider="parallelcomp", ls_model_name=kwargs.get("model") or self.llm.model_name)
        params.update(ls_temperature=self.llm.temperature, ls_max_tokens=self.llm.max_new_tokens)
        if self.llm.stop:
            params["ls_stop"] = self.llm.stop
        return params

    def get_token_ids(self, text: str) -> list[int]:
        return self.llm.get_token_ids(text)

    def get_num_tokens(self, text: str) -> int:
        return self.llm.get_num_tokens(text)

    # ------------------------------------------------------------------ generation

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _result(list(self._iter_chunks(messages, stop, kwargs)))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _result([c async for c in aiter_in_thread(lambda: self._iter_chunks(messages, stop, kwargs))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in self._iter_chunks(messages, stop, kwargs):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in aiter_in_thread(lambda: self._iter_chunks(messages, stop, kwargs)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def _iter_chunks(self, messages: list[BaseMessage], stop: Any, kwargs: dict) -> Iterator[ChatGenerationChunk]:
        for chunk in self.llm.iter_chunks(messages_to_prompt(messages), stop, **kwargs):
            yield _chat_chunk(chunk)


def messages_to_prompt(messages: list[BaseMessage]) -> str:
    """The one question string a message list becomes (rule in the module docstring)."""
    if not messages:
        raise InputError("no messages: pass at least one user message")
    last = messages[-1]
    if isinstance(last, (AIMessage, SystemMessage)):
        msg = f"the last message is a {type(last).__name__}; end the list with the user (or tool) turn to answer"
        raise InputError(msg)
    system = [m.text for m in messages if isinstance(m, SystemMessage)]
    turns = [m for m in messages[:-1] if not isinstance(m, SystemMessage)]
    history = [f"{_ROLES.get(m.type, m.type.title())}: {_text(m)}" for m in turns]
    tail = f"Tool: {_text(last)}" if isinstance(last, ToolMessage) else last.text
    return "\n\n".join(p for p in [*system, *history, tail] if p.strip())


def _text(message: BaseMessage) -> str:
    if isinstance(message, AIMessage) and message.tool_calls and not message.text:
        return "; ".join(f"calls {c['name']}({c['args']})" for c in message.tool_calls)
    return message.text


def _chat_chunk(chunk: GenerationChunk) -> ChatGenerationChunk:
    info = chunk.generation_info
    message = AIMessageChunk(content=chunk.text)
    if info is not None:  # the last chunk: usage and end of stream
        usage = usage_from_info(info)
        message = AIMessageChunk(
            content=chunk.text,
            usage_metadata=UsageMetadata(
                input_tokens=usage["prompt_tokens"],
                output_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"],
            ),
            chunk_position="last",
        )
    return ChatGenerationChunk(message=message, generation_info=info)


def _result(chunks: list[ChatGenerationChunk]) -> ChatResult:
    info = next((c.generation_info for c in reversed(chunks) if c.generation_info), None)
    last = chunks[-1].message
    message = AIMessage(content="".join(c.text for c in chunks), usage_metadata=last.usage_metadata)
    return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])
