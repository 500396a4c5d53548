"""`ParallelCompLLM`: a LlamaIndex `FunctionCallingLLM` over one `parallelcomp.ParallelComp` engine.

`Settings.llm = ParallelCompLLM(engine)` and `index.as_query_engine(llm=...)` work as with any
LlamaIndex LLM, with LlamaIndex's own prompts and response modes (compact, refine,
tree_summarize, ...). It is a chat model to LlamaIndex, so prompts arrive as messages (`chat`),
rendered by the tokenizer's chat template; the text to answer goes through the shared routing rule
(`pc_integrations.common.route`), so a stuffed "context ... Query: ... Answer:" prompt far
longer than the model's window is split into its question and a corpus that the engine chunks,
scores and evicts. `metadata.context_window` is the prompt length always accepted, so
LlamaIndex packs all retrieved text into one call. The `ParallelCompSynthesizer`
(synthesizer.py) instead passes every retrieved node as one document through
`complete(question, documents=[...])`, the same code path.

Errors: a rejected call raises `common.CallError` (its cause is the `InputError`), never a
ValueError, which LlamaIndex's synthesizers would swallow into "Empty Response".

Function calling (`FunctionAgent`, `predict_and_call`, `structured_predict`): the tools go to the
engine as the `tools`/`tool_choice` generation settings ("required" when `tool_required=True`),
so the calls are grammar-constrained and always parse (parallelcomp/grammar.py). A response's
calls are in `message.additional_kwargs["tool_calls"]` ({"id": "call_<hex>", "name",
"arguments"} each); an assistant message carrying them is rendered back into the prompt in the
model's tool-call format.

The async methods run the engine in a worker thread (`asyncio.to_thread`,
`common.aiter_in_thread`): the event loop is never blocked, and concurrent calls queue on the
engine's lock. A stream the consumer stops reading is closed, which frees the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Mapping, Optional, Sequence, Union

from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    DocumentBlock,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json
from llama_index.core.program.function_program import get_function_tool
from llama_index.core.program.utils import get_program_for_llm
from llama_index.core.prompts import PromptTemplate
from llama_index.core.types import PydanticProgramMode

from parallelcomp import (
    ConfigError, InputError, ParallelComp, ParallelCompConfig, ParallelCompError, StructuredOutputError
)
from parallelcomp.grammar import format_tool_call
from parallelcomp.settings import GenerationSettings, Integer, Number
from pc_integrations.common import (
    CALL_KEYS,
    CONTEXT_MARKER,
    SETTING_ALIASES,
    CallError,
    Run,
    ToolCallText,
    aiter_in_thread,
    call_settings,
    chat_call,
    token_usage,
)

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

CALL_KWARGS = frozenset([*GenerationSettings.names(), *SETTING_ALIASES, *CALL_KEYS, "instruction"])
"""Keyword arguments `complete`/`stream_complete` use; others LlamaIndex may add are ignored, as
HuggingFaceLLM does."""

TEXT_QA_TEMPLATE = PromptTemplate("{context_str}" + CONTEXT_MARKER + "{query_str}")
"""For LlamaIndex's own synthesizers (`as_query_engine(llm=pc_llm, text_qa_template=...)`): the
packed context goes to the engine as context, the query as the question. Optional: their
default templates are split by the routing rule too."""

REFINE_TEMPLATE = PromptTemplate(
    "{context_msg}" + CONTEXT_MARKER + "{query_str}\n\n"
    "An earlier answer, from other documents, was: {existing_answer}\n"
    "Improve it if the documents above allow it; otherwise repeat it."
)


class ParallelCompLLM(FunctionCallingLLM):
    """A LlamaIndex LLM answering over inputs far longer than the model's trained window.

    Build it around a ready engine, `ParallelCompLLM(engine, max_new_tokens=...)`, or load one
    with `ParallelCompLLM.from_pretrained(model=None)` (None: the embedded SmolLM2-135M).
    """

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Integer = Field(default=256, description="Tokens to generate at most (alias max_tokens).")
    temperature: Number = Field(default=0.0, description="0 = greedy decoding.")
    top_p: Number = Field(default=1.0, description="Nucleus sampling mass.")
    top_k: Integer = Field(default=0, description="Top-k sampling; 0 = off.")
    seed: Optional[Integer] = Field(default=None, description="Sampling seed (temperature > 0).")
    repetition_penalty: Number = Field(default=1.0, description="> 1 discourages repeats; 1 = off.")
    stop: Optional[list[str]] = Field(default=None, description="String stop sequences.")
    progress: bool = Field(default=False, description="Show a prefill progress bar on stderr.")
    timeout: Optional[Number] = Field(default=None, gt=0, description="Seconds a call may take (checked per token).")
    instruction: Optional[str] = Field(
        default=None, description="Instruction before the documents; None: the engine config's."
    )

    _engine: ParallelComp = PrivateAttr()
    _variants: dict = PrivateAttr(default_factory=dict)
    _longest: tuple[int, int] = PrivateAttr(default=(-1, 1))  # (vocabulary size, longest token string)

    def __init__(self, engine: ParallelComp, **kwargs: Any) -> None:
        if not isinstance(engine, ParallelComp):
            msg = f"engine must be a parallelcomp.ParallelComp, got {type(engine).__name__}"
            raise ConfigError(msg)
        if "max_tokens" in kwargs:  # LangChain/OpenAI's name
            if "max_new_tokens" in kwargs:
                raise ConfigError("pass max_tokens or max_new_tokens (the same setting), not both")
            kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
        hooks = [h for h in ("messages_to_prompt", "completion_to_prompt", "query_wrapper_prompt")
                 if kwargs.get(h) is not None]
        if hooks:
            raise ConfigError(f"{' and '.join(hooks)} would be ignored: prompts are built by the tokenizer's chat "
                              "template (ParallelCompConfig.use_chat_template); format the text before the call")
        super().__init__(**kwargs)
        self._engine = engine
        call_settings(self.settings(), {})  # one validation for every per-call setting (InputError)

    def settings(self) -> dict[str, Any]:
        """The instance's defaults for every per-call setting (`common.call_settings`)."""
        return {name: getattr(self, name) for name in [*GenerationSettings.default_names(), "timeout"]}

    @classmethod
    def from_pretrained(
        cls,
        model: Optional[str] = None,
        config: Optional[ParallelCompConfig] = None,
        device: Optional[str] = None,
        **kwargs: Any,
    ) -> "ParallelCompLLM":
        """Load the engine (a local HF directory; None → the embedded SmolLM2) and wrap it."""
        return cls(ParallelComp.from_pretrained(model, config=config, device=device), **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "ParallelCompLLM"

    @property
    def engine(self) -> ParallelComp:
        return self._engine

    @property
    def context_window(self) -> int:
        """The prompt length, in tokens, that is always accepted: the engine reads up to
        `max_input_chars` characters, and no token of the vocabulary is longer than the longest
        token string. Longer-than-window prompts are split by the routing rule and chunked.
        The longest token is found once per vocabulary size: LlamaIndex reads `metadata` at every
        call, on the event loop too, and the scan took 35 ms over SmolLM2's 49K tokens."""
        tokenizer = self._engine.tokenizer
        if self._longest[0] != len(tokenizer):
            self._longest = (len(tokenizer), max(len(token) for token in tokenizer.get_vocab()))
        return self._engine.config.max_input_chars // self._longest[1]

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            # LlamaIndex then sends chats, chat prompts and `system_prompt` as messages (`chat`),
            # which the engine renders with the tokenizer's chat template (or flattens without one)
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._engine.model_name,
        )

    # ------------------------------------------------------------------ the one engine call

    def engine_for(self, instruction: Optional[str]) -> ParallelComp:
        """The engine, or a shallow copy with another instruction (same model, tokenizer and
        run lock, so runs still queue one at a time)."""
        instruction = instruction or self.instruction
        if instruction is None or instruction == self._engine.config.instruction:
            return self._engine
        if instruction not in self._variants:
            variant = copy.copy(self._engine)
            variant.config = self._engine.config.replace(instruction=instruction)
            self._variants[instruction] = variant
        return self._variants[instruction]

    def _start(self, prompt: Any, kwargs: dict) -> Run:
        """Validate and set up one run (no model work yet). `documents=[...]` (str, nodes,
        NodeWithScore, LangChain Documents) makes `prompt` the question and each document one
        input of the engine; otherwise the routing rule splits the prompt."""
        kwargs = {k: v for k, v in kwargs.items() if k in CALL_KWARGS}
        with _rejected():
            return Run(self.engine_for(kwargs.pop("instruction", None)), prompt, kwargs, self.settings())

    @staticmethod
    def _final(text: str, run: Run, delta: Optional[str] = None) -> CompletionResponse:
        """`raw` is a dict, as LlamaIndex's own LLMs give (its TokenCountingHandler reads
        raw["usage"] and fails on anything dict() cannot take): the run's `GenerationOutput`
        under "output", token counts under "usage"."""
        info = run.info()
        raw = {"output": run.output, "usage": token_usage(info["stats"])}
        return CompletionResponse(text=text, delta=delta, raw=raw, additional_kwargs=info)

    def _completion(self, prompt: Any, formatted: bool, kwargs: dict) -> Run:
        """A completion's run. `system_prompt` leads an unformatted prompt as a system turn, as
        HuggingFaceLLM puts it before one; a `formatted` prompt (LlamaIndex's own `predict` for
        completion models formats it and adds `system_prompt` itself) is taken as it is."""
        if self.system_prompt and not formatted and isinstance(prompt, str):
            return self._chat_start([("system", self.system_prompt), ("user", prompt)], kwargs)
        return self._start(prompt, kwargs)

    def _complete(self, prompt: Any, formatted: bool, kwargs: dict) -> CompletionResponse:
        responses = self._responses(self._completion(prompt, formatted, kwargs))
        with contextlib.closing(responses):
            *_, last = responses
        return last

    def _responses(self, run: Run) -> Iterator[CompletionResponse]:
        """One response per text delta, then a last one (delta "") carrying the run's output
        in `raw` and attribution/stats in `additional_kwargs`. Closing it closes the run."""
        text = ""
        with _rejected(), contextlib.closing(run.deltas()) as deltas:
            for delta in deltas:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
        yield self._final(text, run, delta="")

    # ------------------------------------------------------------------ LlamaIndex API

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, formatted, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._responses(self._completion(prompt, formatted, kwargs))  # bad input raises here, not mid-stream

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await _last(lambda: self._responses(self._completion(prompt, formatted, kwargs)))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        run = await asyncio.to_thread(self._completion, prompt, formatted, kwargs)  # chunking takes a while

        async def gen() -> CompletionResponseAsyncGen:
            async for response in aiter_in_thread(lambda: self._responses(run)):
                yield response

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """A chat history through the tokenizer's chat template (`common.chat_call`)."""
        *_, last = self._chat_responses(messages, kwargs)
        return last

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_responses(messages, kwargs)

    def _chat_responses(self, messages: Sequence[ChatMessage], kwargs: dict) -> Iterator[ChatResponse]:
        return self._chat_run(messages, kwargs)()

    def _chat_run(self, messages: Sequence[ChatMessage], kwargs: dict) -> Callable[[], Iterator[ChatResponse]]:
        """The chat's run, started (its input validated); called, its responses. `system_prompt`
        leads the chat as a system turn unless the chat already starts with it (LlamaIndex's
        `predict` adds it to a chat prompt's messages itself)."""
        with _rejected():
            turns = _turns(messages)
        if self.system_prompt and turns and turns[:1] != [("system", self.system_prompt)]:
            turns.insert(0, ("system", self.system_prompt))
        run = self._chat_start(turns, kwargs)
        return lambda: _as_chat(self._responses(run), ToolCallText() if kwargs.get("tools") else None)

    def _chat_start(self, turns: list[tuple[str, str]], kwargs: dict) -> Run:
        with _rejected():
            prompt, extra = chat_call(self._engine, turns)
        return self._start(prompt, {**kwargs, **extra})

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await _last(lambda: self._chat_responses(messages, kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        responses = await asyncio.to_thread(self._chat_run, messages, kwargs)  # chunking takes a while

        async def gen() -> ChatResponseAsyncGen:
            async for response in aiter_in_thread(responses):
                yield response

        return gen()


    # ------------------------------------------------------------------ function calling

    def _prepare_chat_with_tools(
        self,
        tools: Sequence["BaseTool"],
        user_msg: Optional[Union[str, ChatMessage]] = None,
        chat_history: Optional[List[ChatMessage]] = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Optional[Union[str, dict]] = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The `chat` arguments of a call with `tools`: "required" when `tool_required`, unless a
        `tool_choice` (a tool name, "auto", "none", ...) is given; at most one call unless
        `allow_parallel_tool_calls` (the grammar's `parallel_tool_calls`)."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        choice = tool_choice if tool_choice is not None else ("required" if tool_required else "auto")
        openai_tools = [t.metadata.to_openai_tool() for t in tools]
        return {"messages": messages, "tools": openai_tools or None, "tool_choice": choice,
                "parallel_tool_calls": allow_parallel_tool_calls, **kwargs}

    def _structured_stream_call(self, output_cls: type, prompt: PromptTemplate,
                                llm_kwargs: Optional[dict[str, Any]] = None, **prompt_args: Any) -> Any:
        return _forced_program(self, output_cls, prompt).stream_call(llm_kwargs=llm_kwargs, **prompt_args)

    async def _structured_astream_call(self, output_cls: type, prompt: PromptTemplate,
                                       llm_kwargs: Optional[dict[str, Any]] = None, **prompt_args: Any) -> Any:
        return await _forced_program(self, output_cls, prompt).astream_call(llm_kwargs=llm_kwargs, **prompt_args)

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> List[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls", [])
        if not calls and error_on_no_tool_call:
            msg = f"the model answered without a tool call ({response.message.content!r:.80}); pass tool_required=True"
            raise NoToolCallError(msg)
        return [ToolSelection(tool_id=c["id"], tool_name=c["name"], tool_kwargs=c["arguments"]) for c in calls]


class NoToolCallError(StructuredOutputError, ValueError):
    """`get_tool_calls_from_response` found no call: also a ValueError, as LlamaIndex's own LLMs raise."""


async def _last(responses: Callable[[], Iterator[Any]]) -> Any:
    """The last of `responses()`, run in a worker thread (`aiter_in_thread`): cancelling the
    awaiting task stops the engine at its next token, which `asyncio.to_thread` could not."""
    last = None
    async for last in aiter_in_thread(responses):
        pass
    return last


@contextlib.contextmanager
def _rejected() -> Iterator[None]:
    """Re-raise a ParallelComp ValueError/TypeError as `CallError` (see the module docstring)."""
    try:
        yield
    except ParallelCompError as err:
        if isinstance(err, (ValueError, TypeError)):
            raise CallError(str(err)) from err
        raise


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "chatbot": "assistant",
          "model": "assistant", "tool": "tool", "function": "tool"}


_MEDIA = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)
"""Content blocks that hold no text."""


def _turns(messages: Any) -> list[tuple[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"messages must be a list of ChatMessage, got {type(messages).__name__}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, ChatMessage):
            raise InputError(f"message {i} is a {type(m).__name__}, expected a ChatMessage")
        media = [type(b).__name__ for b in m.blocks if isinstance(b, _MEDIA)]
        if media:
            raise InputError(f"message {i} holds {', '.join(media)}: this engine reads text only; pass the text")
        calls = [_call_text(i, c) for c in m.additional_kwargs.get("tool_calls") or []]
        calls += [_call_text(i, {"name": b.tool_name, "arguments": b.tool_kwargs})
                  for b in m.blocks if isinstance(b, ToolCallBlock)]
        text = "\n".join(p for p in [m.content or "", *calls] if p)
        turns.append((_ROLES[MessageRole(m.role).value], text))
    return turns


def _call_text(i: int, call: Any) -> str:
    """A tool call of message i's history as the model writes it: ours ({"name", "arguments"}),
    OpenAI's ({"function": {"name", "arguments": JSON text}}) or a ToolCallBlock's."""
    function = call.get("function", call) if isinstance(call, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    arguments = function.get("arguments", {}) if isinstance(function, Mapping) else None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            arguments = None
    if not isinstance(name, str) or not isinstance(arguments, Mapping):
        raise InputError(f"message {i}: a tool call must be {{'name': str, 'arguments': dict or JSON text}} "
                         f"(or OpenAI's {{'function': {{...}}}}), got {call!r:.120}")
    return format_tool_call(name, arguments)


def _forced_program(llm: ParallelCompLLM, output_cls: type, prompt: PromptTemplate) -> Any:
    """LlamaIndex's program for `(a)stream_structured_predict`, with its tool call forced: the
    `FunctionCallingProgram`'s stream calls, unlike its `__call__`, do not pass `tool_required`,
    so under "auto" a model may answer in text and the stream then yields empty objects."""
    forced = {}
    if llm.pydantic_program_mode == PydanticProgramMode.DEFAULT:  # our FunctionCallingProgram
        forced["tool_choice"] = get_function_tool(output_cls).metadata.name
    return get_program_for_llm(output_cls, prompt, llm, pydantic_program_mode=llm.pydantic_program_mode, **forced)


def _calls_so_far(split: ToolCallText, parsed: dict[str, tuple[str, dict]]) -> list[dict]:
    """The calls `split` has begun, {"id", "name", "arguments": dict}: the arguments parsed with
    LlamaIndex's `parse_partial_json`. `parsed` (id → (arguments' text, arguments)) is kept across
    a stream: a call's text is parsed again only when it grew, and where the text so far does not
    parse the call keeps its last arguments."""
    calls = []
    for _, call_id, name, text in split.begun():
        seen, arguments = parsed.get(call_id, (None, {}))
        if text != seen:
            try:
                fresh = parse_partial_json(text) if text else {}
            except ValueError:
                fresh = None
            arguments = fresh if isinstance(fresh, dict) else arguments
            parsed[call_id] = (text, arguments)
        calls.append({"id": call_id, "name": name, "arguments": arguments})
    return calls


def _as_chat(responses: Iterator[CompletionResponse], split: Optional[ToolCallText]) -> Iterator[ChatResponse]:
    """Completion responses as chat responses; with `split` (a call with tools), text from the
    first tool call on is held back, each response carries the calls begun so far with their
    arguments parsed as far as they go (as OpenAI's streams do: `stream_structured_predict`
    yields partial objects, a `FunctionAgent`'s `AgentStream` events show the call), and the last
    one the calls parsed whole."""
    content, calls, parsed = "", [], {}
    with contextlib.closing(responses):
        for r in responses:
            if split is None:
                message = ChatMessage(role=MessageRole.ASSISTANT, content=r.text)
                yield ChatResponse(message=message, delta=r.delta, raw=r.raw, additional_kwargs=r.additional_kwargs)
            elif r.raw is None:  # a text delta
                delta = split.feed(r.delta)
                content += delta
                calls, last = _calls_so_far(split, parsed), calls
                if delta or calls != last:
                    extra = {"tool_calls": calls} if calls else {}
                    message = ChatMessage(role=MessageRole.ASSISTANT, content=content, additional_kwargs=extra)
                    yield ChatResponse(message=message, delta=delta)
            else:  # the last response: the run's output and info
                rest, calls, invalid = split.finish()
                content += rest
                extra = {"tool_calls": calls} if calls else {}
                message = ChatMessage(role=MessageRole.ASSISTANT, content=content, additional_kwargs=extra)
                info = {**r.additional_kwargs, **({"invalid_tool_calls": invalid} if invalid else {})}
                yield ChatResponse(message=message, delta=rest, raw=r.raw, additional_kwargs=info)
