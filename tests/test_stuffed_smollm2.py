"""A stuffed ~20K-token prompt (2.5× the embedded SmolLM2's 8K window) through the stock "stuff"
code of both frameworks, as a user's existing code runs it, with no `documents=` and no marker:
LangChain's `create_stuff_documents_chain` with `ChatParallelComp` (the documents stuffed into a
system message), and a LlamaIndex query engine with `Settings.llm` and its default (compact)
synthesizer (the documents stuffed before "Query:"). The routing rule (`common.route`) finds the
question; the engine chunks the rest, keeps the best chunks and answers. Each framework must give
a non-empty answer naming the village, with the chunk that holds the gold document kept.

The corpus is the docstrings of sixteen standard-library modules (Python 3.11) with one invented
fact among them, so nothing outside the test decides the answer.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from llama_index.core import Settings, SummaryIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
from llama_index.core.schema import TextNode

from parallelcomp import ParallelComp, ParallelCompConfig
from pc_integrations.langchain import ChatParallelComp
from pc_integrations.llama_index import ParallelCompLLM as LlamaIndexLLM

pytestmark = pytest.mark.slow

FACT = (
    "The Zorblat festival is held every March in the fishing village of Kerrow. Its mascot is a "
    "blue heron named Pim, and the festival ends with a boat race around the harbour."
)
QUESTION = "In which village is the Zorblat festival held?"
MODULES = ("argparse", "json", "csv", "textwrap", "heapq", "functools", "itertools", "pathlib", "collections",
           "shutil", "subprocess", "logging", "datetime", "string", "random")


def module_text(name: str) -> str:
    """A module's docstring and its public members' docstrings."""
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for key, value in sorted(vars(module).items()):
        if not key.startswith("_") and getattr(value, "__module__", None) == name and inspect.getdoc(value):
            parts.append(f"{key}: {inspect.getdoc(value)}")
    return "\n\n".join(parts)


@pytest.fixture(scope="module")
def texts():
    texts = [module_text(name) for name in MODULES]
    return texts[:9] + [FACT] + texts[9:]


@pytest.fixture(scope="module")
def engine(smol_engine):
    # The shared weights; K=2 of ~1K-token chunks.
    return ParallelComp(smol_engine.model, smol_engine.tokenizer, ParallelCompConfig(chunk_tokens=1024, keep_chunks=2))


def test_corpus_is_20k_tokens(engine, texts):
    assert 19_000 < sum(engine.count_tokens(t) for t in texts) < 22_000


def gold_kept(chunks: list[dict], offset: int) -> bool:
    """Whether a kept chunk's span of document 0 (the stuffed context) covers `offset`."""
    return any(c["kept"] and any(d == 0 and start <= offset < end for d, start, end in c["spans"]) for c in chunks)


class LastChatResult(BaseCallbackHandler):
    def on_llm_end(self, response, **kwargs):
        self.message = response.generations[0][0].message


def test_langchain_create_stuff_documents_chain(engine, texts):
    chat = ChatParallelComp(engine=engine, max_tokens=24)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer the question using only this context:\n\n{context}"), ("human", "{input}")]
    )
    chain = create_stuff_documents_chain(chat, prompt)
    seen = LastChatResult()
    answer = chain.invoke({"context": [Document(page_content=t) for t in texts], "input": QUESTION},
                          config={"callbacks": [seen]})
    meta = seen.message.response_metadata
    assert meta["split"]["rule"] == "history" and meta["split"]["moved_messages"] == [0]
    assert meta["stats"]["tokens_in"] > 19_000 and meta["stats"]["n_chunks"] >= 20
    system = prompt.format_messages(context="\n\n".join(texts), input=QUESTION)[0].content
    assert gold_kept(meta["chunks"], system.index(FACT))
    assert answer.strip() and "Kerrow" in answer


class LastChat(BaseEventHandler):
    events: list = []

    def handle(self, event, **kwargs):
        if isinstance(event, LLMChatEndEvent):  # ParallelCompLLM is a chat model to LlamaIndex
            self.events.append(event)


def test_llama_index_query_engine_with_settings_llm(engine, texts):
    handler = LastChat(events=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    previous = Settings._llm
    Settings.llm = LlamaIndexLLM(engine, max_new_tokens=24)
    try:
        index = SummaryIndex([TextNode(text=t) for t in texts])
        response = index.as_query_engine().query(QUESTION)  # the default synthesizer: compact
    finally:
        Settings._llm = previous
        dispatcher.event_handlers.remove(handler)
    assert len(handler.events) == 1  # one packed call over everything, split at "Query:"
    event = handler.events[0]
    info = event.response.additional_kwargs
    assert info["split"]["rule"] == "label" and info["stats"]["tokens_in"] > 19_000
    assert gold_kept(info["chunks"], event.messages[-1].content.index(FACT))
    assert response.response and response.response != "Empty Response" and "Kerrow" in response.response
