"""LangChain wrappers over a tiny random engine: every answer is compared with the engine itself
or with the serial/sync path, and every callback count with what was actually streamed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import ConfigurableField, RunnableLambda

from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ValidationError

from parallelcomp import InputError, ParallelComp, ParallelCompConfig
from parallelcomp.grammar import parse_tool_calls
from parallelcomp.prompts import build_prompt
from pc_integrations.common import CONTEXT_MARKER, GenerationTimeout
from pc_integrations.langchain import (
    ChatParallelComp,
    CorpusRetriever,
    ParallelCompLLM,
    create_parallelcomp_documents_chain,
    create_parallelcomp_retrieval_chain,
    create_parallelcomp_tool,
    messages_to_prompt,
)

from .asyncutil import run_with_ticker
from .conftest import tiny_model

N = 10
DOCS = [
    "The lighthouse on Skerry Island was built in 1874 and painted red. " * 4,
    "Tomatoes were brought to Europe in the sixteenth century. " * 5,
    "The treaty was signed in Lisbon by eleven delegates. " * 4,
    "A violin has four strings tuned in perfect fifths. " * 3,
]
QUESTION = "When was the lighthouse built?"


class Recorder(BaseCallbackHandler):
    """Counts the callbacks a run fires."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.starts = self.ends = 0
        self.errors: list[BaseException] = []
        self.chain_errors: list[BaseException] = []
        self.results: list[Any] = []

    def on_llm_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
        self.starts += 1

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response, **kwargs: Any) -> None:
        self.ends += 1
        self.results.append(response)

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        self.errors.append(error)

    def on_chain_error(self, error: BaseException, **kwargs: Any) -> None:
        self.chain_errors.append(error)


@pytest.fixture(scope="module")
def engine(tokenizer):
    # One engine for the module: runs leave no state behind, and reuse saves model builds.
    config = ParallelCompConfig(chunk_tokens=64, keep_chunks=2)
    return ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, config)


@pytest.fixture
def llm(engine):
    return ParallelCompLLM(engine=engine, max_new_tokens=N)


@pytest.fixture(scope="module")
def serial(engine):
    """answer(question) → ParallelCompLLM.invoke(question, documents=DOCS), each computed once."""
    return functools.cache(lambda q: ParallelCompLLM(engine=engine, max_new_tokens=N).invoke(q, documents=DOCS))


# ---------------------------------------------------------------------- ParallelCompLLM


def test_invoke_equals_engine_and_reports_sources(llm, engine, serial):
    docs = [Document(page_content=t, metadata={"source": f"doc{i}"}) for i, t in enumerate(DOCS)]
    direct = engine.generate(QUESTION, documents=DOCS, max_new_tokens=N)
    result = llm.generate([QUESTION], documents=docs)
    generation = result.generations[0][0]
    assert generation.text == direct.text == serial(QUESTION) and direct.text
    sources = generation.generation_info["sources"]
    assert [s["metadata"]["source"] for s in sources] == ["doc0", "doc1", "doc2", "doc3"]
    scores = direct.document_scores()
    # the second call reads each chunk's question head from the store: equal NLLs up to rounding
    assert [s["kept"] for s in sources] == [scores[i][1] for i in range(len(DOCS))]
    assert [s["score"] for s in sources] == pytest.approx([scores[i][0] for i in range(len(DOCS))], abs=1e-5)
    assert 0 < sum(s["kept"] for s in sources) < len(DOCS)  # something kept, something evicted
    assert generation.generation_info["stats"]["n_chunks"] == len(direct.chunks) > 2
    assert result.llm_output["token_usage"]["completion_tokens"] == direct.stats.new_tokens == len(direct.token_ids)


def test_bind_documents_as_document_objects(llm, serial):
    plain = serial(QUESTION)
    assert llm.bind(documents=[Document(page_content=t) for t in DOCS]).invoke(QUESTION) == plain


def test_batch_equals_serial(llm, serial):
    questions = [QUESTION, "Who signed the treaty?"]
    assert llm.batch(questions, documents=DOCS) == [serial(q) for q in questions]


def test_stream_equals_invoke_and_every_chunk_fires_a_callback(llm, engine, serial):
    recorder = Recorder()
    pieces = list(llm.stream(QUESTION, {"callbacks": [recorder]}, documents=DOCS))
    assert "".join(pieces) == serial(QUESTION)
    assert len([p for p in pieces if p]) >= 3  # real token deltas, not one blob
    assert recorder.tokens == pieces
    assert (recorder.starts, recorder.ends, recorder.errors) == (1, 1, [])
    info = recorder.results[0].generations[0][0].generation_info
    assert info["stats"]["new_tokens"] == N and len(info["sources"]) == len(DOCS)


def test_async_paths_equal_sync(llm, serial):
    expected = serial(QUESTION)

    async def run():
        recorder = Recorder()
        text = await llm.ainvoke(QUESTION, documents=DOCS)
        pieces = [p async for p in llm.astream(QUESTION, {"callbacks": [recorder]}, documents=DOCS)]
        batch = await llm.abatch([QUESTION, "Who signed the treaty?"], documents=DOCS)
        return text, pieces, recorder, batch

    text, pieces, recorder, batch = asyncio.run(run())
    assert text == expected == "".join(pieces) and batch[0] == expected
    assert batch[1] == serial("Who signed the treaty?")
    assert recorder.tokens == pieces and recorder.ends == 1


def test_astream_events(llm, serial):
    async def run():
        return [e async for e in llm.astream_events(QUESTION, version="v2", documents=DOCS)]

    events = asyncio.run(run())
    streamed = [e["data"]["chunk"] for e in events if e["event"] == "on_llm_stream"]
    assert "".join(streamed) == serial(QUESTION)
    assert len(streamed) >= 3
    end = next(e for e in events if e["event"] == "on_llm_end")
    assert end["data"]["output"]["generations"][0][0]["generation_info"]["sources"]


def test_async_calls_do_not_block_the_loop_and_queue_on_one_engine(llm, serial, engine, monkeypatch):
    questions = [QUESTION, "Who signed the treaty?", "How many strings?", "Where do tomatoes come from?"]
    expected = [serial(q) for q in questions]
    stream = engine.stream

    def slow_stream(*args, **kwargs):  # each run takes at least 0.15 s in whichever thread runs it,
        time.sleep(0.15)               # however fast the host: a blocked loop could not tick meanwhile
        return stream(*args, **kwargs)

    monkeypatch.setattr(engine, "stream", slow_stream)
    results, ticks, elapsed = run_with_ticker(
        lambda: asyncio.gather(*(llm.ainvoke(q, documents=DOCS) for q in questions))
    )
    assert results == expected
    # The loop kept running while four engine runs queued in worker threads (a blocked loop
    # would tick about once per call, ~5 times in all).
    assert elapsed >= 0.15 and ticks >= 20


def test_abandoned_streams_release_the_engine(llm, serial):
    for _ in llm.stream(QUESTION, documents=DOCS):
        break
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a leaked engine lock would block here
        assert pool.submit(llm.invoke, QUESTION, documents=DOCS).result(timeout=120) == serial(QUESTION)

    async def server():  # the loop stays open, as in a server whose client went away
        async for _ in llm.astream(QUESTION, documents=DOCS, max_new_tokens=500):
            break
        return await asyncio.wait_for(llm.ainvoke(QUESTION, documents=DOCS), 120)

    forwards = _count_forwards(llm.engine.model, lambda: llm.invoke(QUESTION, documents=DOCS))
    calls: list[int] = []
    handle = llm.engine.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert asyncio.run(server()) == serial(QUESTION)
    finally:
        handle.remove()
    # The abandoned run stopped at its next token: far fewer than its 500 decode steps ran.
    assert len(calls) < 2 * forwards + 20


def _count_forwards(model, call) -> int:
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        call()
    finally:
        handle.remove()
    return len(calls)


def test_stop_strings_cut_and_never_echo(llm):
    full = llm.invoke(QUESTION, documents=DOCS, max_new_tokens=20)
    stop = full[6:9]
    assert len(stop) == 3 and full.index(stop) > 0
    expected = full[: full.index(stop)]
    assert llm.invoke(QUESTION, documents=DOCS, max_new_tokens=20, stop=[stop]) == expected
    assert llm.invoke(QUESTION, documents=DOCS, max_new_tokens=20, stop=stop) == expected  # a bare str
    assert "".join(llm.stream(QUESTION, documents=DOCS, max_new_tokens=20, stop=[stop])) == expected
    with_default = ParallelCompLLM(engine=llm.engine, max_new_tokens=20, stop=[stop])
    result = with_default.generate([QUESTION], documents=DOCS)
    assert result.generations[0][0].text == expected
    assert result.generations[0][0].generation_info["finish_reason"] == "stop"


def test_marker_splits_context_from_question(llm, engine):
    context = "\n\n".join(DOCS)
    direct = engine.generate(QUESTION, context=context, max_new_tokens=N)
    result = llm.generate([f"{context}\n{CONTEXT_MARKER}\n{QUESTION}"])
    assert result.generations[0][0].text == direct.text
    assert len(result.generations[0][0].generation_info["sources"]) == 1
    # no marker, no documents: the prompt is the question, answered by the model alone
    assert llm.invoke(QUESTION) == engine.generate(QUESTION, max_new_tokens=N).text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"documents": [DOCS[0], 42]}, "document 1 has unsupported type int"),
        ({"documents": []}, "corpus is empty"),
        ({"documents": "one string"}, "must be a list"),
        ({"documents": DOCS, "stop": 5}, "stop must be a string or a list of strings"),
        ({"documents": DOCS, "stop": ["ok", 3]}, "stop must be a string or a list of strings"),
        ({"documents": DOCS, "temprature": 0.5}, "unexpected keyword"),
        ({"documents": DOCS, "max_new_tokens": 0}, "max_new_tokens"),
        ({"documents": DOCS, "max_new_tokens": "5"}, "max_new_tokens: expected an integer, got str"),
        ({"documents": DOCS, "max_new_tokens": None}, "max_new_tokens: expected an integer, got NoneType"),
        ({"documents": DOCS, "max_tokens": 5, "max_new_tokens": 5}, "not both"),
        ({"documents": DOCS, "timeout": -1}, "timeout must be a positive number"),
        ({"documents": 5}, "documents must be a list .* got int"),
        ({"documents": True}, "documents must be a list .* got bool"),
        ({"documents": object()}, "documents must be a list .* got object"),
        ({"documents": [Document(page_content="x", metadata={})], "stop": "ok"}, None),
        ({"documents": [{"text": "x", "metadata": ["not", "a", "dict"]}]}, "document 0: metadata must be a mapping"),
        ({"documents": [{"text": 5}]}, "document 0: its text is a int"),
    ],
)
def test_bad_input_goes_through_on_llm_error(llm, kwargs, match):
    if match is None:  # the valid neighbour of the cases around it
        assert isinstance(llm.invoke(QUESTION, **kwargs), str)
        return
    for call in ("invoke", "stream", "ainvoke", "astream"):
        recorder = Recorder()
        config = {"callbacks": [recorder]}
        with pytest.raises(InputError, match=match):
            if call == "invoke":
                llm.invoke(QUESTION, config, **kwargs)
            elif call == "stream":
                list(llm.stream(QUESTION, config, **kwargs))
            elif call == "ainvoke":
                asyncio.run(asyncio.wait_for(llm.ainvoke(QUESTION, config, **kwargs), 30))
            else:
                asyncio.run(asyncio.wait_for(_drain(llm.astream(QUESTION, config, **kwargs)), 30))
        assert len(recorder.errors) == 1 and recorder.ends == 0, call


async def _drain(aiterator) -> list:
    return [x async for x in aiterator]


def test_constructor_settings_are_typed_and_aliased(engine):
    llm = ParallelCompLLM(engine=engine, max_tokens=7, timeout=30, streaming=True)
    assert llm.max_new_tokens == 7 and llm._get_ls_params()["ls_max_tokens"] == 7
    chat = ChatParallelComp(llm=llm.model_copy(update={"stop": ["END"]}))
    traced = {"ls_max_tokens": 7, "ls_temperature": 0.0, "ls_stop": ["END"], "ls_model_type": "chat"}
    assert traced.items() <= chat._get_ls_params().items()
    bound = {"ls_max_tokens": 3, "ls_temperature": 0.7, "ls_stop": ["Q:"], "ls_model_type": "chat"}
    assert bound.items() <= chat._get_ls_params(stop=["Q:"], max_tokens=3, temperature=0.7).items()  # as bound
    for bad, match in [({"max_new_tokens": "5"}, "expected an integer"), ({"max_new_tokens": None}, "max_new_tokens"),
                       ({"temperature": True}, "expected a number, got bool"), ({"colour": "red"}, "colour"),
                       ({"timeout": True}, "expected a number, got bool"), ({"timeout": 0}, "greater than 0"),
                       ({"max_tokens": 5, "max_new_tokens": 7}, "not both")]:
        with pytest.raises(ValidationError, match=match):
            ParallelCompLLM(engine=engine, **bad)
    with pytest.raises(ValidationError, match="max_retries"):
        ChatParallelComp(engine=engine, max_retries=2)
    recorder = Recorder()  # streaming=True: invoke reports every token
    text = llm.invoke(QUESTION, {"callbacks": [recorder]}, documents=DOCS)
    assert "".join(recorder.tokens) == text and len(recorder.tokens) > 1
    assert llm.invoke(QUESTION, documents=DOCS, max_tokens=3) == llm.invoke(QUESTION, documents=DOCS, max_new_tokens=3)


def test_configurable_fields_reach_the_llm_settings(engine):
    """LangChain's runtime configuration of a chat model's settings (`ChatOpenAI`'s how-to), whose
    settings live on its LLM: a configured run equals a chat built with those settings."""
    chat = ChatParallelComp(engine=engine, max_new_tokens=N)
    fields = {"temperature": ConfigurableField(id="t"), "max_tokens": ConfigurableField(id="n"),
              "seed": ConfigurableField(id="seed")}
    configurable = chat.configurable_fields(**fields)
    assert {s.id: s.default for s in configurable.config_specs} == {"t": 0.0, "n": N, "seed": None}
    configured = configurable.with_config(configurable={"t": 0.9, "n": 3, "seed": 7})
    answer = configured.invoke(QUESTION, documents=DOCS)
    direct = ChatParallelComp(engine=engine, max_tokens=3, temperature=0.9, seed=7).invoke(QUESTION, documents=DOCS)
    assert answer.content == direct.content and answer.usage_metadata["output_tokens"] == 3
    assert configurable.invoke(QUESTION, documents=DOCS).content == chat.invoke(QUESTION, documents=DOCS).content
    # a setting beside llm= applies to a copy of that LLM
    warm = ChatParallelComp(llm=chat.llm, temperature=0.9)
    assert (warm.llm.temperature, chat.llm.temperature, warm.llm.max_new_tokens) == (0.9, 0.0, N)
    with pytest.raises(ValueError, match="colour not found"):
        chat.configurable_fields(colour=ConfigurableField(id="c"))
    with pytest.raises(ValidationError, match="llm= or engine="):
        ChatParallelComp(llm=chat.llm, engine=engine)
    # the LLM takes LangChain's standard name too
    llm = ParallelCompLLM(engine=engine, max_new_tokens=N).configurable_fields(max_tokens=ConfigurableField(id="n"))
    short = llm.with_config(configurable={"n": 2}).invoke(QUESTION, documents=DOCS)
    assert short == ParallelCompLLM(engine=engine, max_new_tokens=2).invoke(QUESTION, documents=DOCS)


def test_the_chat_model_loads_like_the_llm(model_dir):
    chat = ChatParallelComp.from_pretrained(str(model_dir), ParallelCompConfig(chunk_tokens=64), dtype="float32",
                                            max_tokens=3, temperature=0.5, seed=1)
    assert (chat.llm.max_new_tokens, chat.llm.temperature, chat.llm.engine.config.chunk_tokens) == (3, 0.5, 64)
    assert chat.invoke(QUESTION, documents=DOCS).usage_metadata["output_tokens"] == 3


def test_timeout_stops_the_run_and_frees_the_engine(llm, serial):
    with pytest.raises(GenerationTimeout, match="timeout=1e-06"):
        llm.invoke(QUESTION, documents=DOCS, timeout=1e-6)
    assert llm.invoke(QUESTION, documents=DOCS) == serial(QUESTION)


def test_metadata_and_token_counting(llm, engine, tokenizer):
    text = "Token counting uses the model's own tokenizer."
    assert llm.get_num_tokens(text) == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert llm.get_token_ids(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm._llm_type == "parallelcomp"
    params = llm._identifying_params
    assert params["model_name"] == engine.model_name and params["config"]["chunk_tokens"] == 64
    assert ParallelCompLLM(engine=engine, temperature=0.5)._identifying_params != params  # cache keys differ


# ---------------------------------------------------------------------- ChatParallelComp


def test_a_conversational_rag_prompt_reuses_every_chunk_from_its_second_turn(engine, tokenizer):
    """LangChain's conversational RAG prompt: the context in a system message, the chat history,
    the new input. A context longer than the window moves to the corpus (rule "history") and the
    later turns follow the documents (prompts.documents_turn), so from the second turn on every
    chunk is a store hit, and each answer is the engine's own call with that system message as
    its one document."""
    from langchain_core.prompts import MessagesPlaceholder

    from .test_core import text

    config = ParallelCompConfig(chunk_tokens=64, keep_chunks=2)
    pc = ParallelComp(engine.model, tokenizer, config)
    cold = ParallelComp(engine.model, tokenizer, config.model_copy(update={"kv_store_bytes": 0}))
    prompt = ChatPromptTemplate.from_messages([("system", "Answer from the context below.\n\n{context}"),
                                               MessagesPlaceholder("chat_history"), ("human", "{input}")])
    chain = prompt | ChatParallelComp(engine=pc, max_new_tokens=N)
    context = "\n\n".join(text(300 + i, 250) for i in range(5))
    system = prompt.format_messages(context=context, chat_history=[], input="?")[0].content
    history: list[dict[str, str]] = []
    for turn, question in enumerate([QUESTION, "Where was the treaty signed?", QUESTION]):
        message = chain.invoke({"context": context, "input": question, "chat_history": [
            (HumanMessage if m["role"] == "user" else AIMessage)(m["content"]) for m in history]})
        meta = message.response_metadata
        assert meta["split"]["rule"] == "history" and meta["split"]["moved_messages"] == [0]
        stats = meta["stats"]
        assert stats["tokens_in"] > pc.window and not stats["exceeds_window"]
        assert (stats["reused_chunks"], stats["encoded_chunks"]) == ((stats["n_chunks"], 0) if turn
                                                                     else (0, stats["n_chunks"]))
        assert message.content == cold.generate(question, documents=[system], history=history, max_new_tokens=N).text
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": message.content or "?"}]


def test_chat_model_renders_history_with_the_chat_template(engine, tokenizer):
    chat = ChatParallelComp(engine=engine, max_new_tokens=N)
    messages = [SystemMessage("Answer tersely."), HumanMessage("Hi"), AIMessage("Hello!"), HumanMessage(QUESTION)]
    history = [
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    # the engine's prompt with a history is exactly the tokenizer's own chat template rendering
    parts = build_prompt(tokenizer, engine.config.instruction, QUESTION, True, False, history)
    rendered = tokenizer.apply_chat_template(
        [*history, {"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert parts.prefix_ids + parts.question_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    message = chat.invoke(messages, documents=DOCS)  # documents still chunked, history in the prefix
    direct = engine.generate(QUESTION, documents=DOCS, history=history, max_new_tokens=N)
    assert message.content == direct.text and direct.stats.n_chunks > 2
    assert len(message.response_metadata["sources"]) == len(DOCS)
    assert message.usage_metadata["output_tokens"] == message.response_metadata["stats"]["new_tokens"] == N
    assert message.response_metadata["model_name"] == engine.model_name
    batch = chat.generate([messages, messages], documents=DOCS)  # llm_output as ParallelCompLLM's: usage summed
    usage = {"prompt_tokens": 2 * message.usage_metadata["input_tokens"], "completion_tokens": 2 * N}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    assert batch.llm_output == {"model_name": engine.model_name, "token_usage": usage}
    recorder = Recorder()
    chunks = list(chat.stream(messages, {"callbacks": [recorder]}, documents=DOCS))
    assert "".join(c.text for c in chunks) == message.content
    assert recorder.tokens == [c.text for c in chunks]
    assert asyncio.run(chat.ainvoke(messages, documents=DOCS)).content == message.content


def test_a_call_whose_arguments_did_not_parse_is_sent_back_as_the_model_wrote_it():
    """Text decoded without a tool grammar can hold a call whose JSON does not parse: it comes
    back in `invalid_tool_calls`, and an agent sends that message back in its history. It was
    rendered as an empty assistant turn; now it is the model's own text, and another provider's
    invalid call keeps its name."""
    from langchain_core.outputs import GenerationChunk

    from pc_integrations.common import ToolCallText
    from pc_integrations.langchain.chat_models import _chat_chunk, _result

    written = '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>'
    for pieces in ([written], [written[:30], written[30:]]):  # at the end, or streamed as it came
        split, chunks = ToolCallText(), []
        for piece in pieces:
            split.feed(piece)
            chunks.append(_chat_chunk(GenerationChunk(text=""), split.call_deltas()))
        rest, calls, invalid = split.finish()
        chunks.append(_chat_chunk(GenerationChunk(text=rest, generation_info={}), split.last_deltas(calls, invalid)))
        message = _result(chunks).generations[0].message
        assert message.tool_calls == [] and len(message.invalid_tool_calls) == 1
        assert messages_to_prompt([message, HumanMessage("Go on.")]) == f"Assistant: {written}\n\nGo on."
    nameless = written.replace('"name": "add", ', "")  # no name where the call format puts it: never streamed
    split = ToolCallText()
    split.feed(nameless)
    rest, calls, invalid = split.finish()
    message = _result([_chat_chunk(GenerationChunk(text=rest, generation_info={}),
                                   split.last_deltas(calls, invalid))]).generations[0].message
    assert message.tool_calls == [] and message.invalid_tool_calls[0]["args"] == '{"arguments": {"a": 1,}}'
    assert messages_to_prompt([message, HumanMessage("Go on.")]) == f"Assistant: {nameless}\n\nGo on."
    foreign = AIMessage("", invalid_tool_calls=[{"name": "add", "args": '{"a": 1,', "id": "1", "error": None}])
    assert messages_to_prompt([foreign, HumanMessage("Go on.")]) == (
        'Assistant: <tool_call>\n{"name": "add", "arguments": {"a": 1,}\n</tool_call>\n\nGo on.')


def test_token_counts_of_messages_are_the_prompts(engine):
    """`get_num_tokens_from_messages` (what `trim_messages(token_counter=chat)` calls) counts the
    prompt the engine builds, tools included; the base class counted "Human: ..." lines and
    ignored tools. `stream=` (LangChain's per-call switch) is accepted; it was refused."""
    from langchain_core.messages import trim_messages

    chat = ChatParallelComp(engine=engine, max_new_tokens=N)
    messages = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage(QUESTION)]
    answer = chat.invoke(messages)
    assert chat.get_num_tokens_from_messages(messages) == answer.usage_metadata["input_tokens"]
    tools = [convert_to_openai_tool(add)]
    called = chat.bind_tools(tools, tool_choice="none").invoke(messages)
    assert chat.get_num_tokens_from_messages(messages, tools=tools) == called.usage_metadata["input_tokens"]
    assert chat.get_num_tokens_from_messages([]) == 0
    # trim_messages counts the system message on its own and subtracts it: each count holds the template's turn markup
    budget = chat.get_num_tokens_from_messages(messages[:1]) + chat.get_num_tokens_from_messages(messages[-1:])
    assert trim_messages(messages, max_tokens=budget, token_counter=chat, include_system=True) == [
        messages[0], messages[-1]]
    assert chat.invoke(messages, stream=True).content == chat.invoke(messages, stream=False).content == answer.content


def test_llm_cache_refuses_calls_its_key_cannot_tell_apart(engine):
    """LangChain's LLM cache key is the prompt and the instance's fields: with a cache, a call with
    max_tokens=2 (or other documents) returned the answer cached for the first call."""
    from langchain_core.caches import InMemoryCache

    llm = ParallelCompLLM(engine=engine, max_new_tokens=4, cache=InMemoryCache())
    first = llm.invoke(QUESTION)
    assert llm.invoke(QUESTION) == first
    for call in (lambda: llm.invoke(QUESTION, max_tokens=2), lambda: llm.bind(documents=DOCS).invoke(QUESTION),
                 lambda: llm.batch([QUESTION], temperature=1.0, seed=3),
                 lambda: asyncio.run(llm.ainvoke(QUESTION, max_tokens=2))):
        with pytest.raises(InputError, match=r"cache key leaves out per-call arguments \("):
            call()
    assert ParallelCompLLM(engine=engine, max_new_tokens=4).invoke(QUESTION, max_tokens=2)  # no cache: fine


def test_chat_prompt_rule_and_bad_messages(engine):
    history = [
        SystemMessage("Be brief."),
        HumanMessage("Hi"),
        AIMessage("", tool_calls=[{"name": "ask_corpus", "args": {"question": "q"}, "id": "1"}]),
        ToolMessage("It was 1874.", tool_call_id="1"),
    ]
    assert messages_to_prompt(history) == (
        "Be brief.\n\nUser: Hi\n\nAssistant: <tool_call>\n"
        '{"name": "ask_corpus", "arguments": {"question": "q"}}\n</tool_call>\n\nTool: It was 1874.'
    )
    # without a chat template the list is flattened into that one question
    plain = ParallelComp(engine.model, engine.tokenizer, engine.config.replace(use_chat_template=False))
    flat = ChatParallelComp(engine=plain, max_new_tokens=N)
    messages = [SystemMessage("Be brief."), HumanMessage(QUESTION)]
    assert flat.invoke(messages, documents=DOCS).content == plain.generate(
        messages_to_prompt(messages), documents=DOCS, max_new_tokens=N
    ).text
    chat = ChatParallelComp(engine=engine, max_new_tokens=N)
    recorder = Recorder()
    with pytest.raises(InputError, match="question is empty"):
        chat.invoke([HumanMessage("Hi"), AIMessage("Hello"), HumanMessage(" ")], {"callbacks": [recorder]})
    assert len(recorder.errors) == 1
    # content that is not text is refused, not dropped (the model would answer about an unseen image)
    for block in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                  {"type": "image", "base64": "AAAA", "mime_type": "image/png"}, {"type": "file", "file_id": "f1"}):
        with pytest.raises(InputError, match=f"message 0 holds '{block['type']}' content: this engine reads text only"):
            chat.invoke([HumanMessage(content=[{"type": "text", "text": "What is in this image?"}, block])])
    when = AIMessage("", tool_calls=[{"name": "ask_corpus", "args": {"day": object()}, "id": "1"}])
    with pytest.raises(InputError, match="arguments of the tool call 'ask_corpus' in the history are not JSON"):
        chat.invoke([HumanMessage("Hi"), when, ToolMessage("It was 1874.", tool_call_id="1")])


# Qwen2.5-Instruct's handling of tools and tool turns (its tokenizer_config.json), without its
# default system message: parallel tool results are grouped into one user turn.
QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- endif %}{{- '\\n\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def shout(word: str) -> str:
    """Upper-case a word."""
    return word.upper()


CALLS = [{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}, {"name": "shout", "args": {"word": "hi"}, "id": "c2"}]
LAST_TURNS = {  # LangChain messages, and the same chat as Hugging Face messages
    "tool results": (
        [SystemMessage("Be brief."), HumanMessage("Add 1+2 and shout hi."), AIMessage("", tool_calls=CALLS),
         ToolMessage("3", tool_call_id="c1"), ToolMessage("HI", tool_call_id="c2")],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1+2 and shout hi."},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": c["name"], "arguments": c["args"]}} for c in CALLS]},
         {"role": "tool", "content": "3"}, {"role": "tool", "content": "HI"}]),
    "assistant": ([HumanMessage("Capital of France?"), AIMessage("Paris.")],
                  [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]),
    "system": ([HumanMessage("Hi"), SystemMessage("Answer in French.")],
               [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Answer in French."}]),
}


@pytest.mark.parametrize("last", LAST_TURNS)
def test_a_chat_ending_in_any_role_is_the_templates_own_rendering(tokenizer, monkeypatch, last):
    """An agent's chat ends in tool results (LangGraph's ToolNode), or in the agent's answer
    (create_react_agent's response_format asks for a structured response after it). The prompt is
    the chat template's own rendering of the whole chat, the last turn with its own role. Before, a
    last tool result became a user turn "Tool: ...", and a last assistant or system message was
    refused."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN_TEMPLATE
    engine = ParallelComp(tiny_model("qwen2", len(tok)), tok, ParallelCompConfig())
    calls = []
    stream = engine.stream
    monkeypatch.setattr(engine, "stream", lambda q, *a, **kw: calls.append((q, a, kw)) or stream(q, *a, **kw))
    messages, hf = LAST_TURNS[last]
    tools = [convert_to_openai_tool(t) for t in (add, shout)]
    answer = ChatParallelComp(engine=engine, max_tokens=N).bind_tools(tools, tool_choice="none").invoke(messages)
    (question, args, kw), = calls
    assert args == () and kw["documents"] is None
    parts = engine.prompt_parts(question, False, kw["history"], kw["tools"], kw["role"])
    rendered = tok.apply_chat_template(hf, tools=tools, tokenize=False, add_generation_prompt=True)
    assert parts.prefix_ids + parts.question_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert answer.content == engine.generate(question, history=kw["history"], role=kw["role"], tools=tools,
                                             tool_choice="none", max_new_tokens=N).text


def test_structured_output_after_the_agents_answer(engine):
    """create_react_agent(..., response_format=...) runs with_structured_output on the whole chat,
    which ends in the agent's last answer."""
    from pydantic import BaseModel

    class Verdict(BaseModel):
        correct: bool

    chat = ChatParallelComp(engine=engine, max_tokens=40)
    messages = [HumanMessage("Is Paris the capital of France?"), AIMessage("Yes.")]
    got = chat.with_structured_output(Verdict).invoke(messages)
    direct = engine.generate("Yes.", history=[{"role": "user", "content": "Is Paris the capital of France?"}],
                             role="assistant", tools=[convert_to_openai_tool(Verdict)], tool_choice="Verdict",
                             max_new_tokens=40)
    assert got == Verdict(**parse_tool_calls(direct.text)[1][0]["arguments"])


# ---------------------------------------------------------------------- chains and the tool


def test_retrieval_chain_passes_documents_as_chunks(llm, serial):
    docs = [Document(page_content=t, metadata={"id": i}) for i, t in enumerate(DOCS)]
    chain = create_parallelcomp_retrieval_chain(CorpusRetriever(documents=docs), llm)
    out = chain.invoke({"input": QUESTION})
    assert out["input"] == QUESTION and out["context"] == docs
    assert out["answer"] == serial(QUESTION)
    kept = [docs[s["index"]] for s in out["sources"] if s["kept"]]
    assert out["kept_context"] == kept and out["kept_context"] + out["evicted_context"] != []
    assert sorted(d.metadata["id"] for d in out["kept_context"] + out["evicted_context"]) == [0, 1, 2, 3]
    # streaming adds up to the same output
    pieces = list(chain.stream({"input": QUESTION}))
    assert "".join(p.get("answer", "") for p in pieces) == out["answer"]
    assert sum(1 for p in pieces if p.get("answer")) >= 3
    assert out["stats"]["n_chunks"] > 2 and out["stats"]["n_kept"] == 2  # the run's RunStats, keep_chunks=2
    again = asyncio.run(chain.ainvoke({"input": QUESTION}))
    assert {**again, "stats": None} == {**out, "stats": None}  # stats: another run's timings and store hits


def test_async_chain_events_show_the_model_run(llm, serial, caplog):
    chain = create_parallelcomp_retrieval_chain(CorpusRetriever(documents=DOCS), llm)

    async def run():
        return [e async for e in chain.astream_events({"input": QUESTION}, version="v2")]

    events = [e for e in asyncio.run(run()) if e["name"] == "ParallelCompLLM"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "on_llm_start" and kinds[-1] == "on_llm_end" and set(kinds[1:-1]) == {"on_llm_stream"}
    assert "".join(e["data"]["chunk"].text for e in events[1:-1]) == serial(QUESTION)
    assert len({e["run_id"] for e in events}) == 1
    assert not [r for r in caplog.records if "callback" in r.getMessage()]  # no "Run ID not found"


def test_documents_chain_is_a_drop_in_for_stuff_prompts(llm):
    prompt = ChatPromptTemplate.from_messages([("system", "Use this context:\n{context}"), ("human", "{input}")])
    chain = create_parallelcomp_documents_chain(llm, prompt)
    answer = chain.invoke({"input": QUESTION, "context": [Document(page_content=t) for t in DOCS]})
    rendered = prompt.invoke({"input": QUESTION, "context": ""})
    assert answer == llm.invoke(rendered, documents=DOCS)  # the documents were not stuffed into the prompt
    assert "".join(chain.stream({"input": QUESTION, "context": DOCS})) == answer


class Failing(BaseRetriever):
    def _get_relevant_documents(self, query, *, run_manager):
        raise RuntimeError("index offline")


class Empty(BaseRetriever):
    def _get_relevant_documents(self, query, *, run_manager):
        return []


def test_chain_errors_surface_through_callbacks(llm):
    recorder = Recorder()
    chain = create_parallelcomp_retrieval_chain(Failing(), llm)
    with pytest.raises(RuntimeError, match="index offline"):
        chain.invoke({"input": QUESTION}, {"callbacks": [recorder]})
    assert recorder.chain_errors and recorder.starts == 0
    with pytest.raises(RuntimeError, match="index offline"):
        asyncio.run(asyncio.wait_for(chain.ainvoke({"input": QUESTION}), 30))

    with pytest.raises(InputError, match="must be a dict with a 'context' key holding the documents"):
        create_parallelcomp_retrieval_chain(RunnableLambda(lambda q: None), llm).invoke({"input": QUESTION})
    recorder = Recorder()
    with pytest.raises(InputError, match="corpus is empty"):
        create_parallelcomp_retrieval_chain(Empty(), llm).invoke({"input": QUESTION}, {"callbacks": [recorder]})
    assert len(recorder.errors) == 1 and recorder.ends == 0  # raised inside the model run

    # the two helpers mirror LangChain's argument orders: (retriever, llm) and (llm, retriever)
    with pytest.raises(InputError, match=r"create_parallelcomp_retrieval_chain\(retriever, llm\): llm must be"):
        create_parallelcomp_retrieval_chain(llm, Empty())
    with pytest.raises(InputError, match=r"create_parallelcomp_tool\(llm, retriever\): llm must be"):
        create_parallelcomp_tool(Empty(), llm)
    with pytest.raises(InputError, match=r"takes \{'input': question\} .*got \['question'\]"):
        create_parallelcomp_retrieval_chain(Empty(), llm).invoke({"question": QUESTION})


def test_tool_direct_and_in_an_agent_loop(llm, serial):
    docs = [Document(page_content=t, metadata={"id": i}) for i, t in enumerate(DOCS)]
    tool = create_parallelcomp_tool(llm, documents=docs)
    assert tool.name == "ask_corpus" and set(tool.args) == {"question"}
    expected = serial(QUESTION)
    assert tool.invoke({"question": QUESTION}) == expected

    call = {"name": tool.name, "args": {"question": QUESTION}, "id": "call-1", "type": "tool_call"}
    agent = FakeMessagesListChatModel(responses=[AIMessage("", tool_calls=[call]), AIMessage("Done.")])
    messages = [HumanMessage(QUESTION)]
    tools = {tool.name: tool}
    for _ in range(3):  # a minimal agent loop: model → tool calls → tool messages → model
        reply = agent.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            break
        messages += [tools[c["name"]].invoke(c) for c in reply.tool_calls]
    tool_message = messages[2]
    assert isinstance(tool_message, ToolMessage) and tool_message.content == expected
    assert tool_message.tool_call_id == "call-1"
    assert [s["index"] for s in tool_message.artifact["sources"]] == [0, 1, 2, 3]
    assert tool_message.artifact["kept_context"] and messages[-1].content == "Done."
    assert tool_message.artifact["stats"]["n_chunks"] > 2 and "reused_chunks" in tool_message.artifact["stats"]
    assert asyncio.run(tool.ainvoke(call)).content == expected
    # an error of the run is the tool's answer, so an agent can react instead of its run ending
    long = {**call, "args": {"question": "why " * 3000}}
    for message in (tool.invoke(long), asyncio.run(tool.ainvoke(long))):
        assert message.status == "error" and message.content.startswith("Error: ") and "question" in message.content

    with pytest.raises(InputError, match="exactly one"):
        create_parallelcomp_tool(llm)


def test_prompt_template_variables_reach_the_question(llm):
    prompt = PromptTemplate.from_template("In one word: {input}")
    chain = create_parallelcomp_retrieval_chain(CorpusRetriever(documents=DOCS), llm, prompt)
    assert chain.invoke({"input": QUESTION})["answer"] == llm.invoke(f"In one word: {QUESTION}", documents=DOCS)
