"""Grammar-constrained decoding: JSON schemas and tool calls that always parse (llguidance).

A request with `json_schema=` or `tools=` (`GenerationSettings`) decodes under a grammar: at
every step `GrammarProcessor`, the first logits processor, leaves only the tokens that keep the
output inside the grammar, and EOS only where the grammar is complete. Output that the token
limit cuts short of a complete grammar raises `StructuredOutputError`; it is never returned as
if it were valid. Library choice and measurements: docs/structured-output.md.

Tool calls use one format for every model, the one Qwen2.5's chat template defines:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Templates that declare tools (`tools=` in `apply_chat_template`) describe the tools themselves;
for the others (SmolLM2) `tools_prompt` writes the same description into a system message
(prompts.py). A marker that the tokenizer has as one added token (Qwen's `<tool_call>`) is
referenced by id, since llguidance treats every added token as special.

Grammars per `tool_choice`:
    "auto"      free text without the marker (nor its stem `<tool_call`), then zero or more calls
                (zero or one with `parallel_tool_calls=False`)
    "required"  exactly one call, of any of the tools, and nothing else
    a tool name exactly one call of that tool
    "none"      free text without the marker's stem: no call (the tools are still described in the
                prompt, and a model that saw calls in the history would otherwise write one)

With `json_schema=` beside the tools (OpenAI's `response_format` with tools, LangChain's
`ProviderStrategy`), an answer that is not a call is one JSON value of that schema: "auto" writes
the value or the calls, with no free text, and "none" the value.

Forced modes allow one call: given the chance, SmolLM2-135M repeats a call until the token limit
runs out. An agent calls again on its next turn.

JSON is written with fixed separators (", " and ": ", as `json.dumps` writes it, as in the
prompt's example) and no other whitespace: a small model given free whitespace pads its output
until it runs out of tokens. Knows nothing about LangChain or LlamaIndex.
"""

from __future__ import annotations

import json
import re
import uuid
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from .errors import ConfigError, InputError, StructuredOutputError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CHOICES = ("auto", "none", "required")
"""`tool_choice` after normalisation, besides a tool name."""
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def llguidance():
    """The llguidance module, imported on first use (a typed error names the package if absent)."""
    try:
        import llguidance as llg
        import llguidance.hf  # noqa: F401 - llg.hf.from_tokenizer
    except ImportError as err:
        msg = "structured output and tool calls need the llguidance package: pip install 'llguidance>=1.9,<2'"
        raise ConfigError(msg) from err
    return llg


# ---------------------------------------------------------------------- grammars


def schema_grammar(schema: Mapping[str, Any], what: str = "json_schema") -> str:
    """The llguidance grammar of one JSON value matching `schema`; InputError if unsupported."""
    llg = llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(dict(schema), overrides=_JSON_STYLE)
    except (ValueError, TypeError) as err:
        raise InputError(f"{what} is not a JSON schema: {err}") from None
    _check(llg, grammar, what)
    return grammar


def tool_grammar(tools: Sequence[Mapping[str, Any]], choice: str, tokenizer, parallel: bool = True,
                 answer: Mapping[str, Any] | None = None) -> str:
    """The llguidance grammar of the output allowed by `choice` over `tools` (module docstring).
    `tools` are OpenAI-style {"type": "function", "function": {...}} dicts; `parallel`: "auto"
    may write more than one call. `answer`: the JSON schema of an answer that is not a call (as
    OpenAI's `response_format` beside tools): "auto" writes that JSON value or calls, no free
    text; "none" the value."""
    named = [t for t in tools if t["function"]["name"] == choice] if choice not in CHOICES else list(tools)
    body = {**calls_schema(named), "x-guidance": _JSON_STYLE}
    open_, close = (_marker(tokenizer, m) for m in (OPEN, CLOSE))
    # free text never contains the marker's stem: SmolLM2 told "none" after a call in its history
    # wrote `<tool_call id=...>` blocks, which excluding the exact marker let through
    free = f"/(?s:.)*/ & ~/(?s:.*{re.escape(OPEN[:-1])}.*)/"
    rules = [
        f"call: {open_} rest",
        f'rest: "\\n" body "\\n" {close}',
        f"body: %json {json.dumps(body)}",
    ]
    more = ' ("\\n" call)*' if parallel else ""
    if answer is not None and choice in ("none", "auto"):
        value = f"answer: %json {json.dumps({**answer, 'x-guidance': _JSON_STYLE})}"
        rules = ["start: answer", value] if choice == "none" else [f"start: answer | call{more}", value, *rules]
    elif choice == "none":
        rules = ["start: TEXT", f"TEXT: {free} & /(?s:.)+/"]
    elif choice == "auto":  # text, then zero or more calls
        # A greedy text lexeme would run on into a text marker and never end, so the text before
        # the first call ends at the marker: a lazy lexeme (llguidance's StructTag idiom). A
        # special-token marker is never text, so there the text simply stops before it.
        lead = f"lead: TEXT? {open_}" if open_.startswith("<[") else f"lead[lazy]: FREE {open_}"
        rules = [f"start: TEXT | lead rest{more}", lead, f"FREE: {free}", "TEXT: FREE & /(?s:.)+/", *rules]
    else:
        rules = ["start: call", *rules]
    llg = llguidance()
    grammar = llg.LLMatcher.grammar_from_lark("\n".join(rules))
    _check(llg, grammar, "tools")
    return grammar


def calls_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call of any of `tools`: {"name": <const>, "arguments": <parameters>}."""
    return {"anyOf": [_call_schema(t["function"], f"/anyOf/{i}/properties/arguments") for i, t in enumerate(tools)]}


def _call_schema(function: Mapping[str, Any], at: str) -> dict[str, Any]:
    """One tool's call schema, its parameters placed at JSON pointer `at` of the whole schema: the
    parameters' own references ("#/$defs/Person", as pydantic writes nested models) are rebased
    there, or they would point at a root that has no $defs."""
    params = _for_call(function.get("parameters") or {"type": "object", "properties": {}}, at)
    if params.get("type") == "object" and "additionalProperties" not in params:
        params["additionalProperties"] = False  # no invented arguments
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def closed_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`schema` with every object that declares properties closed to undeclared keys unless it
    says otherwise: what OpenAI's strict structured outputs require of a schema, and what keeps a
    small model from inventing keys until the token limit."""
    return _for_call(schema, "")


def _for_call(node: Any, at: str, close: bool = True) -> Any:
    """A copy of schema `node` whose local references ("#..." JSON pointers) start at pointer `at`,
    and whose objects with declared properties, nested ones too, take no other keys unless they
    say so (a small model given the chance invents keys until the token limit); an object that
    declares none is a free-form mapping. The parts of an `allOf`, and an object combined with
    others (allOf/anyOf/oneOf) or with patternProperties, stay open: each part declares only some
    of the keys, so closing one would forbid the others'."""
    if isinstance(node, list):
        return [_for_call(v, at, close) for v in node]
    if not isinstance(node, Mapping):
        return node
    out = {k: "#" + at + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
           else _for_call(v, at, k != "allOf") for k, v in node.items()}
    if (close and out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not _OPEN_WITH & out.keys()):
        out["additionalProperties"] = False
    return out


_OPEN_WITH = {"allOf", "anyOf", "oneOf", "patternProperties"}


def _marker(tokenizer, text: str) -> str:
    """A Lark terminal for the marker: its token id if it is one added token, else its text."""
    added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    return f"<[{added[text]}]>" if text in added else json.dumps(text)


def _check(llg, grammar: str, what: str) -> None:
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InputError(f"{what} cannot be turned into a grammar: {messages[0]}")


# ---------------------------------------------------------------------- decoding

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer, n_vocab: int, eos_ids: set[int]):
    """llguidance's view of `tokenizer` (0.4-1.4 s to build): cached per tokenizer."""
    key = (n_vocab, tuple(sorted(eos_ids)))
    per = _TOKENIZERS.setdefault(tokenizer, {})
    if key not in per:
        per[key] = llguidance().hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(key[1]))
    return per[key]


class GrammarProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next; one per request.

    It consumes the tokens generated since its last call from `input_ids`, whose first
    `prompt_tokens` columns are the question. Put it first, before any warper.
    """

    def __init__(self, tokenizer, grammar: str, n_vocab: int, eos_ids: set[int], prompt_tokens: int):
        llg = llguidance()
        self.tokenizer = tokenizer
        self.matcher = llg.LLMatcher(ll_tokenizer(tokenizer, n_vocab, eos_ids), grammar)
        if self.matcher.is_error():
            raise StructuredOutputError(f"the grammar could not be compiled: {self.matcher.get_error()}")
        self.bits = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)
        self.prompt_tokens = prompt_tokens
        self.consumed = prompt_tokens  # columns of input_ids already consumed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.advance(input_ids[0, self.consumed :].tolist())
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: scores.shape[-1]].view(bool)
        if scores.is_cpu:  # numpy, single-threaded: a 2-thread torch op can stall (docs/structured-output.md)
            scores.numpy()[0, ~allowed] = -np.inf
        else:
            scores.masked_fill_(~torch.from_numpy(allowed).to(scores.device), float("-inf"))
        return scores

    def advance(self, token_ids: list[int]) -> None:
        for token in token_ids:
            if not self.matcher.consume_token(token):
                raise StructuredOutputError(f"token {token} broke the grammar: {self.matcher.get_error()}")
        self.consumed += len(token_ids)

    def finish(self, new_ids: list[int]) -> None:
        """Check that the whole output (`new_ids`, every token after the question) is complete.

        Free text (tool_choice "none", or "auto" before any call) that the token limit cut inside
        a multi-byte character is complete up to that character, as an unconstrained answer cut
        there would be: the grammar matches characters, so the bytes of the unfinished one leave
        it short of accepting, yet more tokens are all the output lacks (seen on a GPU run)."""
        self.advance(new_ids[self.consumed - self.prompt_tokens :])
        if self.matcher.is_accepting():
            return
        cut = _unfinished_character(self.tokenizer, new_ids)
        if cut and self.matcher.rollback(cut) and self.matcher.is_accepting():
            return
        msg = (f"the token limit ({len(new_ids)} new tokens) ended the output before the grammar was complete; "
               "raise max_new_tokens")
        raise StructuredOutputError(msg)


def _unfinished_character(tokenizer, ids: list[int]) -> int:
    """How many of the last tokens of `ids` are the bytes of an unfinished UTF-8 character (≤ 3); 0 if none."""
    if not tokenizer.decode(ids[-4:]).endswith("\ufffd"):
        return 0
    return next((k for k in range(1, min(3, len(ids)) + 1) if not tokenizer.decode(ids[-4:-k]).endswith("\ufffd")), 0)


# ---------------------------------------------------------------------- tools


def check_tools(tools: Any) -> tuple[dict[str, Any], ...]:
    """OpenAI-style tool dicts, each {"type": "function", "function": {"name", "description"?,
    "parameters"?}}; ValueError otherwise."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}} dicts, got {tools!r:.80}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tool {i} must be {{'type': 'function', 'function': {{'name': str, ...}}}}, got {tool!r:.80}")
        if not isinstance(function.get("parameters", {}), Mapping):
            raise ValueError(f"tool {function['name']!r}: parameters must be a JSON schema object")
        try:
            json.dumps(tool)  # the prompt describes the tools as JSON
        except (TypeError, ValueError) as err:
            raise ValueError(f"tool {function['name']!r} is not JSON-serializable: {err}") from None
    return tuple({"type": "function", "function": dict(t["function"])} for t in tools)


def check_tool_schemas(tools: Sequence[Mapping[str, Any]]) -> None:
    """InputError unless the tools' parameters compile into a call grammar (so an unsupported
    schema fails when the tools are given, not at the first call)."""
    if tools:
        schema_grammar(calls_schema(tools), "the tools' parameters")


def check_tool_choice(choice: Any, tools: Sequence[Mapping[str, Any]]) -> str:
    """"auto", "none", "required" or a tool name, from any of the spellings LangChain, OpenAI,
    Anthropic and LlamaIndex use: None/"auto", "none", "any"/"required"/True, a name,
    {"type": "function", "function": {"name": ...}}, {"type": "tool", "name": ...}, {"name": ...}
    or {"type": "auto" | "any" | "none" | "required"}; ValueError for anything else."""
    names = [t["function"]["name"] for t in tools]
    given = choice
    if isinstance(choice, Mapping):
        function = choice.get("function", choice)
        if isinstance(function, Mapping) and "name" in function:
            choice = function["name"]
        elif "function" not in choice and choice.get("type") in ("auto", "any", "none", "required"):
            choice = choice["type"]
        else:
            choice = None
        if not isinstance(choice, str):
            raise ValueError(f"tool_choice {given!r:.80} names no tool; use {{'type': 'function', 'function': "
                             f"{{'name': ...}}}} with one of the tools {names}, or auto, none, any/required")
    if not (choice is None or isinstance(choice, (str, bool))):
        raise ValueError(f"tool_choice must be a string, True, None or a dict, got {given!r:.80}")
    choice = {None: "auto", True: "required", "any": "required"}.get(choice, choice)
    if choice in CHOICES and (choice in ("auto", "none") or names):
        return choice
    if isinstance(choice, str) and choice in names:
        return choice
    raise ValueError(f"unknown tool_choice {choice!r}; use auto, none, any/required or one of the tools {names}")


def tools_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system text describing `tools` for a chat template that has no tool support (the
    wording of Qwen2.5's template, so both kinds of model see the same format)."""
    listing = "\n".join(json.dumps(t) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listing}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{OPEN}{CLOSE} XML tags:\n{OPEN}\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        f"{CLOSE}"
    )


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """One call as the model writes it (for calls in a chat history); InputError if its
    arguments are not JSON."""
    try:
        call = json.dumps({"name": name, "arguments": dict(arguments)})
    except (TypeError, ValueError) as err:
        msg = f"the arguments of the tool call {name!r} in the history are not JSON-serializable: {err}"
        raise InputError(msg) from None
    return f"{OPEN}\n{call}\n{CLOSE}"


def format_invalid_tool_call(name: str | None, text: str | None) -> str:
    """A call whose arguments did not parse, as the model wrote it (for calls in a chat history):
    ours keep the whole block's text and no name (`parse_tool_calls`); another provider's keep the
    name and the raw argument text."""
    body = (text or "") if name is None else f'{{"name": {json.dumps(name)}, "arguments": {text or "{}"}}}'
    return f"{OPEN}\n{body}\n{CLOSE}"


def parse_tool_calls(text: str, ids: Sequence[str] = ()) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(text outside the blocks, valid calls, invalid calls) of an output. A valid call is
    {"id": "call_<hex>", "name", "arguments": dict}; an invalid one (possible only in text decoded
    without a tool grammar) keeps its raw text and the error. `ids`: those of the first blocks, as
    a stream gave them out (`calls_so_far`); a new id for the others."""
    calls, invalid = [], []
    for n, block in enumerate(_BLOCK.findall(text)):
        call_id = ids[n] if n < len(ids) else new_call_id()
        try:
            data = json.loads(block)
            if not (isinstance(data, dict) and isinstance(data.get("name"), str)
                    and isinstance(data.get("arguments", {}), dict)):
                raise ValueError("expected {\"name\": str, \"arguments\": object}")
            calls.append({"id": call_id, "name": data["name"], "arguments": data.get("arguments", {})})
        except ValueError as err:
            invalid.append({"id": call_id, "text": block, "error": str(err)})
    return _BLOCK.sub("", text), calls, invalid


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_CALL_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*')
_CALL_ARGUMENTS = re.compile(r'\s*,\s*"arguments"\s*:\s*')
_DECODER = json.JSONDecoder()


def calls_so_far(text: str) -> list[tuple[str, str] | None]:
    """Each tool-call block begun in a stream's `text` so far, in order: (name, the arguments' JSON
    text so far) once its name is whole, else None. What a stream can pass on before a call ends,
    as OpenAI streams a call's arguments. As `text` grows a call's arguments text only grows: a
    closing brace, white space and the start of a `</tool_call>` at its end are held back until
    they are clearly the arguments' own (not the call object's), and where the whole arguments
    do not parse (text decoded without a tool grammar) the call object's last brace is left out."""
    calls, start = [], text.find(OPEN)
    while start >= 0:
        end = text.find(CLOSE, start)
        body_end = end if end >= 0 else len(text) - holdback(text, CLOSE)
        calls.append(_call_so_far(text[start + len(OPEN) : body_end]))
        start = -1 if end < 0 else text.find(OPEN, end + len(CLOSE))
    return calls


def _call_so_far(body: str) -> tuple[str, str] | None:
    head = _CALL_NAME.match(body)
    try:
        name, at = _DECODER.raw_decode(body, head.end()) if head else (None, 0)
    except ValueError:  # the name is not whole yet
        return None
    key = _CALL_ARGUMENTS.match(body, at) if isinstance(name, str) else None
    if key is None:
        return None
    arguments = body[key.end() :]
    try:
        return name, arguments[: _DECODER.raw_decode(arguments)[1]]
    except ValueError:
        arguments = arguments.rstrip()
        return name, arguments[:-1] if arguments.endswith("}") else arguments


def holdback(text: str, marker: str = OPEN) -> int:
    """Characters at the end of `text` that may be the start of `marker`: held back while
    streaming until it is clear whether a call begins (or ends)."""
    start = text.rfind(marker[0], max(0, len(text) - len(marker) + 1))
    return len(text) - start if start >= 0 and marker.startswith(text[start:]) else 0
