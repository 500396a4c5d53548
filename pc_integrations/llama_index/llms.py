"""`ParallelCompLLM`: a LlamaIndex `CustomLLM` over one `parallelcomp.ParallelComp` engine.

`Settings.llm = ParallelCompLLM(engine)` and `index.as_query_engine(llm=...)` work as with any
LlamaIndex LLM. A prompt string is split into context and question by the shared rule in
`pc_integrations.common.split_prompt` (text before the last `<<<QUESTION>>>` is context that the
engine chunks, scores and evicts; without the marker the whole prompt is the question).
`TEXT_QA_TEMPLATE` / `REFINE_TEMPLATE` put the marker into LlamaIndex's own synthesizers; the
`ParallelCompSynthesizer` (synthesizer.py) instead passes every retrieved node as one document
through `complete(question, documents=[...])`, the same code path.

The async methods run the engine in a worker thread (`asyncio.to_thread`,
`common.aiter_in_thread`): the event loop is never blocked, and concurrent calls queue on the
engine's lock. Nothing here knows about chunking, prompts or attribution beyond calling
`common`.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Iterator, Optional, Sequence

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts import PromptTemplate

from parallelcomp import GenerationOutput, ParallelComp, ParallelCompConfig, TextStream
from pc_integrations.common import (
    CONTEXT_MARKER,
    SourceDocument,
    aiter_in_thread,
    generation_info,
    normalize_documents,
    split_prompt,
)

GENERATION_KEYS = ("max_new_tokens", "stop", "temperature", "top_p", "top_k", "seed", "progress")
"""Per-call keyword arguments `complete`/`stream_complete` pass on to the engine; other keyword
arguments LlamaIndex may add are ignored, as HuggingFaceLLM does."""

TEXT_QA_TEMPLATE = PromptTemplate("{context_str}" + CONTEXT_MARKER + "{query_str}")
"""For LlamaIndex's own synthesizers (`as_query_engine(llm=pc_llm, text_qa_template=...)`): the
packed context goes to the engine as context, the query as the question."""

REFINE_TEMPLATE = PromptTemplate(
    "{context_msg}" + CONTEXT_MARKER + "{query_str}\n\n"
    "An earlier answer, from other documents, was: {existing_answer}\n"
    "Improve it if the documents above allow it; otherwise repeat it."
)


class ParallelCompLLM(CustomLLM):
    """A LlamaIndex LLM answering over inputs far longer than the model's trained window.

    Build it around a ready engine, `ParallelCompLLM(engine, max_new_tokens=...)`, or load one
    with `ParallelCompLLM.from_pretrained(model=None)` (None: the embedded SmolLM2-135M).
    """

    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling; 0 = off.")
    seed: Optional[int] = Field(default=None, description="Sampling seed (temperature > 0).")
    stop: Optional[list[str]] = Field(default=None, description="String stop sequences.")
    progress: bool = Field(default=False, description="Show a prefill progress bar on stderr.")
    instruction: Optional[str] = Field(
        default=None, description="Instruction before the documents; None: the engine config's."
    )

    _engine: ParallelComp = PrivateAttr()
    _variants: dict = PrivateAttr(default_factory=dict)

    def __init__(self, engine: ParallelComp, **kwargs: Any) -> None:
        if not isinstance(engine, ParallelComp):
            msg = f"engine must be a parallelcomp.ParallelComp, got {type(engine).__name__}"
            raise TypeError(msg)
        super().__init__(**kwargs)
        self._engine = engine

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
        """Effective extrapolated window: the context the model attends at once after eviction,
        keep_chunks × chunk budget (each chunk at most the trained window, positions reused).
        Longer inputs are accepted too; their lowest-scoring chunks are evicted."""
        config = self._engine.config
        return config.keep_chunks * (config.chunk_tokens or self._engine.window)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=False,  # the engine applies the tokenizer's chat template itself
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

    def _start(self, prompt: str, kwargs: dict) -> tuple[TextStream, Optional[list[SourceDocument]]]:
        """Validate and set up one run (no model work yet): the engine's lazy TextStream.

        `documents=[...]` (str, nodes, NodeWithScore, LangChain Documents) makes `prompt` the
        question and each document one input of the engine; otherwise `split_prompt` applies.
        """
        gen = {key: getattr(self, key) for key in GENERATION_KEYS}
        gen.update({key: kwargs[key] for key in GENERATION_KEYS if key in kwargs})
        engine = self.engine_for(kwargs.get("instruction"))
        documents = kwargs.get("documents")
        if documents is not None:
            sources = normalize_documents(documents)
            texts = [s.text for s in sources]
            return engine.stream(prompt, documents=texts, **gen), sources
        context, question = split_prompt(prompt)
        return engine.stream(question, context=context, **gen), None

    @staticmethod
    def _final(text: str, output: GenerationOutput, sources, delta: Optional[str] = None) -> CompletionResponse:
        return CompletionResponse(
            text=text, delta=delta, raw=output, additional_kwargs=generation_info(output, sources)
        )

    def _complete(self, prompt: str, kwargs: dict) -> CompletionResponse:
        stream, sources = self._start(prompt, kwargs)
        for _ in stream:
            pass
        return self._final(stream.output.text, stream.output, sources)

    def _responses(self, stream: TextStream, sources) -> Iterator[CompletionResponse]:
        """One response per text delta, then a last one (delta "") carrying the run's output
        in `raw` and attribution/stats in `additional_kwargs`."""
        text = ""
        for delta in stream:
            text += delta
            yield CompletionResponse(text=text, delta=delta)
        yield self._final(text, stream.output, sources, delta="")

    # ------------------------------------------------------------------ LlamaIndex API

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete(prompt, kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream, sources = self._start(prompt, kwargs)  # bad input raises here, not mid-stream
        return self._responses(stream, sources)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, kwargs)

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        stream, sources = self._start(prompt, kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            async for response in aiter_in_thread(lambda: self._responses(stream, sources)):
                yield response

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            async for response in aiter_in_thread(lambda: self.stream_chat(messages, **kwargs)):
                yield response

        return gen()
