"""`ParallelCompLLM`: a LangChain `BaseLLM` over one `parallelcomp.ParallelComp` engine.

Framework glue only. The engine does every model step (chunking, prefill, eviction, decoding,
stop strings); document normalisation, the prompt-splitting rule and attribution come from
`pc_integrations.common`. Documents reach the model as separate chunks:

    llm.invoke("What does clause 7 say?", documents=[doc1, doc2, ...])   # str or Document
    llm.bind(documents=docs).stream("...")

Without documents, a prompt containing `CONTEXT_MARKER` is split there (context before it,
question after it); a prompt without the marker is the question alone, and one too long for the
model's window raises `InputError` instead of being truncated.

Async calls run the blocking engine in a worker thread (`common.aiter_in_thread`), so the event
loop never blocks; the engine's own lock makes concurrent calls on one engine queue, and a
stream abandoned by its consumer stops at its next token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.caches import BaseCache
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import ConfigDict, Field, model_validator

from parallelcomp import InputError, ParallelComp, ParallelCompConfig

from ..common import CONTEXT_MARKER, SourceDocument, aiter_in_thread, generation_info, normalize_documents, split_prompt

GENERATION_KWARGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "progress")
"""Per-call keyword arguments that override the fields of the same name."""


@dataclass(frozen=True)
class _Request:
    """One engine call, validated: the question, its context and the sampling settings."""

    question: str
    documents: list[SourceDocument] | None
    """The chunked context: the given documents, or the text before the marker as one document."""
    options: dict[str, Any]


class ParallelCompLLM(BaseLLM):
    """A text-completion LLM that answers over the full corpus with ParallelComp.

    Build it from a ready engine (`ParallelCompLLM(engine=pc)`) or load one with
    `ParallelCompLLM.from_pretrained(path_or_None, config=ParallelCompConfig(...))`.

    `generation_info` of every generation (and of the last streamed chunk) holds `sources`
    (one record per input document: index, kept, score = question NLL, lower is more relevant,
    chunks, metadata), `chunks` (one record per chunk) and `stats` (`RunStats` as a dict).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    engine: ParallelComp = Field(exclude=True, repr=False)
    """The runtime that does all model work; one engine may serve many wrappers."""
    model_name: str = ""
    """Reported to tracing and in `_identifying_params`; defaults to the engine's model name."""
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    """0 is greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    """Seed of the sampler when temperature > 0."""
    stop: list[str] | None = None
    """Default stop strings, added to those given per call; never part of the output."""
    progress: bool = False
    """Show a tqdm bar over the chunks being prefilled (stderr)."""
    cache: BaseCache | bool | None = Field(False, exclude=True)
    """Off by default: LangChain's LLM cache key leaves out per-call `documents`, so a cached
    answer could come back for another corpus. Set it only if you never pass documents."""

    @model_validator(mode="before")
    @classmethod
    def _default_model_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("model_name") and isinstance(data.get("engine"), ParallelComp):
            data = {**data, "model_name": data["engine"].model_name}
        return data

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        config: ParallelCompConfig | None = None,
        *,
        device: str | None = None,
        dtype: Any = None,
        **fields: Any,
    ) -> ParallelCompLLM:
        """Load an engine (a local HF directory; None → the embedded SmolLM2) and wrap it."""
        return cls(engine=ParallelComp.from_pretrained(model, config, device=device, dtype=dtype), **fields)

    # ------------------------------------------------------------------ LangChain metadata

    @property
    def _llm_type(self) -> str:
        return "parallelcomp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            **{name: getattr(self, name) for name in GENERATION_KWARGS if name != "progress"},
            "stop": self.stop,
            "config": self.engine.config.model_dump(mode="json"),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "parallelcomp"
        params["ls_model_name"] = self.model_name
        params["ls_max_tokens"] = kwargs.get("max_new_tokens", self.max_new_tokens)
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (not LangChain's GPT-2 default)."""
        return list(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    # ------------------------------------------------------------------ generation

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        # One engine run per prompt: the engine decodes one sequence at a time anyway.
        generations = [[_join(list(self._stream(p, stop, run_manager, **kwargs)))] for p in prompts]
        return LLMResult(generations=generations, llm_output=self._llm_output(generations))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            chunks = [c async for c in self._astream(prompt, stop, run_manager, **kwargs)]
            generations.append([_join(chunks)])
        return LLMResult(generations=generations, llm_output=self._llm_output(generations))

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for chunk in self.iter_chunks(prompt, stop, **kwargs):
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        async for chunk in aiter_in_thread(lambda: self.iter_chunks(prompt, stop, **kwargs)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    def iter_chunks(self, prompt: str, stop: Any = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        """The engine's text deltas as chunks, then one empty chunk carrying `generation_info`.

        Blocking and callback-free: `_stream`/`_astream` and `ChatParallelComp` add callbacks.
        """
        request = self._request(prompt, stop, kwargs)
        texts = [d.text for d in request.documents] if request.documents is not None else None
        stream = self.engine.stream(request.question, documents=texts, **request.options)
        try:
            for delta in stream:
                yield GenerationChunk(text=delta)
        finally:
            stream.close()  # releases the engine if the consumer stopped early
        yield GenerationChunk(text="", generation_info=generation_info(stream.output, request.documents))

    def _request(self, prompt: str, stop: Any, kwargs: dict[str, Any]) -> _Request:
        unknown = sorted(set(kwargs) - {"documents", *GENERATION_KWARGS})
        if unknown:
            msg = (
                f"unexpected keyword argument(s) {unknown}; "
                f"ParallelCompLLM accepts documents= and {list(GENERATION_KWARGS)}"
            )
            raise InputError(msg)
        options = {name: kwargs.get(name, getattr(self, name)) for name in GENERATION_KWARGS}
        options["stop"] = _stops(self.stop, stop)
        if not isinstance(prompt, str):
            raise InputError(f"the prompt must be a string, got {type(prompt).__name__}")
        documents = kwargs.get("documents")
        if documents is not None:
            if CONTEXT_MARKER in prompt:
                msg = f"the prompt contains {CONTEXT_MARKER!r} and documents= was given: pass the context one way only"
                raise InputError(msg)
            return _Request(prompt, normalize_documents(documents), options)
        context, question = split_prompt(prompt)
        if context is None:
            self._check_fits(question, options["max_new_tokens"])
        return _Request(question, [SourceDocument(context)] if context else None, options)

    def _check_fits(self, question: str, max_new_tokens: int) -> None:
        """A prompt without documents or marker is one question; never truncate it silently."""
        n = self.engine.count_tokens(question)
        if n + max_new_tokens > self.engine.window:
            msg = (
                f"the prompt has {n} tokens, which with max_new_tokens={max_new_tokens} exceeds the model's "
                f"{self.engine.window}-token window, and it has no documents: pass documents=[...], or put "
                f"{CONTEXT_MARKER!r} between the context and the question so the context is chunked"
            )
            raise InputError(msg)

    def _llm_output(self, generations: list[list[Generation]]) -> dict[str, Any]:
        return {"model_name": self.model_name, "token_usage": _usage([g[0].generation_info for g in generations])}


# ---------------------------------------------------------------------- helpers


def _stops(default: list[str] | None, stop: Any) -> list[str]:
    """Instance stops plus call stops; a single string is accepted, anything else is an error."""
    if stop is None:
        call = []
    elif isinstance(stop, str):
        call = [stop]
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        call = list(stop)
    else:
        raise InputError(f"stop must be a string or a list of strings, got {stop!r}")
    return list(dict.fromkeys([*(default or []), *call]))


def _join(chunks: list[GenerationChunk]) -> Generation:
    info = next((c.generation_info for c in reversed(chunks) if c.generation_info), None)
    return Generation(text="".join(c.text for c in chunks), generation_info=info)


def usage_from_info(info: dict[str, Any] | None) -> dict[str, int]:
    """Prompt tokens (prefix + all chunks + question, before eviction) and completion tokens."""
    stats = (info or {}).get("stats", {})
    prompt = stats.get("prefix_tokens", 0) + stats.get("tokens_in", 0) + stats.get("question_tokens", 0)
    completion = stats.get("new_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _usage(infos: list[dict[str, Any] | None]) -> dict[str, int]:
    per_call = [usage_from_info(i) for i in infos]
    return {key: sum(u[key] for u in per_call) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
