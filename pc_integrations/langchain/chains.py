"""Retrieval chains and an agent tool that hand retrieved documents to ParallelComp as chunks.

    create_parallelcomp_documents_chain(llm, prompt)    ~ create_stuff_documents_chain(llm, prompt)
        {"context": list[Document], "input": ..., ...} -> answer (str)
    create_parallelcomp_retrieval_chain(retriever, llm) ~ create_retrieval_chain(retriever, <stuff chain>)
        {"input": ...} -> {"input", "context", "answer", "sources", "kept_context", "evicted_context", "stats"}
    create_parallelcomp_tool(llm, retriever | documents) -> a StructuredTool any agent can call
    CorpusRetriever(documents=[...])                    -> a retriever returning the whole corpus

The documents are never stuffed into the prompt: the prompt is rendered with its document
variable (if it has one) set to "", and the documents travel as `documents=` to the model, which
chunks, scores and evicts them. `sources` is the model's attribution (one record per retrieved
document, in retrieval order: index, kept, score = question NLL (lower is more relevant),
chunks, metadata); `kept_context`/`evicted_context` are the retrieved `Document`s split by it.
Built from langchain-core runnables only (langchain-classic is not needed). Bad documents raise
inside the model run, so callbacks see `on_llm_error`; a failing retriever raises through the
chain as usual (`on_retriever_error`, `on_chain_error`).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseLanguageModel
from langchain_core.outputs import LLMResult
from langchain_core.prompts import BasePromptTemplate, PromptTemplate
from langchain_core.retrievers import BaseRetriever, RetrieverLike
from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator, RunnablePassthrough
from langchain_core.runnables.utils import AddableDict
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, Field, field_validator

from parallelcomp import InputError, ParallelCompError

DEFAULT_PROMPT = PromptTemplate.from_template("{input}")
"""The question alone: the engine adds its own instruction and chat template around it."""


class CorpusRetriever(BaseRetriever):
    """Returns every document for every query: the natural retriever for ParallelComp, which
    reads the whole corpus and keeps the chunks most relevant to the question itself."""

    documents: list[Document]

    @field_validator("documents", mode="before")
    @classmethod
    def _to_documents(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [Document(page_content=d) if isinstance(d, str) else d for d in value]
        return value

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return list(self.documents)


def create_parallelcomp_documents_chain(
    llm: BaseLanguageModel,
    prompt: BasePromptTemplate | None = None,
    *,
    document_variable_name: str = "context",
) -> Runnable[dict[str, Any], str]:
    """Drop-in for `create_stuff_documents_chain`: same input dict, answer string out (streams)."""
    answer = _Answer(llm, prompt or DEFAULT_PROMPT, document_variable_name)

    def transform(inputs: Iterator[dict], config: RunnableConfig) -> Iterator[str]:
        for part in answer.run(_collect(inputs), config):
            if isinstance(part, str):
                yield part

    async def atransform(inputs: AsyncIterator[dict], config: RunnableConfig) -> AsyncIterator[str]:
        async for part in answer.arun(await _acollect(inputs), config):
            if isinstance(part, str):
                yield part

    return RunnableGenerator(transform, atransform, name="parallelcomp_documents_chain")


def create_parallelcomp_retrieval_chain(
    retriever: RetrieverLike,
    llm: BaseLanguageModel,
    prompt: BasePromptTemplate | None = None,
) -> Runnable[dict[str, Any], dict[str, Any]]:
    """Like `create_retrieval_chain(retriever, create_stuff_documents_chain(llm, prompt))`, with
    the retrieved documents passed as chunks and the model's attribution added to the output.

    Streaming yields `{"input", "context"}` first, then `{"answer": delta}` pieces, then
    `{"sources", "kept_context", "evicted_context", "stats"}`.
    """
    _check_llm(llm, retriever, "create_parallelcomp_retrieval_chain(retriever, llm)")
    answer = _Answer(llm, prompt or DEFAULT_PROMPT, "context")

    def transform(inputs: Iterator[dict], config: RunnableConfig) -> Iterator[dict]:
        state = _collect(inputs)
        yield AddableDict(state)
        yield AddableDict(answer="")
        for part in answer.run(state, config):
            yield AddableDict(answer=part) if isinstance(part, str) else AddableDict(part)

    async def atransform(inputs: AsyncIterator[dict], config: RunnableConfig) -> AsyncIterator[dict]:
        state = await _acollect(inputs)
        yield AddableDict(state)
        yield AddableDict(answer="")
        async for part in answer.arun(state, config):
            yield AddableDict(answer=part) if isinstance(part, str) else AddableDict(part)

    retrieve = _question | retriever
    chain = RunnablePassthrough.assign(context=retrieve.with_config(run_name="retrieve_documents")) | RunnableGenerator(
        transform, atransform, name="parallelcomp_answer"
    )
    return chain.with_config(run_name="parallelcomp_retrieval_chain")


class _Question(BaseModel):
    question: str = Field(description="The question to answer from the corpus.")


def create_parallelcomp_tool(
    llm: BaseLanguageModel,
    retriever: RetrieverLike | None = None,
    *,
    documents: list[Any] | None = None,
    prompt: BasePromptTemplate | None = None,
    name: str = "ask_corpus",
    description: str = "Answers a question by reading the whole document corpus. Input: the question.",
) -> BaseTool:
    """A tool answering `question` over `retriever` (or a fixed `documents` corpus).

    Content is the answer; the artifact (`ToolMessage.artifact`) holds `sources`,
    `kept_context`, `evicted_context` and `stats` (the run's `RunStats` as a dict: `reused_chunks`,
    `ttft_seconds`, ...). A `ParallelCompError` of the run (nothing retrieved, a question longer
    than the budget, a timeout) becomes the tool's answer, "Error: ..." (LangChain's
    `ToolException` with `handle_tool_error`), so an agent sees it and can ask again instead of
    its whole run ending.
    """
    if (retriever is None) == (documents is None):
        raise InputError("pass exactly one of retriever= or documents=")
    _check_llm(llm, retriever, "create_parallelcomp_tool(llm, retriever)")
    chain = create_parallelcomp_retrieval_chain(retriever or CorpusRetriever(documents=documents), llm, prompt)
    keys = ("sources", "kept_context", "evicted_context", "stats")

    def run(question: str, config: RunnableConfig) -> tuple[str, dict]:
        try:
            out = chain.invoke({"input": question}, config)
        except ParallelCompError as err:
            raise ToolException(f"Error: {err}") from err
        return out["answer"], {k: out[k] for k in keys}

    async def arun(question: str, config: RunnableConfig) -> tuple[str, dict]:
        try:
            out = await chain.ainvoke({"input": question}, config)
        except ParallelCompError as err:
            raise ToolException(f"Error: {err}") from err
        return out["answer"], {k: out[k] for k in keys}

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=name,
        description=description,
        args_schema=_Question,
        response_format="content_and_artifact",
        handle_tool_error=True,
    )


def _check_llm(llm: Any, retriever: Any, call: str) -> None:
    """InputError unless `llm` is a language model and `retriever` is not (the two helpers take
    them in the order of the LangChain functions they mirror: `call`)."""
    if not isinstance(llm, BaseLanguageModel) or isinstance(retriever, BaseLanguageModel):
        raise InputError(f"{call}: llm must be a LangChain language model (ParallelCompLLM, ChatParallelComp) and "
                         f"retriever a retriever; got llm={type(llm).__name__}, retriever={type(retriever).__name__}")


def _question(inputs: Any) -> str:
    if not isinstance(inputs, dict) or "input" not in inputs:
        keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise InputError(f"the retrieval chain takes {{'input': question}} (as create_retrieval_chain), got {keys}")
    return inputs["input"]


# ---------------------------------------------------------------------- the answer step


class _Answer:
    """Render the prompt without documents, stream the model with `documents=`, attribute."""

    def __init__(self, llm: BaseLanguageModel, prompt: BasePromptTemplate, variable: str):
        self.llm, self.prompt, self.variable = llm, prompt, variable

    def run(self, inputs: dict, config: RunnableConfig) -> Iterator[str | dict]:
        values, docs = self._prepare(inputs)
        prompt_value = self.prompt.invoke(values, config)
        capture = _CaptureInfo()
        for delta in self.llm.stream(prompt_value, _add_handler(config, capture), documents=docs):
            yield _text(delta)
        yield _attribution(docs, capture.info)

    async def arun(self, inputs: dict, config: RunnableConfig) -> AsyncIterator[str | dict]:
        values, docs = self._prepare(inputs)
        prompt_value = await self.prompt.ainvoke(values, config)
        capture = _CaptureInfo()
        async for delta in self.llm.astream(prompt_value, _add_handler(config, capture), documents=docs):
            yield _text(delta)
        yield _attribution(docs, capture.info)

    def _prepare(self, inputs: Any) -> tuple[dict, Any]:
        if not isinstance(inputs, dict) or inputs.get(self.variable) is None:  # a retriever that returned None
            msg = f"the chain input must be a dict with a {self.variable!r} key holding the documents"
            raise InputError(msg)
        values = {k: v for k, v in inputs.items() if k in self.prompt.input_variables}
        if self.variable in self.prompt.input_variables:
            values[self.variable] = ""  # the documents go to the model as chunks, not into the prompt
        return values, inputs[self.variable]


class _CaptureInfo(BaseCallbackHandler):
    """Keeps the `generation_info` of the model run it is attached to.

    Not `run_inline`: an inline sync handler in an async callback manager made the model run
    invisible to the other handlers (no on_llm_start in `astream_events`, "Run ID not found"
    for every token), which broke tracing of the async chains."""

    def __init__(self) -> None:
        self.info: dict | None = None

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        if response.generations and response.generations[0]:
            self.info = response.generations[0][0].generation_info


def _attribution(docs: list, info: dict | None) -> dict:
    if not info or "sources" not in info:  # not a ParallelComp model: no attribution to report
        return {"sources": None, "kept_context": None, "evicted_context": None, "stats": None}
    sources = info["sources"]
    kept = {s["index"] for s in sources if s["kept"]}
    return {
        "sources": sources,
        "kept_context": [d for i, d in enumerate(docs) if i in kept],
        "evicted_context": [d for i, d in enumerate(docs) if i not in kept],
        "stats": info.get("stats"),
    }


def _add_handler(config: RunnableConfig, handler: BaseCallbackHandler) -> RunnableConfig:
    callbacks = config.get("callbacks")
    if callbacks is None:
        callbacks = [handler]
    elif isinstance(callbacks, list):
        callbacks = [*callbacks, handler]
    else:
        callbacks = callbacks.copy()
        callbacks.add_handler(handler, inherit=False)
    return {**config, "callbacks": callbacks}


def _text(delta: Any) -> str:
    return delta if isinstance(delta, str) else delta.text  # BaseLLM yields str, chat models chunks


def _collect(parts: Iterator[dict]) -> dict:
    state: dict = {}
    for part in parts:
        state = {**state, **part}
    return state


async def _acollect(parts: AsyncIterator[dict]) -> dict:
    state: dict = {}
    async for part in parts:
        state = {**state, **part}
    return state
