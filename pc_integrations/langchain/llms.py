"""`ParallelCompLLM`: a LangChain `BaseLLM` over one `parallelcomp.ParallelComp` engine.

Framework glue only. The engine does every model step (chunking, prefill, eviction, decoding,
stop strings); per-call settings (`GenerationSettings`), the routing rule (documents, marker,
plain question or stuffed prompt) and attribution come from `pc_integrations.common`.
Documents reach the model as separate chunks:

    llm.invoke("What does clause 7 say?", documents=[doc1, doc2, ...])   # str or Document
    llm.bind(documents=docs).stream("...")
    llm.invoke(stuffed_prompt)      # context + "Question: ..." far beyond the window: split, chunked

Async calls run the blocking engine in a worker thread (`common.aiter_in_thread`), so the event
loop never blocks; the engine's own lock makes concurrent calls on one engine queue, and a
stream abandoned by its consumer stops at its next token.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.caches import BaseCache
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseLLM
from langchain_core.language_models.base import LangSmithParams
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from langchain_core.runnables import RunnableSerializable
from langchain_core.runnables.utils import AnyConfigurableField
from pydantic import ConfigDict, Field, model_validator

from parallelcomp import InputError, ParallelComp, ParallelCompConfig
from parallelcomp.settings import GenerationSettings, Integer, Number

from ..common import Run, aiter_in_thread, by_name, token_usage

_DEFAULTS = {name: f.default for name, f in GenerationSettings.model_fields.items()}


class ParallelCompLLM(BaseLLM):
    """A text-completion LLM that answers over the full corpus with ParallelComp.

    Build it from a ready engine (`ParallelCompLLM(engine=pc)`) or load one with
    `ParallelCompLLM.from_pretrained(path_or_None, config=ParallelCompConfig(...))`.

    `generation_info` of every generation (and of the last streamed chunk) holds `sources`
    (one record per input document: index, kept, score = question NLL, lower is more relevant,
    chunks, metadata), `chunks` (one record per chunk), `stats` (`RunStats` as a dict), `split`
    (the routing rule applied, `common.route`), `finish_reason` and `model_name`.

    Settings are `GenerationSettings` fields (validated there, once), plus `timeout` and
    `streaming`; each may be overridden per call, as may `documents=` and `history=`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)

    engine: ParallelComp = Field(exclude=True, repr=False)
    """The runtime that does all model work; one engine may serve many wrappers."""
    model_name: str = ""
    """Reported to tracing and in `_identifying_params`; defaults to the engine's model name."""
    max_new_tokens: Integer = Field(_DEFAULTS["max_new_tokens"], alias="max_tokens")
    """Tokens to generate at most; `max_tokens` (LangChain's standard name) is an alias."""
    temperature: Number = _DEFAULTS["temperature"]
    """0 is greedy decoding."""
    top_p: Number = _DEFAULTS["top_p"]
    top_k: Integer = _DEFAULTS["top_k"]
    seed: Integer | None = None
    """Seed of the sampler when temperature > 0."""
    repetition_penalty: Number = _DEFAULTS["repetition_penalty"]
    stop: list[str] | None = None
    """Default stop strings, added to those given per call; never part of the output."""
    progress: bool = False
    """Show a tqdm bar over the chunks being prefilled (stderr)."""
    timeout: Number | None = Field(None, gt=0)
    """Seconds a call may take, checked at every decoded token (`common.GenerationTimeout`)."""
    streaming: bool = False
    """`invoke`/`generate` report every token to `on_llm_new_token` (`stream` always does)."""
    cache: BaseCache | bool | None = Field(False, exclude=True)
    """Off by default. LangChain's LLM cache key holds the prompt and the instance's fields, not
    per-call arguments (`documents`, `max_tokens`, ...), so with a cache a call that passes any
    is refused (`InputError`) rather than answered from another call's entry: set them on the
    instance. (The chat model's cache key holds them.)"""

    @model_validator(mode="after")
    def _valid_settings(self) -> ParallelCompLLM:
        GenerationSettings.of(**{k: v for k, v in self.settings().items() if k != "timeout"})  # one validation
        return self

    def settings(self) -> dict[str, Any]:
        """The instance's defaults for every per-call setting (`common.call_settings`)."""
        names = [*GenerationSettings.default_names(), "timeout"]
        return {name: getattr(self, name) for name in names}

    @model_validator(mode="before")
    @classmethod
    def _setting_names(cls, data: Any) -> Any:
        return by_name(data) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _default_model_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("model_name") and isinstance(data.get("engine"), ParallelComp):
            data = {**data, "model_name": data["engine"].model_name}
        return data

    def configurable_fields(self, **kwargs: AnyConfigurableField) -> RunnableSerializable:
        """LangChain's, also under the standard name `max_tokens`."""
        return super().configurable_fields(**by_name(kwargs))

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
            **{k: v for k, v in self.settings().items() if k not in ("progress", "timeout")},
            "config": self.engine.config.model_dump(mode="json"),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop or self.stop, **kwargs)
        params["ls_provider"] = "parallelcomp"
        if not isinstance(kwargs.get("model"), str):  # a per-call model name is LangChain's to report
            params["ls_model_name"] = self.model_name
        params["ls_max_tokens"] = kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens))
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids from the model's own tokenizer (not LangChain's GPT-2 default)."""
        return list(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[str], stop: list[str] | None = None, callbacks: Any = None, **kwargs: Any
                 ) -> LLMResult:
        self._check_cached_call(kwargs)
        return super().generate(prompts, stop, callbacks, **kwargs)

    async def agenerate(self, prompts: list[str], stop: list[str] | None = None, callbacks: Any = None,
                        **kwargs: Any) -> LLMResult:
        self._check_cached_call(kwargs)
        return await super().agenerate(prompts, stop, callbacks, **kwargs)

    def _check_cached_call(self, kwargs: dict[str, Any]) -> None:
        """`cache`'s docstring: a call with per-call arguments cannot be looked up correctly."""
        arguments = sorted(set(kwargs) - {"tags", "metadata", "run_name", "run_id"})
        cached = isinstance(self.cache, BaseCache) or (self.cache is not False and get_llm_cache() is not None)
        if arguments and cached:
            raise InputError(f"LangChain's LLM cache key leaves out per-call arguments ({', '.join(arguments)}), so "
                             "an answer cached for other settings or documents would come back: set them on the LLM "
                             "(ParallelCompLLM(max_new_tokens=...)) or pass cache=False")

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        # One engine run per prompt: the engine decodes one sequence at a time anyway.
        manager = run_manager if self.streaming else None
        generations = [[_join(list(self._stream(p, stop, manager, **kwargs)))] for p in prompts]
        return LLMResult(generations=generations, llm_output=self._llm_output(generations))

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        manager = run_manager if self.streaming else None
        for prompt in prompts:
            chunks = [c async for c in self._astream(prompt, stop, manager, **kwargs)]
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

    def iter_chunks(self, prompt: Any, stop: Any = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        """The engine's text deltas as chunks, then one empty chunk carrying `generation_info`.

        Blocking and callback-free: `_stream`/`_astream` and `ChatParallelComp` add callbacks.
        """
        if stop is not None:
            kwargs = {**kwargs, "stop": stop}
        run = Run(self.engine, prompt, kwargs, self.settings())
        for delta in run.deltas():
            yield GenerationChunk(text=delta)
        yield GenerationChunk(text="", generation_info={**run.info(), "model_name": self.model_name})

    def _llm_output(self, generations: list[list[Generation]]) -> dict[str, Any]:
        usage = sum_usage([usage_from_info(g[0].generation_info) for g in generations])
        return {"model_name": self.model_name, "token_usage": usage}


# ---------------------------------------------------------------------- helpers


def _join(chunks: list[GenerationChunk]) -> Generation:
    info = next((c.generation_info for c in reversed(chunks) if c.generation_info), None)
    return Generation(text="".join(c.text for c in chunks), generation_info=info)


def usage_from_info(info: dict[str, Any] | None) -> dict[str, int]:
    """`common.token_usage` of a generation's info."""
    return token_usage((info or {}).get("stats", {}))


def sum_usage(per_call: list[dict[str, int]]) -> dict[str, int]:
    """Token usage of several calls (`usage_from_info` each), summed: `llm_output["token_usage"]`."""
    return {key: sum(u[key] for u in per_call) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
