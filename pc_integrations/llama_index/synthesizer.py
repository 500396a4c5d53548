"""`ParallelCompSynthesizer`: a LlamaIndex response synthesizer that answers over every retrieved
node at once, with compressed parallel prefill instead of truncating, repacking or refining.

Each node's text (`get_content(MetadataMode.LLM)`, as LlamaIndex's own synthesizers use) is one
document of the engine; no `PromptHelper` repacking, no truncation. The engine chunks, scores
every chunk by the question's NLL, keeps the best `keep_chunks` and evicts the rest; the
response's `source_nodes` say which nodes were kept, with scores from that chunk scoring.

It always runs its own `ParallelCompLLM` (passed to `BaseSynthesizer`, so `Settings.llm` is never
resolved), and goes through that LLM's `complete`/`stream_complete`, so LLM callbacks and
instrumentation events fire as usual. It does not retrieve, rerank or filter nodes.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, AsyncGenerator, Generator, List, Optional, Sequence

import llama_index.core.instrumentation as instrument
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
from llama_index.core.prompts import BasePromptTemplate, PromptTemplate
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.response_synthesizers.base import BaseSynthesizer, QueryTextType
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.core.types import RESPONSE_TEXT_TYPE

from parallelcomp import ConfigError, GenerationOutput, InputError, ParallelComp
from parallelcomp.settings import GenerationSettings
from pc_integrations.common import SETTING_ALIASES, SourceDocument, attribution, generation_info
from pc_integrations.llama_index.llms import ParallelCompLLM

dispatcher = instrument.get_dispatcher(__name__)

RESPONSE_KWARGS = (*GenerationSettings.names(), *SETTING_ALIASES, "timeout")
"""Per-call `response_kwargs` the synthesizer accepts (generation settings)."""

ATTRIBUTION_KEYS = ("parallelcomp_kept", "parallelcomp_nll", "parallelcomp_chunks", "retrieval_score")
"""Metadata added to each source node (on a copy; hidden from the LLM and embedding text)."""


class ParallelCompSynthesizer(BaseSynthesizer):
    """Answer a query over all retrieved nodes with one ParallelComp run.

    Args:
        llm: a `ParallelCompLLM`, or a `parallelcomp.ParallelComp` engine (then `**llm_kwargs`,
            e.g. `max_new_tokens=64`, build the LLM around it).
        streaming: return `StreamingResponse` (sync) / `AsyncStreamingResponse` (async).
        instruction: text placed before the documents; default: the engine config's.
        query_template: a `PromptTemplate` with `{query_str}`, formatted into the question.
        empty_response: the answer when there are no nodes; unset, no nodes is an `InputError`.

    Prompts (`get_prompts()` / `update_prompts()`): `"instruction"` and `"query_template"`.

    Responses: `source_nodes` are copies of the retrieved nodes, sorted kept first, then by
    relevance; `score` is exp(-NLL) of the question given the node's best chunk (a per-token
    likelihood in (0, 1], higher is more relevant) and metadata holds `parallelcomp_kept`,
    `parallelcomp_nll`, `parallelcomp_chunks` and the retriever's `retrieval_score`.
    `response.metadata` maps node ids to node metadata, plus `"parallelcomp"`: run stats, chunk
    reports and per-node attribution (`common.generation_info`). When streaming, both are filled
    in when the stream ends (chunk scores arrive with the engine's final output).

    Bad input: an empty node list (a retriever that found nothing) raises
    `parallelcomp.InputError`, as the LangChain chain does, instead of LlamaIndex's silent "Empty
    Response"; pass `empty_response="..."` to answer that text instead (nothing is run). An empty
    query or a node without text raises `InputError` too.
    """

    def __init__(
        self,
        llm: ParallelCompLLM | ParallelComp,
        *,
        streaming: bool = False,
        instruction: Optional[str] = None,
        query_template: Optional[BasePromptTemplate] = None,
        callback_manager: Optional[CallbackManager] = None,
        empty_response: Optional[str] = None,
        **llm_kwargs: Any,
    ) -> None:
        if isinstance(llm, ParallelComp):
            llm = ParallelCompLLM(llm, **llm_kwargs)
        elif not isinstance(llm, ParallelCompLLM):
            msg = (
                f"ParallelCompSynthesizer needs a ParallelCompLLM or a ParallelComp engine, got "
                f"{type(llm).__name__}; it never falls back to Settings.llm"
            )
            raise ConfigError(msg)
        elif llm_kwargs:
            msg = f"{sorted(llm_kwargs)}: set these on the ParallelCompLLM, or pass an engine instead"
            raise ConfigError(msg)
        super().__init__(
            llm=llm, callback_manager=callback_manager, streaming=streaming, empty_response=empty_response
        )
        self._pc_llm: ParallelCompLLM = llm
        self._answers_empty = empty_response is not None
        self._instruction = PromptTemplate(instruction or llm.instruction or llm.engine.config.instruction)
        self._query_template = query_template or PromptTemplate("{query_str}")
        self._update_prompts({"query_template": self._query_template})  # validates it

    @classmethod
    def from_pretrained(cls, model: Optional[str] = None, config=None, **kwargs: Any) -> "ParallelCompSynthesizer":
        """Load an engine (None → the embedded SmolLM2) and build the synthesizer around it."""
        return cls(ParallelComp.from_pretrained(model, config=config), **kwargs)

    @property
    def llm(self) -> ParallelCompLLM:
        return self._pc_llm

    def as_query_engine(self, index: Any, **kwargs: Any) -> Any:
        """`index.as_query_engine(...)` answering with this synthesizer and its LLM.

        LlamaIndex's own `as_query_engine` resolves `Settings.llm` (OpenAI by default) unless an
        `llm=` is given; this passes ours. `kwargs` go to the retriever (`similarity_top_k=...`).
        """
        return index.as_query_engine(llm=self._pc_llm, response_synthesizer=self, **kwargs)

    # ------------------------------------------------------------------ prompts

    def _get_prompts(self) -> PromptDictType:
        return {"instruction": self._instruction, "query_template": self._query_template}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        for name in ("instruction", "query_template"):
            if name in prompts and not isinstance(prompts[name], BasePromptTemplate):
                msg = f"{name} must be a prompt template (PromptTemplate(...)), got {type(prompts[name]).__name__}"
                raise ConfigError(msg)
        if "instruction" in prompts:
            self._instruction = prompts["instruction"]
        if "query_template" in prompts:
            template = prompts["query_template"]
            if "query_str" not in template.template_vars:
                raise ConfigError("query_template must contain {query_str}")
            self._query_template = template

    # ------------------------------------------------------------------ text in, text out

    def _call_kwargs(self, query_str: str, texts: Sequence[str], response_kwargs: dict) -> tuple[str, dict]:
        unknown = set(response_kwargs) - set(RESPONSE_KWARGS)
        if unknown:
            raise InputError(f"unsupported response_kwargs {sorted(unknown)}; use {list(RESPONSE_KWARGS)}")
        if not isinstance(query_str, str):
            raise InputError(f"the query must be a string, got {type(query_str).__name__}")
        if not query_str.strip():
            raise InputError("the query is empty: ask a question")
        if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
            raise InputError(f"text_chunks must be a list of strings, got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise InputError("no text chunks: pass at least one retrieved node")
        blank = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if blank:
            raise InputError(f"text chunks {blank} are empty; remove them (e.g. with a node postprocessor)")
        question = self._query_template.format(query_str=query_str)
        kwargs = {"documents": texts, "instruction": self._instruction.get_template(), **response_kwargs}
        return question, kwargs

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        """The answer text (a generator of text deltas when streaming); every chunk one document."""
        question, kwargs = self._call_kwargs(query_str, text_chunks, response_kwargs)
        if not self._streaming:
            return self._pc_llm.complete(question, **kwargs).text
        responses = self._pc_llm.stream_complete(question, **kwargs)
        return (r.delta for r in responses if r.delta)

    async def aget_response(
        self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any
    ) -> RESPONSE_TEXT_TYPE:
        question, kwargs = self._call_kwargs(query_str, text_chunks, response_kwargs)
        if not self._streaming:
            return (await self._pc_llm.acomplete(question, **kwargs)).text
        responses = await self._pc_llm.astream_complete(question, **kwargs)
        return (r.delta async for r in responses if r.delta)

    def _has_nodes(self, nodes: Any) -> bool:
        """False for an empty node list the user chose to answer with `empty_response`."""
        if len(_check_nodes(nodes)):
            return True
        if self._answers_empty:
            return False
        msg = (
            "no nodes to answer from: the retriever found nothing for this query (raise its "
            "similarity_top_k, lower a similarity cutoff, or check the index); pass "
            "empty_response='...' to the synthesizer to answer a fixed text instead"
        )
        raise InputError(msg)

    # ------------------------------------------------------------------ nodes in, Response out

    @dispatcher.span
    def synthesize(
        self,
        query: QueryTextType,
        nodes: List[NodeWithScore],
        additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        if not self._has_nodes(nodes):
            return super().synthesize(query, nodes, additional_source_nodes, **response_kwargs)
        query = _query_bundle(query)
        question, kwargs, sources = self._prepare(query, nodes, response_kwargs)
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(
            CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query.query_str}
        ) as event:
            if self._streaming:
                response = StreamingResponse(response_gen=None, source_nodes=list(nodes), metadata={})
                responses = self._pc_llm.stream_complete(question, **kwargs)
                response.response_gen = self._deltas(responses, response, nodes, sources, additional_source_nodes)
            else:
                output = self._pc_llm.complete(question, **kwargs).raw["output"]
                response = Response(output.text)
                self._attribute(response, output, nodes, sources, additional_source_nodes)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    @dispatcher.span
    async def asynthesize(
        self,
        query: QueryTextType,
        nodes: List[NodeWithScore],
        additional_source_nodes: Optional[Sequence[NodeWithScore]] = None,
        **response_kwargs: Any,
    ) -> RESPONSE_TYPE:
        if not self._has_nodes(nodes):
            return await super().asynthesize(query, nodes, additional_source_nodes, **response_kwargs)
        query = _query_bundle(query)
        question, kwargs, sources = self._prepare(query, nodes, response_kwargs)
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(
            CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query.query_str}
        ) as event:
            if self._streaming:
                response = AsyncStreamingResponse(response_gen=None, source_nodes=list(nodes), metadata={})
                responses = await self._pc_llm.astream_complete(question, **kwargs)
                response.response_gen = self._adeltas(responses, response, nodes, sources, additional_source_nodes)
            else:
                output = (await self._pc_llm.acomplete(question, **kwargs)).raw["output"]
                response = Response(output.text)
                self._attribute(response, output, nodes, sources, additional_source_nodes)
            event.on_end(payload={EventPayload.RESPONSE: response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=response))
        return response

    def _prepare(self, query: QueryBundle, nodes: List[NodeWithScore], response_kwargs: dict):
        empty = [n.node.node_id for n in nodes if not n.node.get_content(metadata_mode=MetadataMode.NONE).strip()]
        if empty:
            msg = f"nodes without text: {empty}; ParallelCompSynthesizer needs text nodes (filter the others out)"
            raise InputError(msg)
        sources = [
            SourceDocument(n.node.get_content(metadata_mode=MetadataMode.LLM), {"node_id": n.node.node_id})
            for n in nodes
        ]
        question, kwargs = self._call_kwargs(query.query_str, [s.text for s in sources], response_kwargs)
        return question, kwargs, sources

    # The response holds its generator; the generator holds the response only weakly, so a
    # response dropped mid-stream is freed (and its engine stream closed) by reference counting
    # alone, without waiting for the garbage collector.

    def _deltas(self, responses, response, nodes, sources, extra) -> Generator[str, None, None]:
        last, response = None, weakref.ref(response)
        with contextlib.closing(responses):  # a consumer that stops reading frees the engine
            for last in responses:
                if last.delta:
                    yield last.delta
        if response() is not None:
            self._attribute(response(), last.raw["output"], nodes, sources, extra)

    async def _adeltas(self, responses, response, nodes, sources, extra) -> AsyncGenerator[str, None]:
        last, response = None, weakref.ref(response)
        async with contextlib.aclosing(responses):
            async for last in responses:
                if last.delta:
                    yield last.delta
        if response() is not None:
            self._attribute(response(), last.raw["output"], nodes, sources, extra)

    def _attribute(self, response, output: GenerationOutput, nodes, sources, extra) -> None:
        """Fill `response.source_nodes` and `response.metadata` (in place: a streaming response
        was handed out before the run finished)."""
        records = attribution(output, sources)
        annotated = []
        for item, record in zip(nodes, records):
            node = item.node
            meta = {
                **node.metadata,
                "parallelcomp_kept": record["kept"],
                "parallelcomp_nll": record["score"],
                "parallelcomp_chunks": record["chunks"],
                "retrieval_score": item.score,
            }
            hidden = list(ATTRIBUTION_KEYS)
            copy = node.model_copy(
                update={
                    "metadata": meta,
                    "excluded_llm_metadata_keys": list(node.excluded_llm_metadata_keys) + hidden,
                    "excluded_embed_metadata_keys": list(node.excluded_embed_metadata_keys) + hidden,
                }
            )
            annotated.append(NodeWithScore(node=copy, score=math.exp(-record["score"])))
        annotated.sort(key=lambda n: (not n.node.metadata["parallelcomp_kept"], -n.score))
        source_nodes = annotated + list(extra or [])
        response.source_nodes[:] = source_nodes
        if response.metadata is None:
            response.metadata = {}
        response.metadata.clear()
        response.metadata.update(self._get_metadata_for_response([n.node for n in source_nodes]) or {})
        response.metadata["parallelcomp"] = generation_info(output, sources)


def _query_bundle(query: Any) -> QueryBundle:
    if isinstance(query, str):
        return QueryBundle(query_str=query)
    if isinstance(query, QueryBundle):
        return query
    raise InputError(f"the query must be a string or a QueryBundle, got {type(query).__name__}")


def _check_nodes(nodes: Any) -> Sequence[NodeWithScore]:
    """`nodes` as LlamaIndex passes them: a list of `NodeWithScore`."""
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Sequence):
        raise InputError(f"nodes must be a list of NodeWithScore, got {type(nodes).__name__}")
    wrong = [i for i, n in enumerate(nodes) if not isinstance(n, NodeWithScore)]
    if wrong:
        got = type(nodes[wrong[0]]).__name__
        msg = f"nodes {wrong} are not NodeWithScore (got {got}); wrap each node: NodeWithScore(node=TextNode(text=...))"
        raise InputError(msg)
    return nodes
