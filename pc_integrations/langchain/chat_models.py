"""`ChatParallelComp`: a LangChain chat model over a `ParallelCompLLM` (the `ChatHuggingFace` pattern).

A message list goes through `pc_integrations.common.chat_call`: with the tokenizer's chat
template, system messages and earlier turns are rendered by `tokenizer.apply_chat_template` (they
sit in the prompt prefix every chunk sees) and the last message's text is the question, rendered
with its own role (a tool result, or LangGraph's final assistant message before a structured
response); without a template, the list is flattened into one question (`messages_to_prompt`).
An assistant message's tool calls are rendered in the model's tool-call format (`<tool_call>`
blocks, parallelcomp/grammar.py).

Documents go in as kwargs (`chat.invoke(messages, documents=[...])`) and are chunked exactly as in
`ParallelCompLLM`; the routing rule applies to the question. `generation_info` (sources, chunks,
stats, split, model_name) lands in `AIMessage.response_metadata`, token counts in
`AIMessage.usage_metadata`.

Tools and structured output (docs/integrations.md): `bind_tools(tools, tool_choice=...)` and
`with_structured_output(schema, method=...)` bind the `tools`/`tool_choice`/`json_schema`
generation settings, so decoding runs under a grammar and the output always parses. Calls come
back as `AIMessage.tool_calls` (ids `call_<hex>`); streamed, each call's `tool_call_chunks` come
as it is decoded (its id and name once the name is whole, then its arguments' JSON text), as
OpenAI's do, so `with_structured_output(...).stream()` yields partial objects; text before a call
streams as it is decoded. Documents still go in
as chunks, so an agent reasons over a corpus far longer than the window.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.messages.utils import message_chunk_to_message
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough, RunnableSerializable
from langchain_core.runnables.configurable import RunnableConfigurableFields
from langchain_core.runnables.utils import AnyConfigurableField, ConfigurableFieldSpec, get_unique_config_specs
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema as _lc_json_schema
from langchain_core.utils.function_calling import convert_to_openai_tool as _lc_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, model_validator

from parallelcomp import InputError, ParallelCompConfig
from parallelcomp.grammar import closed_schema, format_invalid_tool_call, format_tool_call
from parallelcomp.prompts import ROLES
from parallelcomp.settings import GenerationSettings

from ..common import ToolCallText, aiter_in_thread, by_name, chat_call, flatten_chat
from .llms import ParallelCompLLM, sum_usage, usage_from_info

_LLM_FIELDS = frozenset(ParallelCompLLM.model_fields) - set(BaseChatModel.model_fields) - {"streaming"}
"""The LLM's own fields (`engine`, the generation settings), which the chat takes too."""


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
        """`engine=` and the LLM's fields build the LLM; beside `llm=`, those fields (say
        `temperature=0.7`) apply to a copy of it, which is how `configurable_fields` rebuilds."""
        if not isinstance(data, dict):
            return data
        data = by_name(data)
        settings = {k: data.pop(k) for k in list(data) if k in _LLM_FIELDS}
        if "llm" not in data:
            if "engine" in settings:
                data["llm"] = ParallelCompLLM(**settings)
            return data
        if "engine" in settings:
            raise ValueError("pass llm= or engine=, not both")
        if settings and isinstance(data["llm"], ParallelCompLLM):
            llm = data["llm"]
            data["llm"] = ParallelCompLLM(**{**{k: getattr(llm, k) for k in type(llm).model_fields}, **settings})
        return data

    @classmethod
    def from_pretrained(cls, model: str | None = None, config: ParallelCompConfig | None = None, *,
                        device: str | None = None, dtype: Any = None, **fields: Any) -> ChatParallelComp:
        """Load an engine (a local HF directory; None → the embedded SmolLM2) and wrap it; `fields`
        are the chat's and its LLM's (`max_tokens=64`, `temperature=...`)."""
        return cls(llm=ParallelCompLLM.from_pretrained(model, config, device=device, dtype=dtype), **fields)

    def configurable_fields(self, **kwargs: AnyConfigurableField) -> RunnableSerializable:
        """LangChain's, where a key may also be one of the LLM's settings (`temperature`,
        `max_tokens`, `stop`, ...): `chat.configurable_fields(temperature=ConfigurableField(id="t"))`."""
        fields = by_name(kwargs)
        unknown = sorted(set(fields) - set(type(self).model_fields) - _LLM_FIELDS)
        if unknown:
            keys = sorted(set(type(self).model_fields) | _LLM_FIELDS)
            msg = f"Configuration key {unknown[0]} not found in {type(self).__name__}: available keys are {keys}"
            raise ValueError(msg)
        return _ConfigurableSettings(default=self, fields=fields)

    @property
    def _llm_type(self) -> str:
        return "parallelcomp-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.llm._identifying_params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """The LLM's tracing parameters (this call's and bound settings first), as a chat model."""
        return {**self.llm._get_ls_params(stop=stop, **kwargs), "ls_model_type": "chat"}

    def _resolve_model_profile(self) -> ModelProfile:
        """What LangChain's middleware reads (`chat.profile`). `max_input_tokens` is the model's
        trained window: the chat it reads whole. A longer chat still runs (its longest messages
        become chunks, docs/integrations.md), so `SummarizationMiddleware(trigger=("fraction",
        0.8))` summarizes before any history would be chunked. `structured_output` is left out, so
        `create_agent(response_format=Schema)` keeps `ToolStrategy` (the schema as a tool): given
        a weather tool and a schema, SmolLM2 under `ProviderStrategy` (a call or the JSON answer
        at each step) called the tool again after every result, under `ToolStrategy` it answered
        with the schema's call at once (docs/integrations.md). `ProviderStrategy(Schema)` works
        when asked for. Pass `profile=` to override."""
        return ModelProfile(
            max_input_tokens=self.llm.engine.window, text_inputs=True, text_outputs=True, image_inputs=False,
            image_url_inputs=False, pdf_inputs=False, audio_inputs=False, video_inputs=False, image_outputs=False,
            audio_outputs=False, video_outputs=False, tool_calling=True, tool_choice=True, tool_call_streaming=True,
            temperature=True)

    def _combine_llm_outputs(self, llm_outputs: list[dict | None]) -> dict:
        """`generate(...).llm_output` over a batch, as `ParallelCompLLM`'s and `ChatOpenAI`'s:
        the model name and the token usage summed (each call's is in its `on_llm_end`)."""
        usage = sum_usage([o["token_usage"] for o in llm_outputs if o])
        return {"model_name": self.llm.model_name, "token_usage": usage}

    def get_token_ids(self, text: str) -> list[int]:
        return self.llm.get_token_ids(text)

    def get_num_tokens(self, text: str) -> int:
        return self.llm.get_num_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens of the prompt these messages (and `tools`) become without documents, as the
        engine builds it: the chat template's rendering (`trim_messages(token_counter=chat)`).
        The base class counted "Human: ..." lines and ignored tools."""
        if not messages:
            return 0
        prompt, extra = chat_call(self.llm.engine, _turns(messages))
        formatted = [convert_to_openai_tool(t) for t in tools] if tools else None
        parts = self.llm.engine.prompt_parts(prompt, False, tools=formatted, **extra)
        return len(parts.prefix_ids) + len(parts.question_ids)

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
        kwargs = {k: v for k, v in kwargs.items() if k != "stream"}  # LangChain's per-call switch, decided above us
        prompt, extra = chat_call(self.llm.engine, _turns(messages))
        if "response_format" in kwargs:
            if kwargs.get("json_schema") is not None:
                raise InputError("pass response_format= or json_schema=, not both")
            kwargs = dict(kwargs, json_schema=response_format_schema(kwargs["response_format"]))
            del kwargs["response_format"]
        chunks = self.llm.iter_chunks(prompt, stop, **kwargs, **extra)
        if not kwargs.get("tools"):
            yield from map(_chat_chunk, chunks)
            return
        split = ToolCallText()
        for chunk in chunks:
            if chunk.generation_info is None:
                content = split.feed(chunk.text)
                calls = split.call_deltas()
                if content or calls:
                    yield _chat_chunk(GenerationChunk(text=content), calls)
            else:
                rest, calls, invalid = split.finish()
                yield _chat_chunk(GenerationChunk(text=rest, generation_info=chunk.generation_info),
                                  split.last_deltas(calls, invalid))

    # ------------------------------------------------------------------ tools and structured output

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: str | bool | dict | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Bind tools (anything `convert_to_openai_tool` takes) for every call of the result.

        `tool_choice`: None/"auto" (text and/or calls), "none", "any"/"required"/True (one call),
        a tool name or {"type": "function", "function": {"name": ...}} (one call of that tool).
        `parallel_tool_calls=False`: at most one call in "auto". Every mode decodes under a
        grammar (parallelcomp/grammar.py), and tool arguments always match their schema with no
        undeclared keys, as in OpenAI's strict mode, so `strict` changes nothing. An unknown name
        or a malformed tool raises `InputError` here, not at the first call.
        """
        if strict not in (None, True, False):
            raise InputError(f"strict must be True, False or None, got {strict!r}")
        formatted = [convert_to_openai_tool(t) for t in tools]
        parallel = {k: v for k, v in kwargs.items() if k == "parallel_tool_calls"}
        answer = response_format_schema(kwargs["response_format"]) if "response_format" in kwargs else None
        GenerationSettings.of(tools=formatted, tool_choice=tool_choice, json_schema=answer, **parallel)  # InputError now
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: str = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, dict[str, Any] | Any]:
        """Answers as instances of `schema` (pydantic class, TypedDict or JSON schema dict).

        method: "function_calling" (the schema as a tool the model must call; the model sees its
        description), "json_schema" (the answer is the JSON value itself, under the schema's
        grammar) or "json_mode" (any JSON object). Output always parses: every method decodes
        under a grammar. As in OpenAI's strict mode, objects that declare properties take no other
        keys unless the schema allows them (tool arguments always; "json_schema" unless
        `strict=False`, which keeps the schema as written). `include_raw=True` gives
        {"raw", "parsed", "parsing_error"}. A schema the grammar cannot express raises `InputError`.
        """
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if method not in ("json_schema", "json_mode"):
            raise InputError(f"method must be function_calling, json_schema or json_mode, got {method!r}")
        if kwargs:
            raise InputError(f"unexpected keyword argument(s) {sorted(kwargs)}")
        if strict not in (None, True, False):
            raise InputError(f"strict must be True, False or None, got {strict!r}")
        pydantic_schema = isinstance(schema, type) and is_basemodel_subclass(schema)
        json_schema = response_format_schema(  # OpenAI's response_format for the method: one mapping
            {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema), "strict": strict}}
            if method == "json_schema" else {"type": "json_object"})
        GenerationSettings.of(json_schema=json_schema)  # an unsupported schema raises InputError now
        llm = self.bind(json_schema=json_schema,
                        ls_structured_output_format={"kwargs": {"method": method}, "schema": schema})
        parser = PydanticOutputParser(pydantic_object=schema) if pydantic_schema else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


class _ConfigurableSettings(RunnableConfigurableFields):
    """`ChatParallelComp.configurable_fields`: an LLM setting's spec (type, description, default)
    comes from the LLM; a configured run passes it to the chat's constructor (`_build_llm`)."""

    @property
    def config_specs(self) -> list[ConfigurableFieldSpec]:
        chat = self.default
        own = {k: v for k, v in self.fields.items() if k not in _LLM_FIELDS}
        settings = {k: v for k, v in self.fields.items() if k in _LLM_FIELDS}
        return get_unique_config_specs([
            *RunnableConfigurableFields(default=chat, fields=own).config_specs,
            *RunnableConfigurableFields(default=chat.llm, fields=settings).config_specs,
        ])


def convert_to_openai_tool(tool: Any) -> dict[str, Any]:
    """LangChain's `convert_to_openai_tool`, keeping a recursive pydantic model's references
    (`_recursive_schema`)."""
    formatted = _lc_openai_tool(tool)
    kept = _recursive_schema(tool)
    if kept is not None:
        formatted["function"]["parameters"] = kept
    return formatted


def convert_to_json_schema(schema: Any) -> dict[str, Any]:
    """LangChain's `convert_to_json_schema`, keeping a recursive pydantic model's references."""
    kept = _recursive_schema(schema)
    return _lc_json_schema(schema) if kept is None else {"title": schema.__name__, **kept}


def _recursive_schema(schema: Any) -> dict[str, Any] | None:
    """A recursive pydantic model's own JSON schema, rooted at the model, references kept; None for
    any other schema. LangChain's converters inline every reference and drop a recursive one,
    leaving `{}`, which any value matches, so the grammar would not constrain the recursion."""
    if not (isinstance(schema, type) and is_basemodel_subclass(schema)):
        return None
    full = schema.model_json_schema()
    defs = full.get("$defs", {})
    refs = {name: _refs(d) for name, d in defs.items()}
    if not any(_reaches(refs, name, name, set()) for name in defs):
        return None
    root = defs[full["$ref"].rsplit("/", 1)[1]] if "$ref" in full else {k: v for k, v in full.items() if k != "$defs"}
    return {**{k: v for k, v in root.items() if k != "title"}, "$defs": defs}


def _refs(node: Any) -> set[str]:
    """Names of the `#/$defs/...` references anywhere in `node`."""
    if isinstance(node, list):
        return set().union(*map(_refs, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    own = {node["$ref"].rsplit("/", 1)[1]} if str(node.get("$ref", "")).startswith("#/$defs/") else set()
    return own.union(*map(_refs, node.values()))


def _reaches(refs: dict[str, set[str]], start: str, goal: str, seen: set[str]) -> bool:
    for name in refs.get(start, ()):
        if name == goal or (name not in seen and _reaches(refs, name, goal, seen | {name})):
            return True
    return False


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The `json_schema` setting of OpenAI's `response_format` (what LangChain's `ProviderStrategy`
    binds, and `ChatOpenAI` takes): {"type": "json_schema", "json_schema": {"schema", "strict"}},
    {"type": "json_object"}, {"type": "text"} or a pydantic class or TypedDict. The schema is
    closed to undeclared keys unless `strict` is False, as in `with_structured_output`."""
    if isinstance(response_format, type):
        try:
            return closed_schema(convert_to_json_schema(response_format))
        except (ValueError, TypeError) as err:
            raise InputError(f"response_format {response_format.__name__} is not a pydantic class or TypedDict: "
                             f"{err}") from None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    spec = response_format.get("json_schema") if kind == "json_schema" else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
        raise InputError("response_format must be {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': "
                         "{...}}}, {'type': 'json_object'}, {'type': 'text'} or a pydantic class, "
                         f"got {response_format!r:.120}")
    return spec["schema"] if spec.get("strict") is False else closed_schema(spec["schema"])


def messages_to_prompt(messages: list[BaseMessage]) -> str:
    """The one question string a message list becomes for a model without a chat template."""
    return flatten_chat(_turns(messages))


_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "function": "tool",
          "developer": "system"}
"""Message types, and ChatMessage roles outside ROLES, as chat-template roles ("developer": OpenAI's
name for the system role of reasoning models)."""
_MEDIA = ("image", "image_url", "audio", "input_audio", "video", "file", "document")
"""Content block types (LangChain's standard blocks and OpenAI's) that hold no text."""


def _turns(messages: Any) -> list[tuple[str, str]]:
    if not messages:
        raise InputError("no messages: pass at least one user message")
    turns = []
    for i, m in enumerate(messages):
        role = _ROLES.get(getattr(m, "type", None)) or (_ROLES.get(m.role, m.role) if isinstance(m, ChatMessage) else None)
        if role not in ROLES:
            raise InputError(f"message {i} ({type(m).__name__}) has no chat role among {ROLES}")
        media = [b.get("type") for b in m.content if isinstance(b, dict) and b.get("type") in _MEDIA] \
            if isinstance(m.content, list) else []
        if media:
            raise InputError(f"message {i} holds {', '.join(map(repr, media))} content: this engine reads text only; "
                             "pass the text")
        turns.append((role, _text(m)))
    return turns


def _text(message: BaseMessage) -> str:
    """A message's text; an assistant message's tool calls follow it as `<tool_call>` blocks, the
    ones whose arguments did not parse as the model wrote them."""
    if not isinstance(message, AIMessage):
        return message.text
    calls = [format_tool_call(c["name"], c["args"]) for c in message.tool_calls]
    calls += [format_invalid_tool_call(c.get("name"), c.get("args")) for c in message.invalid_tool_calls]
    return "\n".join(p for p in [message.text, *calls] if p)


def _chat_chunk(chunk: GenerationChunk, calls: Sequence[dict] = ()) -> ChatGenerationChunk:
    """`calls`: `ToolCallText.call_deltas`, one tool-call chunk each (LangChain merges a call's
    chunks by index and parses the joined arguments; unparsable ones land in invalid_tool_calls)."""
    info = chunk.generation_info
    chunks = [tool_call_chunk(**call) for call in calls]
    message = AIMessageChunk(content=chunk.text, tool_call_chunks=chunks)
    if info is not None:  # the last chunk: usage and end of stream
        usage = usage_from_info(info)
        message = AIMessageChunk(
            content=chunk.text,
            tool_call_chunks=chunks,
            usage_metadata=UsageMetadata(
                input_tokens=usage["prompt_tokens"],
                output_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"],
            ),
            chunk_position="last",
        )
    return ChatGenerationChunk(message=message, generation_info=info)


def _result(chunks: list[ChatGenerationChunk]) -> ChatResult:
    """The streamed chunks merged into one message, exactly as a caller merging `stream()` gets it."""
    info = next((c.generation_info for c in reversed(chunks) if c.generation_info), None)
    merged = chunks[0].message
    for c in chunks[1:]:
        merged += c.message
    llm_output = {"model_name": (info or {}).get("model_name", ""), "token_usage": usage_from_info(info)}
    return ChatResult(generations=[ChatGeneration(message=message_chunk_to_message(merged), generation_info=info)],
                      llm_output=llm_output)
