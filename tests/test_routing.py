"""The routing rule (`pc_integrations.common.route`) and stuffed prompts far beyond the window
through both frameworks: LangChain `prompt | llm` (what `create_stuff_documents_chain` runs) and
LlamaIndex's own compact / refine / tree_summarize synthesizers with our LLM. Every answer is
checked token for token against the engine run on the split the rule reports."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import torch
from langchain_classic.chains.combine_documents import create_stuff_documents_chain
from langchain_classic.chains.summarize.refine_prompts import REFINE_PROMPT
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate
from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT, CHAT_TREE_SUMMARIZE_PROMPT
from llama_index.core.prompts.default_prompts import DEFAULT_REFINE_PROMPT_TMPL
from llama_index.core.response_synthesizers import get_response_synthesizer
from llama_index.core.schema import NodeWithScore, TextNode

from parallelcomp import InputError, ParallelComp, ParallelCompConfig
from pc_integrations.common import CONTEXT_MARKER, GUESSES, CallError, StuffedPromptWarning, route
from pc_integrations.langchain import ChatParallelComp, ParallelCompLLM
from pc_integrations.llama_index import ParallelCompLLM as LlamaIndexLLM

from .conftest import tiny_model

N = 8
QUESTION = "When was the lighthouse built?"
FACTS = [
    "The lighthouse on Skerry Island was built in 1874 and painted red.",
    "Tomatoes were brought to Europe in the sixteenth century.",
    "The treaty was signed in Lisbon by eleven delegates.",
    "A violin has four strings tuned in perfect fifths.",
]
CORPUS = "\n\n".join(" ".join(FACTS[i % 4] for _ in range(8)) for i in range(40))  # ~5× the window
LINES, ONE_LINE = CORPUS.replace("\n\n", "\n"), CORPUS.replace("\n\n", " ")
FAQ = "\nQuestion: Who paints it?\nThe keeper's family."
REFINE = DEFAULT_REFINE_PROMPT_TMPL.replace("{query_str}", QUESTION).replace(
    "{existing_answer}", "In 1900.").replace("{context_msg}", "{}")
REFINE_QUESTION = (
    f"The original query is as follows: {QUESTION}\nWe have provided an existing answer: In 1900.\n"
    "We have the opportunity to refine the existing answer (only if needed) with some more context below.\n"
    "Given the new context, refine the original answer to better answer the query. "
    "If the context isn't useful, return the original answer.")
RAG_INSTRUCTION = (  # LangChain's RAG tutorial prompt (hub rlm/rag-prompt): the question before the context
    "You are an assistant for question-answering tasks. Use the following pieces of retrieved context to answer "
    "the question. If you don't know the answer, just say that you don't know. Use three sentences maximum and "
    "keep the answer concise.")
LC_REFINE = REFINE_PROMPT.template
LC_REFINE_QUESTION = (
    "Your job is to produce a final summary.\nWe have provided an existing summary up to a certain point: Velmora.\n"
    "We have the opportunity to refine the existing summary (only if needed) with some more context below.\n"
    "Given the new context, refine the original summary.\nIf the context isn't useful, return the original summary.")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tokenizer):
    config = ParallelCompConfig(chunk_tokens=128, keep_chunks=2)
    return ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, config)


def test_corpus_is_several_windows(engine):
    assert engine.count_tokens(CORPUS) > 4 * engine.window


@pytest.mark.parametrize(
    ("prompt", "rule", "context", "question"),
    [
        (f"Context:\n{CORPUS}\n\nQuestion: {QUESTION}\nAnswer:", "label", f"Context:\n{CORPUS}\n\n", QUESTION),
        (f"{CORPUS}\nQuery: {QUESTION}", "label", f"{CORPUS}\n", QUESTION),
        # LlamaIndex's chat refine prompt: the question keeps the earlier answer, not the cue
        (f"New Context: {CORPUS}\nQuery: {QUESTION}\nOriginal Answer: Velmora.\nNew Answer: ", "label",
         f"New Context: {CORPUS}\n", f"{QUESTION}\nOriginal Answer: Velmora."),
        # text refine prompts (LlamaIndex's, LangChain's refine summarize chain): the query and the
        # earlier answer sit above the delimited context, the instruction below it; a "Question:"
        # line inside the context is part of it
        (REFINE.format(CORPUS + FAQ), "block", f"\n{CORPUS}{FAQ}\n", REFINE_QUESTION),
        (LC_REFINE.format(existing_answer="Velmora.", text=CORPUS), "block", f"\n{CORPUS}\n", LC_REFINE_QUESTION),
        # the question first, then the context after a context label
        (f"{RAG_INSTRUCTION}\nQuestion: {QUESTION} \nContext: {CORPUS} \nAnswer:", "label",
         f"{RAG_INSTRUCTION}\nContext: {CORPUS} ", QUESTION),
        (f"Answer using the documents below.\n\nQuestion: {QUESTION}\n\nDocuments:\n{CORPUS}", "label",
         f"Answer using the documents below.\n\nDocuments:\n{CORPUS}", QUESTION),
        (f"Question: {QUESTION}\nContext:{FAQ}\n{CORPUS}", "label", f"Context:{FAQ}\n{CORPUS}", QUESTION),
        # the instruction first, with no question at the end (LangChain's stuff summarize prompt)
        (f'Write a concise summary of the following:\n\n\n"{CORPUS}"\n\n\nCONCISE SUMMARY:', "lead",
         f'\n"{CORPUS}"\n', "Write a concise summary of the following:\nCONCISE SUMMARY:"),
        (f"Find the year in the text below.\n\n{CORPUS}", "lead", CORPUS, "Find the year in the text below."),
        (f"Use the following notes:\n\n{CORPUS}\n\n{QUESTION}", "paragraph", f"Use the following notes:\n\n{CORPUS}",
         QUESTION),
        (f"{CORPUS}\n\n{QUESTION}", "paragraph", CORPUS, QUESTION),
        (f"{LINES}\n{QUESTION}\nAssistant:", "line", LINES, QUESTION),
        (f"{ONE_LINE} {QUESTION}", "sentence", f"{ONE_LINE} ", QUESTION),
    ],
)
def test_rule_finds_the_question(engine, prompt, rule, context, question):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        routed = route(engine, prompt, max_new_tokens=N)
    assert routed.split["rule"] == rule
    assert [w.category for w in caught] == ([StuffedPromptWarning] if rule in GUESSES else [])  # a guess says so
    assert routed.question == question
    assert [s.text for s in routed.sources] == [context]
    assert routed.split["context_chars"] == len(context)


def test_rule_order_and_bounds(engine):
    # short prompts are plain questions; documents and the marker come first
    assert route(engine, QUESTION).split["rule"] == "question" and route(engine, QUESTION).sources is None
    assert route(engine, QUESTION, documents=FACTS).split["rule"] == "documents"
    assert route(engine, f"{CORPUS}{CONTEXT_MARKER}{QUESTION}").split["rule"] == "marker"
    # a label whose question is longer than the budget falls through to the next rule
    long_label = f"{CORPUS}\nQuestion: {CORPUS[:3000]}\n\n{QUESTION}"
    assert route(engine, long_label, max_new_tokens=N).split["rule"] == "paragraph"
    # a tool result that opens like an instruction is not one: no lead rule outside user turns
    results = f"Results of the search below:\n\n{CORPUS}"
    assert route(engine, results, max_new_tokens=N).split["rule"] == "lead"
    assert route(engine, results, max_new_tokens=N, role="tool").split["rule"] == "paragraph"
    # one endless sentence: the trailing tokens within the budget
    words = " ".join(["word"] * 4000)
    routed = route(engine, words, max_new_tokens=N)
    assert routed.split["rule"] == "tail" and f"{routed.sources[0].text.rstrip()} {routed.question}" == words
    with pytest.raises(InputError, match="prompt must be a string"):
        route(engine, None)


def test_langchain_stuffed_prompt_equals_engine_on_the_split(engine):
    llm = ParallelCompLLM(engine=engine, max_new_tokens=N)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this context:\n\n{context}"), ("human", "Question: {input}")]
    )
    chain = prompt | llm  # create_stuff_documents_chain's core: the documents stuffed into {context}
    rendered = prompt.invoke({"context": CORPUS, "input": QUESTION}).to_string()
    result = llm.generate([rendered])
    info = result.generations[0][0].generation_info
    assert info["split"]["rule"] == "label" and info["stats"]["n_chunks"] > 4
    context = rendered[: rendered.rindex("\nHuman: Question:") + 1]
    direct = engine.generate(QUESTION, context=context, max_new_tokens=N)
    assert result.generations[0][0].text == direct.text == chain.invoke({"context": CORPUS, "input": QUESTION})
    assert asyncio.run(chain.ainvoke({"context": CORPUS, "input": QUESTION})) == direct.text
    chat = ChatParallelComp(llm=llm)
    message = chat.invoke(f"{CORPUS}\n\nQuestion: {QUESTION}")
    assert message.response_metadata["split"]["rule"] == "label" and message.usage_metadata["output_tokens"] > 0


def test_a_long_tool_result_is_the_corpus_of_the_users_question(engine):
    """An agent's loop ending in a tool result longer than the window: that result and the results
    since the user's question are the corpus, and the question is asked over them. Before, a
    paragraph of the result was the question, and the chunks were scored by it."""
    call = {"name": "search", "args": {"query": "lighthouse"}, "id": "c1", "type": "tool_call"}
    messages = [SystemMessage("Use the tools."), HumanMessage(QUESTION), AIMessage("", tool_calls=[call]),
                ToolMessage(FACTS[1], tool_call_id="c1"), AIMessage("", tool_calls=[{**call, "id": "c2"}]),
                ToolMessage(CORPUS, tool_call_id="c2")]
    chat = ChatParallelComp(engine=engine, max_tokens=N)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a guess: no StuffedPromptWarning
        message = chat.invoke(messages)
    split = {"rule": "result", "question_chars": len(QUESTION), "context_chars": len(FACTS[1]) + len(CORPUS)}
    assert message.response_metadata["split"] == split
    assert [s["metadata"] for s in message.response_metadata["sources"]] == [{"role": "tool"}] * 2
    direct = engine.generate(QUESTION, documents=[FACTS[1], CORPUS], history=[{"role": "system", "content": "Use the tools."}],
                             max_new_tokens=N)
    assert message.content == direct.text and direct.stats.n_chunks > 4


def test_stuffed_system_message_moves_into_the_corpus(engine):
    """LangChain's RAG tutorial: `create_stuff_documents_chain` with the documents stuffed into a
    system message and the question as the human turn."""
    chat = ChatParallelComp(engine=engine, max_tokens=N)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from this context:\n\n{context}"), ("human", "Hi"), ("ai", "Hello!"), ("human", "{input}")]
    )
    docs = [Document(page_content=p) for p in CORPUS.split("\n\n")]
    answer = create_stuff_documents_chain(chat, prompt).invoke({"context": docs, "input": QUESTION})
    message = chat.invoke(prompt.invoke({"context": CORPUS, "input": QUESTION}))
    system = f"Answer from this context:\n\n{CORPUS}"
    assert message.response_metadata["split"] == {
        "rule": "history", "question_chars": len(QUESTION), "context_chars": len(system), "moved_messages": [0]}
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    direct = engine.generate(QUESTION, documents=[system], history=history, max_new_tokens=N)
    assert answer == message.content == direct.text
    assert [c["kept"] for c in message.response_metadata["chunks"]] == [c.kept for c in direct.chunks]
    # the longest messages move first, only while the prefix takes more than half the window
    two = [{"role": "system", "content": system}, {"role": "user", "content": CORPUS[:3000]}, *history]
    routed = route(engine, QUESTION, max_new_tokens=N, history=two)
    assert routed.split["moved_messages"] == [0, 1] and routed.history == history
    assert [(s.text, s.metadata) for s in routed.sources] == [
        (system, {"role": "system", "message": 0}), (CORPUS[:3000], {"role": "user", "message": 1})]
    assert route(engine, QUESTION, documents=FACTS, history=two).split["rule"] == "documents"
    assert route(engine, QUESTION, history=history).history == history  # short histories stay


def _nodes():
    return [NodeWithScore(node=TextNode(text=p), score=1.0) for p in CORPUS.split("\n\n")]


@pytest.mark.parametrize("mode", ["compact", "refine", "tree_summarize"])
def test_llama_index_synthesizers_with_our_llm(engine, mode):
    llm = LlamaIndexLLM(engine, max_new_tokens=N)
    synth = get_response_synthesizer(llm=llm, response_mode=mode)
    response = synth.synthesize(QUESTION, _nodes())
    assert response.response and response.response != "Empty Response"
    if mode != "refine":  # one packed call over everything (our context_window), split at "Query:"
        template = CHAT_TEXT_QA_PROMPT if mode == "compact" else CHAT_TREE_SUMMARIZE_PROMPT  # a chat model's
        system, user = template.format_messages(context_str=CORPUS, query_str=QUESTION)
        history = [{"role": "system", "content": system.content}]
        out = engine.generate(QUESTION, context=user.content.rsplit("Query:", 1)[0], history=history, max_new_tokens=N)
        assert response.response == out.text


def test_llama_index_errors_reach_the_user_not_empty_response(engine):
    # max_new_tokens leaves no room for a question in the 1024-token window: refused, and
    # LlamaIndex's refine/compact loop (which swallows ValueError) does not hide it
    synth = get_response_synthesizer(llm=LlamaIndexLLM(engine, max_new_tokens=1010), response_mode="compact")
    with pytest.raises(CallError, match="tokens") as raised:
        synth.synthesize(QUESTION, _nodes())
    assert isinstance(raised.value.__cause__, InputError)


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_an_empty_prompt_is_an_input_error_in_both_frameworks(engine, prompt):
    with pytest.raises(InputError, match="question is empty"):
        ParallelCompLLM(engine=engine, max_new_tokens=N).invoke(prompt)
    with pytest.raises(CallError, match="question is empty") as raised:
        LlamaIndexLLM(engine, max_new_tokens=N).complete(prompt)
    assert isinstance(raised.value.__cause__, InputError)
    with pytest.raises(InputError, match="question is empty"):
        engine.prompt_parts(prompt, with_documents=False)
