"""Grammar-constrained output (parallelcomp/grammar.py) through the engine and both wrappers.

The tiny random model writes whatever its random weights favour, so every valid output below is
the grammar's doing: a schema whose every field is bounded (ints with limits, enums, strings
with maxLength, lists with maxItems) must come back valid for every seed. SmolLM2 runs the
agent over a QueryEngineTool (and the LangChain standard tool/structured tests,
test_langchain_standard.py).
"""

from __future__ import annotations

import copy
import json
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from parallelcomp import InputError, ParallelComp, ParallelCompConfig, StructuredOutputError
from parallelcomp.grammar import (OPEN, calls_so_far, closed_schema, ll_tokenizer, llguidance, parse_tool_calls, schema_grammar,
                                  tool_grammar, tools_prompt)
from pc_integrations.common import CallError, ToolCallText

from .conftest import STRICT_TEMPLATE, tiny_model, with_template

SEEDS = range(8)


class Reading(BaseModel):
    model_config = {"extra": "forbid"}
    level: int = Field(ge=0, le=99)
    colour: Literal["red", "green", "blue"]
    ok: bool
    label: str = Field(max_length=8)
    tags: list[Literal["a", "b"]] = Field(max_length=3)


SCHEMA = Reading.model_json_schema()
LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look a section up.",
    "parameters": {"type": "object", "properties": {"section": {"type": "integer", "minimum": 1, "maximum": 20}},
                   "required": ["section"]}}}
PING = {"type": "function", "function": {"name": "ping", "description": "Check the service.",
                                         "parameters": {"type": "object", "properties": {}}}}
DOCS = ["The licence steward is the Mozilla Foundation.", "Apache is a web server.", "Cats sleep a lot."]


@pytest.fixture
def engine(make_engine):
    return make_engine(chunk_tokens=64)


def test_json_schema_output_is_valid_for_every_seed(engine):
    for seed in SEEDS:
        out = engine.generate("Report the reading.", json_schema=SCHEMA, max_new_tokens=64, temperature=1.0, seed=seed)
        Reading.model_validate_json(out.text)  # raises on any invalid output
        assert out.stats.finish_reason == "stop"


def test_json_schema_with_documents_and_greedy(engine):
    out = engine.generate("Report the reading.", documents=DOCS, json_schema=SCHEMA, max_new_tokens=64)
    Reading.model_validate_json(out.text)
    assert out.stats.n_chunks >= 1


@pytest.mark.parametrize("choice", ["required", "lookup", "ping"])
def test_forced_tool_calls_parse_and_match_their_schema(engine, choice):
    for seed in SEEDS[:6]:
        out = engine.generate("Which section?", tools=[LOOKUP, PING], tool_choice=choice, max_new_tokens=48,
                              temperature=1.0, seed=seed)
        content, calls, invalid = parse_tool_calls(out.text)
        assert content.strip() == "" and invalid == [] and len(calls) == 1
        call = calls[0]
        assert call["id"].startswith("call_") and (choice == "required" or call["name"] == choice)
        if call["name"] == "lookup":
            assert list(call["arguments"]) == ["section"] and 1 <= call["arguments"]["section"] <= 20
        else:
            assert call["arguments"] == {}


def test_auto_and_none_modes(engine):
    for seed in SEEDS[:4]:
        out = engine.generate("Hello", tools=[LOOKUP], max_new_tokens=24, temperature=1.0, seed=seed)
        content, calls, invalid = parse_tool_calls(out.text)
        assert invalid == [] and (OPEN not in content)  # free text never opens a call it does not finish
    # "none": the tools are described, but the output is text without a call
    prompt = engine.prompt_parts("Hello", False, tools=[LOOKUP])
    assert tools_prompt([LOOKUP]) in engine.tokenizer.decode(prompt.prefix_ids)
    for seed in SEEDS[:4]:
        free = engine.generate("Hello", tools=[LOOKUP], tool_choice="none", max_new_tokens=12, temperature=1.0,
                               seed=seed)
        assert OPEN not in free.text and free.stats.new_tokens >= 1


def test_tools_under_a_template_without_a_system_role(tokenizer):
    """A template that refuses system messages (Mistral-v0.1, Gemma-2) gets the tool description
    at the start of the user turn; it was put in a system message, which the template refused."""
    tok = with_template(tokenizer, STRICT_TEMPLATE)
    engine = ParallelComp(tiny_model("mistral", len(tok)), tok, ParallelCompConfig())
    parts = engine.prompt_parts("Which section?", False, tools=[LOOKUP])
    expected = tok.apply_chat_template([{"role": "user", "content": f"{tools_prompt([LOOKUP])}\n\nWhich section?"}],
                                       tokenize=False, add_generation_prompt=True)
    assert tok.decode(parts.prefix_ids + parts.question_ids) == expected  # the prefix is encoded on its own
    out = engine.generate("Which section?", tools=[LOOKUP], tool_choice="lookup", max_new_tokens=32)
    assert [c["name"] for c in parse_tool_calls(out.text)[1]] == ["lookup"]


def test_a_json_answer_beside_tools(engine, tokenizer):
    """json_schema= with tools (OpenAI's response_format beside tools): the output is the JSON
    value or calls, never free text; "none" gives the value. Before, the pair was refused."""
    for seed in SEEDS:
        out = engine.generate("Report the reading.", tools=[LOOKUP], json_schema=SCHEMA, max_new_tokens=64,
                              temperature=1.0, seed=seed)
        content, calls, invalid = parse_tool_calls(out.text)
        assert invalid == []
        if calls:
            assert content.strip() == "" and all(c["name"] == "lookup" for c in calls)
        else:
            Reading.model_validate_json(out.text)
        Reading.model_validate_json(engine.generate("Report the reading.", tools=[LOOKUP], json_schema=SCHEMA,
                                                    tool_choice="none", max_new_tokens=64, temperature=1.0,
                                                    seed=seed).text)
    llg = llguidance()
    grammar = tool_grammar([LOOKUP], "auto", tokenizer, True, {"type": "object", "properties": {"ok": {"type": "boolean"}}})
    call = '<tool_call>\n{"name": "lookup", "arguments": {"section": 3}}\n</tool_call>'
    for text, accepted in [('{"ok": true}', True), (call, True), (f"{call}\n{call}", True),
                           ("Hello", False), (f'{{"ok": true}}{call}', False), (f"Let me look.{call}", False)]:
        matcher = llg.LLMatcher(ll_tokenizer(tokenizer, len(tokenizer), {tokenizer.eos_token_id}), grammar)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert (all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()) == accepted, text


@pytest.mark.parametrize("marker", ["text", "added token"])
def test_tool_grammars_accept_exactly_text_then_calls(tokenizer, marker):
    """The grammars themselves, string by string: free text may precede calls in "auto" (its
    lexeme ends at the marker), and no free text holds the marker's stem (SmolLM2 under "none"
    once wrote `<tool_call id=...>`)."""
    tok = copy.deepcopy(tokenizer)
    if marker == "added token":
        tok.add_tokens([OPEN, "</tool_call>"])
    call = '<tool_call>\n{"name": "lookup", "arguments": {"section": 3}}\n</tool_call>'

    def accepts(choice: str, text: str, parallel: bool = True) -> bool:
        grammar = tool_grammar([LOOKUP], choice, tok, parallel)
        matcher = llguidance().LLMatcher(ll_tokenizer(tok, len(tok), {tok.eos_token_id}), grammar)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    for choice in ("auto", "none"):
        assert accepts(choice, "Section 3 covers it.")
        assert not accepts(choice, 'Let me see. <tool_call id="1">{}')
    assert accepts("auto", f"Let me look.\n{call}") and accepts("auto", f"{call}\n{call}")
    assert not accepts("auto", f"{call} and more text") and not accepts("none", call)
    assert accepts("required", call) and not accepts("required", f"Sure.\n{call}")
    # parallel_tool_calls=False: at most one call
    assert accepts("auto", f"Let me look.\n{call}", parallel=False) and accepts("auto", "Fine.", parallel=False)
    assert not accepts("auto", f"{call}\n{call}", parallel=False)


class Person(BaseModel):
    name: str = Field(max_length=6)


class Team(BaseModel):
    lead: Person
    size: int = Field(ge=1, le=9)


TEAM = {"type": "function", "function": {"name": "make_team", "description": "Make a team.",
                                         "parameters": Team.model_json_schema()}}


def test_nested_tool_parameters_keep_their_references(tokenizer, engine):
    """pydantic writes a nested model as {"$ref": "#/$defs/Person"}; inside the call grammar the
    parameters sit under a call schema, so their references are rebased there."""
    assert "$defs" in TEAM["function"]["parameters"]
    grammar = tool_grammar([LOOKUP, TEAM], "required", tokenizer)
    ids = tokenizer('<tool_call>\n{"name": "make_team", "arguments": {"lead": {"name": "Ada"}, "size": 3}}\n</tool_call>',
                    add_special_tokens=False)["input_ids"]
    matcher = llguidance().LLMatcher(ll_tokenizer(tokenizer, len(tokenizer), {tokenizer.eos_token_id}), grammar)
    assert all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()
    out = engine.generate("Make a team.", tools=[TEAM], tool_choice="make_team", max_new_tokens=64, temperature=1.0,
                          seed=0)
    _, calls, invalid = parse_tool_calls(out.text)
    assert invalid == [] and Team.model_validate(calls[0]["arguments"])


class Folder(BaseModel):
    name: str = Field(max_length=6)
    children: list[Folder] = []


def test_a_recursive_model_is_constrained_all_the_way_down(tokenizer, engine):
    """LangChain's schema converters inline references and drop a recursive one (`items: {}`, any
    value), so a child could be anything and the parsed answer a pydantic error; the grammar of
    both methods keeps the recursion."""
    from pc_integrations.langchain import ChatParallelComp

    chat = ChatParallelComp(engine=engine)
    tool = chat.with_structured_output(Folder).first.kwargs["tools"][0]
    grammars = {"function_calling": tool_grammar([tool], "required", tokenizer),
                "json_schema": schema_grammar(chat.with_structured_output(Folder, method="json_schema")
                                              .first.kwargs["json_schema"])}
    deep = '{"name": "a", "children": [{"name": "b", "children": [{"name": "c", "children": []}]}]}'
    for method, grammar in grammars.items():
        def accepts(value: str) -> bool:
            text = f'<tool_call>\n{{"name": "Folder", "arguments": {value}}}\n</tool_call>' \
                if method == "function_calling" else value
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            matcher = llguidance().LLMatcher(ll_tokenizer(tokenizer, len(tokenizer), {tokenizer.eos_token_id}), grammar)
            return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

        assert accepts(deep) and Folder.model_validate_json(deep)
        assert not accepts('{"name": "a", "children": ["b"]}'), method
        assert not accepts('{"name": "a", "children": [{"name": "b", "children": [1]}]}'), method
        assert not accepts('{"name": "a", "children": [{"name": "toolong"}]}'), method


@pytest.mark.parametrize(
    ("choice", "match"),
    [
        (["lookup"], "tool_choice must be a string, True, None or a dict"),
        (1, "tool_choice must be a string, True, None or a dict"),
        ({"type": "function", "function": "lookup"}, "names no tool"),
        ({"type": "function"}, "names no tool"),
        ({}, "names no tool"),
    ],
)
def test_malformed_tool_choice_is_an_input_error(engine, choice, match):
    with pytest.raises(InputError, match=match):
        engine.generate("q", tools=[LOOKUP], tool_choice=choice)


def test_tool_choice_spellings_of_other_providers(engine):
    from parallelcomp.settings import GenerationSettings

    for choice, expected in [({"type": "any"}, "required"), ({"type": "tool", "name": "lookup"}, "lookup"),
                             ({"type": "function", "function": {"name": "lookup"}}, "lookup"), ({"type": "auto"}, "auto")]:
        assert GenerationSettings.of(tools=[LOOKUP], tool_choice=choice).tool_choice == expected


def test_unusable_tool_definitions_are_refused_when_bound(engine):
    from pc_integrations.langchain import ChatParallelComp

    def tool(parameters):
        return {"type": "function", "function": {"name": "f", "parameters": parameters}}

    look_behind = tool({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}})
    with pytest.raises(InputError, match="the tools' parameters cannot be turned into a grammar"):
        ChatParallelComp(engine=engine).bind_tools([look_behind], tool_choice="any")
    with pytest.raises(InputError, match="the tools' parameters cannot be turned into a grammar"):
        engine.generate("q", tools=[tool({"type": "bogus"})])
    with pytest.raises(InputError, match="tool 'f' is not JSON-serializable"):
        engine.generate("q", tools=[tool({"type": "object", "default": object()})])


def test_token_limit_before_the_grammar_completes_is_an_error(engine):
    with pytest.raises(StructuredOutputError, match="raise max_new_tokens"):
        engine.generate("Report the reading.", json_schema=SCHEMA, max_new_tokens=3)


def test_bad_schema_and_tool_choice_are_typed_errors(engine):
    with pytest.raises(InputError, match="json_schema"):
        engine.generate("q", json_schema={"type": "no-such-type"})
    with pytest.raises(InputError, match="json_schema must be a dict"):
        engine.generate("q", json_schema="{}")
    with pytest.raises(InputError, match="unknown tool_choice 'nope'"):
        engine.generate("q", tools=[LOOKUP], tool_choice="nope")
    with pytest.raises(InputError, match="unknown tool_choice 'required'"):
        engine.generate("q", tool_choice="required")  # forcing a call with no tools
    with pytest.raises(InputError, match="tool 0 must be"):
        engine.generate("q", tools=[{"name": "x"}])


def test_added_marker_tokens_are_referenced_by_id(tokenizer):
    """Qwen2.5 has <tool_call> as one added (non-special) token; llguidance treats added tokens
    as special, so the grammar must name it by id (docs/structured-output.md's pitfall)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    open_id = tok.convert_tokens_to_ids("<tool_call>")
    assert f"<[{open_id}]>" in json.dumps(tool_grammar([LOOKUP], "required", tok))
    engine = ParallelComp(tiny_model("qwen2", len(tok)), tok, ParallelCompConfig())
    out = engine.generate("Which section?", tools=[LOOKUP], tool_choice="required", max_new_tokens=40)
    assert out.token_ids[0] == open_id
    assert parse_tool_calls(out.text)[1][0]["name"] == "lookup"


def test_template_with_tools_renders_them_itself(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for t in tools %}TOOL {{ t['function']['name'] }}\n{% endfor %}"
                         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    engine = ParallelComp(tiny_model("llama", len(tok)), tok, ParallelCompConfig())
    prefix = tok.decode(engine.prompt_parts("Hi", False, tools=[LOOKUP]).prefix_ids)
    assert prefix.startswith("TOOL lookup\n") and "# Tools" not in prefix


def test_tool_call_text_holds_back_only_the_calls():
    split = ToolCallText()
    text = 'Sure. <tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    shown = "".join(split.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, calls, invalid = split.finish()
    assert shown == "Sure. " and rest == "" and [c["name"] for c in calls] == ["ping"] and invalid == []
    split = ToolCallText()
    assert split.feed("a <tool") == "a " and split.feed("box>") == "<toolbox>"


@pytest.mark.parametrize("written", [
    'Sure. <tool_call>\n{"name": "add", "arguments": {"a": {"b": [1, 2]}, "c": "x}\\"y"}}\n</tool_call> and '
    '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',  # no grammar: does not parse
], ids=["two calls", "invalid"])
def test_a_streamed_calls_arguments_only_grow_and_join_to_the_whole_call(written):
    """`grammar.calls_so_far` at every character: a call shows up once its name is whole, its
    arguments' text so far is a start of what it is later, and the deltas of `ToolCallText`
    join to each call's arguments as parsed whole, under the id that `finish` gives it."""
    split, seen, joined = ToolCallText(), [], {}
    for i in range(len(written)):
        split.feed(written[i])
        now = calls_so_far(written[: i + 1])
        for n, call in enumerate(now):
            if call is not None and n < len(seen) and seen[n] is not None:
                assert call[0] == seen[n][0] and call[1].startswith(seen[n][1])
        seen = now
        for delta in split.call_deltas():
            joined.setdefault(delta["index"], {"id": delta["id"], "name": delta["name"], "args": ""})["args"] += delta["args"]
    rest, calls, invalid = split.finish()
    for delta in split.last_deltas(calls, invalid):
        joined[delta["index"]]["args"] += delta["args"]
    assert [c["id"] for c in calls + invalid] == [j["id"] for j in joined.values()]
    assert [(c["name"], c["arguments"]) for c in calls] == [(j["name"], json.loads(j["args"]))
                                                           for j in list(joined.values())[: len(calls)]]
    if invalid:  # the model's own text, less the call object's braces
        assert joined[0] == {"id": invalid[0]["id"], "name": "add", "args": '{"a": 1,}'}


# ---------------------------------------------------------------------- LangChain


def test_langchain_tool_calls_invoke_and_stream_agree(engine):
    from langchain_core.messages import HumanMessage

    from pc_integrations.langchain import ChatParallelComp

    chat = ChatParallelComp(engine=engine, max_tokens=48).bind_tools([LOOKUP], tool_choice="any")
    message = chat.invoke([HumanMessage("Which section?")])
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["id"].startswith("call_")
    merged = None
    for chunk in chat.stream([HumanMessage("Which section?")]):
        merged = chunk if merged is None else merged + chunk
    streamed = merged.tool_calls
    assert [(c["name"], c["args"]) for c in streamed] == [(c["name"], c["args"]) for c in message.tool_calls]
    assert message.usage_metadata["output_tokens"] > 0


def test_langchain_structured_output_streams_partial_objects(engine):
    """A call's arguments stream as they are decoded (`ToolCallText.call_deltas`), so
    `with_structured_output(...).stream()` yields growing partial objects, as with OpenAI, the
    last equal to `invoke`'s."""
    from pc_integrations.langchain import ChatParallelComp

    chat = ChatParallelComp(engine=engine, max_tokens=64, temperature=1.0, seed=3)
    chunks = list(chat.bind_tools([Reading], tool_choice="Reading").stream("Report the reading."))
    assert sum(bool(c.tool_call_chunks) for c in chunks) > 3  # the arguments came in pieces
    assert chunks[0].tool_call_chunks[0]["name"] == "Reading" and chunks[0].tool_call_chunks[0]["id"].startswith("call_")
    structured = chat.with_structured_output(Reading.model_json_schema(), method="function_calling")
    partials = list(structured.stream("Report the reading."))
    assert len(partials) > 3 and partials[-1] == structured.invoke("Report the reading.")
    assert all(set(a) <= set(b) for a, b in zip(partials, partials[1:]))  # each one's keys are in the next


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output_every_seed(engine, method):
    """(json_mode allows any JSON object, which random weights never close: SmolLM2 runs it in
    the standard suite's test_json_mode.)"""
    from pc_integrations.langchain import ChatParallelComp

    for seed in SEEDS[:4]:
        chat = ChatParallelComp(engine=engine, max_tokens=64, temperature=1.0, seed=seed)
        assert isinstance(chat.with_structured_output(Reading, method=method).invoke("Report the reading."), Reading)
    raw = chat.with_structured_output(SCHEMA, method=method, include_raw=True).invoke("Report the reading.")
    assert raw["parsing_error"] is None and raw["raw"].usage_metadata


def test_langchain_json_schema_takes_no_undeclared_keys_unless_strict_is_false(tokenizer, engine):
    """OpenAI's strict structured outputs: declared objects are closed, nested ones too."""
    from pc_integrations.langchain import ChatParallelComp

    chat = ChatParallelComp(engine=engine)
    n_vocab, eos = len(tokenizer), {tokenizer.eos_token_id}

    def accepts(strict, text):
        schema = chat.with_structured_output(Team, method="json_schema", strict=strict).first.kwargs["json_schema"]
        matcher = llguidance().LLMatcher(ll_tokenizer(tokenizer, n_vocab, eos), schema_grammar(schema))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()

    valid, extra = '{"lead": {"name": "Ada"}, "size": 3}', '{"lead": {"name": "Ada", "age": 3}, "size": 3}'
    for strict in (None, True):
        assert accepts(strict, valid) and not accepts(strict, extra)
        assert not accepts(strict, '{"lead": {"name": "Ada"}, "size": 3, "x": 1}')
    assert accepts(False, valid) and accepts(False, extra)
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                      {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert closed_schema(both) == both  # closing each part would forbid the other's key
    with pytest.raises(InputError, match="strict must be"):
        chat.with_structured_output(Team, method="json_schema", strict="yes")


def test_langchain_bad_tool_input_is_typed(engine):
    from pc_integrations.langchain import ChatParallelComp

    chat = ChatParallelComp(engine=engine)
    with pytest.raises(InputError, match="unknown tool_choice 'nope'"):
        chat.bind_tools([LOOKUP], tool_choice="nope")
    with pytest.raises(InputError, match="method must be"):
        chat.with_structured_output(Reading, method="xml")
    with pytest.raises(InputError, match="json_schema"):
        chat.with_structured_output({"title": "X", "type": "object", "properties": {"a": {"type": "no-such-type"}}},
                                    method="json_schema")
    with pytest.raises(InputError, match="parallel_tool_calls must be True or False"):
        chat.bind_tools([LOOKUP], parallel_tool_calls="no")
    with pytest.raises(InputError, match="strict must be True, False or None"):
        chat.bind_tools([LOOKUP], strict="yes")


def test_parallel_tool_calls_reach_the_grammar_from_both_frameworks(engine, monkeypatch):
    """LangChain's `bind_tools(parallel_tool_calls=False, strict=True)` (agent code passes both)
    and LlamaIndex's `allow_parallel_tool_calls` set how many calls "auto" may write. Before,
    LangChain refused both at the first call, and LlamaIndex ignored its flag."""
    from llama_index.core.tools import FunctionTool

    from pc_integrations.langchain import ChatParallelComp
    from pc_integrations.llama_index import ParallelCompLLM

    import parallelcomp.grammar as grammar

    seen = []
    tool_grammar = grammar.tool_grammar
    monkeypatch.setattr(grammar, "tool_grammar", lambda *a: seen.append(a[3]) or tool_grammar(*a))
    chat = ChatParallelComp(engine=engine, max_tokens=4)
    chat.bind_tools([LOOKUP], parallel_tool_calls=False, strict=True).invoke("Which section?")
    chat.bind_tools([LOOKUP], strict=False).invoke("Which section?")
    llm = ParallelCompLLM(engine, max_new_tokens=4)
    tool = FunctionTool.from_defaults(fn=lambda section: section, name="lookup", description="Look up a section.")
    llm.chat_with_tools([tool], "Which section?")  # LlamaIndex's default: one call at most
    llm.chat_with_tools([tool], "Which section?", allow_parallel_tool_calls=True)
    assert seen == [False, True, False, True]


def test_langchain_response_format_and_provider_strategy(engine):
    """OpenAI's `response_format` (ChatOpenAI users bind it; `create_agent(response_format=
    ProviderStrategy(X))` binds it beside the agent's tools) decodes as `json_schema=`, closed
    unless strict is False. Before, the first call refused the keyword."""
    from langchain.agents import create_agent
    from langchain.agents.structured_output import ProviderStrategy
    from langchain_core.utils.function_calling import convert_to_json_schema

    from pc_integrations.langchain import ChatParallelComp
    from pc_integrations.langchain.chat_models import response_format_schema

    chat = ChatParallelComp(engine=engine, max_tokens=64)
    open_schema = {k: v for k, v in SCHEMA.items() if k != "additionalProperties"}  # open by JSON Schema's default
    spec = {"name": "Reading", "schema": open_schema}
    formats = [({"type": "json_schema", "json_schema": spec}, closed_schema(open_schema)),
               (Reading, closed_schema(convert_to_json_schema(Reading)))]
    for response_format, schema in formats:
        got = chat.bind(response_format=response_format).invoke("Report the reading.")
        assert got.content == engine.generate("Report the reading.", json_schema=schema, max_new_tokens=64).text
    assert formats[0][1] == SCHEMA != open_schema  # (open, random weights would write keys until the limit)
    assert response_format_schema({"type": "json_schema", "json_schema": {**spec, "strict": False}}) == open_schema
    assert response_format_schema({"type": "json_object"}) == {"type": "object"}
    assert response_format_schema({"type": "text"}) is None
    for seed in SEEDS[:4]:
        seeded = ChatParallelComp(engine=engine, max_tokens=64, temperature=1.0, seed=seed)
        got = seeded.bind_tools([LOOKUP], response_format=formats[0][0]).invoke("Report the reading.")
        text = engine.generate("Report the reading.", tools=[LOOKUP], json_schema=formats[0][1], max_new_tokens=64,
                               temperature=1.0, seed=seed).text
        content, calls, _ = parse_tool_calls(text)
        assert got.content == content and [c["args"] for c in got.tool_calls] == [c["arguments"] for c in calls]
    agent = create_agent(chat, tools=[], response_format=ProviderStrategy(Reading))
    assert isinstance(agent.invoke({"messages": [("user", "Report the reading.")]})["structured_response"], Reading)
    with pytest.raises(InputError, match="response_format must be"):
        chat.bind_tools([LOOKUP], response_format="json")
    with pytest.raises(InputError, match="response_format must be"):
        chat.bind(response_format={"type": "xml"}).invoke("Report the reading.")
    with pytest.raises(InputError, match="response_format int is not a pydantic class or TypedDict"):
        chat.bind_tools([LOOKUP], response_format=int)


def test_langchain_agent_calls_a_tool(engine):
    """`langchain.agents.create_agent` with ChatParallelComp as the model: the first model call
    is forced to a tool (a tiny random model would not choose one), the tool runs, and its result
    reaches the second model call through the prompt."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool

    from pc_integrations.langchain import ChatParallelComp

    seen = []

    @tool
    def lookup(section: int = Field(ge=1, le=20)) -> str:
        """Look a section of the licence up."""
        seen.append(section)
        return f"Section {section} names the Mozilla Foundation."

    @wrap_model_call
    def first_call_uses_a_tool(request, handler):
        first = not any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="any") if first else request)

    model = ChatParallelComp(engine=engine, max_tokens=48)
    agent = create_agent(model, tools=[lookup], middleware=[first_call_uses_a_tool])
    result = agent.invoke({"messages": [("user", "Who is the steward? Look it up.")]})
    tool_messages = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert len(seen) == 1 and 1 <= seen[0] <= 20
    assert tool_messages and "Mozilla Foundation" in tool_messages[0].content
    assert result["messages"][-1].type == "ai"


def test_langchain_profile_drives_agent_middleware_and_strategy(engine):
    """`chat.profile` is what LangChain's agents read: `max_input_tokens` (the trained window)
    lets `SummarizationMiddleware` take a fractional trigger (before: ValueError, no profile), and
    the trigger fires once the chat passes that share of the window. `structured_output` is not
    claimed, so `create_agent(response_format=Schema)` keeps ToolStrategy: the answer is a call of
    the schema's tool."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import SummarizationMiddleware
    from langchain_core.messages import AIMessage, HumanMessage

    from pc_integrations.langchain import ChatParallelComp

    chat = ChatParallelComp(engine=engine, max_tokens=24)
    assert chat.profile["max_input_tokens"] == engine.window == 1024
    assert chat.profile["tool_calling"] and "structured_output" not in chat.profile
    assert ChatParallelComp(engine=engine, profile={"max_input_tokens": 64}).profile == {"max_input_tokens": 64}

    summarize = SummarizationMiddleware(model=chat, trigger=("fraction", 0.5), keep=("messages", 1),
                                        token_counter=chat.get_num_tokens_from_messages)
    agent = create_agent(chat, tools=[], middleware=[summarize])
    short = [HumanMessage("Which section names the steward?")]
    assert chat.get_num_tokens_from_messages(short) < 512
    assert agent.invoke({"messages": short})["messages"][0].content == short[0].content  # not summarized
    turn = "Section 10 of the licence names the Mozilla Foundation as its steward. " * 8
    long = [m for _ in range(6) for m in (HumanMessage(turn), AIMessage("Noted."))] + short
    assert chat.get_num_tokens_from_messages(long) > 512
    first = agent.invoke({"messages": long})["messages"][0]
    assert first.content.startswith("Here is a summary of the conversation")

    agent = create_agent(ChatParallelComp(engine=engine, max_tokens=192), tools=[], response_format=Reading)
    result = agent.invoke({"messages": [("user", "Report the reading.")]})
    assert isinstance(result["structured_response"], Reading)
    call = result["messages"][-2].tool_calls
    assert [c["name"] for c in call] == ["Reading"] and Reading(**call[0]["args"]) == result["structured_response"]


# ---------------------------------------------------------------------- LlamaIndex


def test_llama_index_function_calling_and_structured_predict(engine):
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.tools import FunctionTool

    from pc_integrations.llama_index import ParallelCompLLM

    llm = ParallelCompLLM(engine, max_new_tokens=48)
    assert llm.metadata.is_function_calling_model

    def ping() -> str:
        """Check the service."""
        return "pong"

    response = llm.chat_with_tools([FunctionTool.from_defaults(ping)], user_msg="Is it up?", tool_required=True)
    calls = llm.get_tool_calls_from_response(response)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == [("ping", {})] and calls[0].tool_id.startswith("call_")
    text = llm.chat_with_tools([FunctionTool.from_defaults(ping)], user_msg="Is it up?", tool_choice="none")
    assert llm.get_tool_calls_from_response(text, error_on_no_tool_call=False) == []
    for error in (ValueError, StructuredOutputError):  # LlamaIndex's LLMs raise ValueError; a RuntimeError before
        with pytest.raises(error, match="the model answered without a tool call"):
            llm.get_tool_calls_from_response(text)
    for seed in SEEDS[:3]:
        llm = ParallelCompLLM(engine, max_new_tokens=64, temperature=1.0, seed=seed)
        reading = llm.structured_predict(Reading, PromptTemplate("Report the reading for {place}."), place="the lab")
        assert isinstance(reading, Reading)
    with pytest.raises(CallError, match="unknown tool_choice"):
        llm.chat_with_tools([FunctionTool.from_defaults(ping)], user_msg="q", tool_choice="nope")


def test_llama_index_sub_question_engine_gets_questions_for_its_tools(engine, monkeypatch):
    """`SubQuestionQueryEngine` with `ParallelCompQuestionGenerator`: LlamaIndex's own default
    generator wants the OpenAI package, and its `LLMQuestionGenerator` parses JSON from free text;
    ours decodes a list whose tool names can only be the tools' (for every seed), sync and async."""
    import asyncio

    from llama_index.core.query_engine import CustomQueryEngine, SubQuestionQueryEngine
    from llama_index.core.schema import QueryBundle
    from llama_index.core.tools import QueryEngineTool

    from pc_integrations.llama_index import ParallelCompLLM, ParallelCompQuestionGenerator, question_gen

    monkeypatch.setattr(question_gen, "MAX_QUESTION_CHARS", 24)  # random weights write to the bound
    asked = []

    class Corpus(CustomQueryEngine):
        def custom_query(self, query_str: str) -> str:
            asked.append(query_str)
            return "It was 1874."

    tools = [QueryEngineTool.from_defaults(Corpus(), name=n, description=f"Facts about {n}.") for n in ("mpl", "apache")]
    for seed in SEEDS[:4]:
        llm = ParallelCompLLM(engine, max_new_tokens=400, temperature=1.0, seed=seed)
        generator = ParallelCompQuestionGenerator(llm)
        questions = generator.generate([t.metadata for t in tools], QueryBundle("Who stewards each licence?"))
        assert 1 <= len(questions) <= 6 and {q.tool_name for q in questions} <= {"mpl", "apache"}
    query_engine = SubQuestionQueryEngine.from_defaults(query_engine_tools=tools, llm=llm, question_gen=generator,
                                                        use_async=False, verbose=False)
    response = query_engine.query("Who stewards each licence?")
    assert len(response.source_nodes) == len(asked) >= 1 and str(response).strip()
    found = asyncio.run(generator.agenerate([t.metadata for t in tools], QueryBundle("Who stewards each licence?")))
    assert found and {q.tool_name for q in found} <= {"mpl", "apache"}
    with pytest.raises(InputError, match="no tools"):
        generator.generate([], QueryBundle("q"))


def test_llama_index_streams_calls_and_partial_objects(engine):
    """Each streamed chat response carries the calls begun so far, their arguments parsed as far
    as they go, under the id the last response gives them; so `stream_structured_predict` yields
    partial objects, the last equal to `structured_predict`'s."""
    from llama_index.core.prompts import PromptTemplate

    from pc_integrations.llama_index import ParallelCompLLM

    llm = ParallelCompLLM(engine, max_new_tokens=64, temperature=1.0, seed=3)
    prompt = PromptTemplate("Report the reading for {place}.")
    whole = llm.structured_predict(Reading, prompt, place="the lab")
    partials = list(llm.stream_structured_predict(Reading, prompt, place="the lab"))
    assert len({json.dumps(p.model_dump()) for p in partials}) > 3 and partials[-1] == whole
    from llama_index.core.program.function_program import get_function_tool

    responses = list(llm.stream_chat_with_tools([get_function_tool(Reading)], user_msg="Report it.",
                                                tool_required=True))
    calls = [r.message.additional_kwargs.get("tool_calls") for r in responses]
    assert sum(bool(c) for c in calls) > 3 and calls[-1] and len({c[0]["id"] for c in calls if c}) == 1


@pytest.mark.slow
def test_llama_index_function_agent_calls_a_query_engine_tool(smol_engine):
    """A LlamaIndex `FunctionAgent` with the SmolLM2 `ParallelCompLLM`: its first step calls a
    `QueryEngineTool` (forced by `initial_tool_choice`), whose query engine answers from the
    corpus through the same engine. The run is stopped after that tool result: left to choose
    (tool_choice "auto"), the 135M model calls the tool again rather than answer."""
    import asyncio

    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.tools import QueryEngineTool

    from pc_integrations.llama_index import ParallelCompLLM

    class CorpusQueryEngine(CustomQueryEngine):
        def custom_query(self, query_str: str) -> str:
            queries.append(query_str)
            return smol_engine.generate(query_str, documents=DOCS, max_new_tokens=24).text

    queries: list[str] = []
    tool = QueryEngineTool.from_defaults(CorpusQueryEngine(), name="licences",
                                         description="Answers questions about software licences.")
    llm = ParallelCompLLM(smol_engine, max_new_tokens=96, repetition_penalty=1.05)  # as in test_langchain_standard
    agent = FunctionAgent(tools=[tool], llm=llm, initial_tool_choice="licences")

    async def first_tool_result():
        handler = agent.run("Who is the steward of the Mozilla licence?")
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                await handler.cancel_run()
                return event
        await handler  # no tool result: raise the run's error

    result = asyncio.run(first_tool_result())
    assert len(queries) == 1 and queries[0].strip()
    assert result.tool_name == "licences" and result.tool_output.content.strip()

    # the README's way: a tool with return_direct=True ends the run with its answer
    direct = QueryEngineTool.from_defaults(CorpusQueryEngine(), name="licences", return_direct=True,
                                           description="Answers questions about software licences.")
    agent = FunctionAgent(tools=[direct], llm=llm, initial_tool_choice="licences")
    async def run_to_end():
        return await agent.run("Who is the steward of the Mozilla licence?")

    response = asyncio.run(run_to_end())
    assert len(queries) == 2 and str(response) == smol_engine.generate(queries[1], documents=DOCS,
                                                                       max_new_tokens=24).text


@pytest.mark.parametrize("choice", ["none", "auto"])
def test_free_text_cut_inside_a_character_by_the_token_limit_is_not_an_error(tokenizer, choice):
    """A byte-fallback token (the first byte of "é") ends the output: the free text is complete up to
    it; a JSON object cut the same way is still incomplete."""
    from parallelcomp.grammar import GrammarProcessor

    text = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    first_byte = tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3, the first byte of "é" in byte-level BPE
    assert tokenizer.decode(text + [first_byte]).endswith("\ufffd")
    n = len(tokenizer)
    free = GrammarProcessor(tokenizer, tool_grammar([LOOKUP], choice, tokenizer), n, {2}, prompt_tokens=0)
    free.finish(text + [first_byte])
    assert free.matcher.is_accepting()
    cut_json = tokenizer('{"level": 3, "colour": "red", "ok": true, "label": "', add_special_tokens=False)["input_ids"]
    cut_json += [first_byte]
    schema = GrammarProcessor(tokenizer, schema_grammar(Reading.model_json_schema()), n, {2}, prompt_tokens=0)
    with pytest.raises(StructuredOutputError, match="raise max_new_tokens"):
        schema.finish(cut_json)
