"""`ChatParallelComp`: a LangChain chat model over a `ParallelCompLLM` (the `ChatHuggingFace` pattern).

A message list goes through `pc_integrations.common.chat_call`: with the tokenizer's chat
template, system messages and earlier turns are rendered by `tokenizer.apply_chat_template` (they
sit in the prompt prefix every chunk sees) and the last message's text is the question; without a
template, the list is flattened into one question (`messages_to_prompt`). The last message must
be a user or tool message. An assistant message's tool calls are rendered as text
("calls name(args)").

Documents go in as kwargs (`chat.invoke(messages, documents=[...])`) and are chunked exactly as in
`ParallelCompLLM`; the routing rule applies to the question. `generation_info` (sources, chunks,
stats, split, model_name) lands in `AIMessage.response_metadata`, token counts in
`AIMessage.usage_metadata`. Tool calling (`bind_tools`) is not implemented: expose the corpus to
agents with `create_parallelcomp_tool` instead.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from pydantic import ConfigDict, model_validator

from parallelcomp import InputError

from ..common import ROLES, aiter_in_thread, chat_call, flatten_chat
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
        if "history" in kwargs:
            raise InputError("a chat model takes its history from the messages; do not pass history=")
        prompt, extra = chat_call(self.llm.engine, _turns(messages))
        for chunk in self.llm.iter_chunks(prompt, stop, **kwargs, **extra):
            yield _chat_chunk(chunk)


def messages_to_prompt(messages: list[BaseMessage]) -> str:
    """The one question string a message list becomes for a model without a chat template."""
    return flatten_chat(_turns(messages))


_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "function": "tool"}


def _turns(messages: Any) -> list[tuple[str, str]]:
    if not messages:
        raise InputError("no messages: pass at least one user message")
    turns = []
    for i, m in enumerate(messages):
        role = _ROLES.get(getattr(m, "type", None)) or (m.role if isinstance(m, ChatMessage) else None)
        if role not in ROLES:
            raise InputError(f"message {i} ({type(m).__name__}) has no chat role among {ROLES}")
        turns.append((role, _text(m)))
    role = turns[-1][0]
    if role not in ("user", "tool"):
        last = type(messages[-1]).__name__
        raise InputError(f"the last message is a {last}; end the list with the user (or tool) turn to answer")
    return turns


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
