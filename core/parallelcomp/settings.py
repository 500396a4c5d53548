"""`GenerationSettings`: the per-call settings of one answer, validated in one place.

The engine (`ParallelComp.generate/stream`), the LangChain wrappers and the LlamaIndex wrappers
all take the same keyword arguments and validate them through this one pydantic model, so a
setting means the same thing and fails the same way everywhere. Types are strict: a string, a
bool or a complex number is never taken for a number (`top_p='0.5'`, `seed=True` are errors); an
int is accepted where a float is expected (`temperature=1`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import grammar
from .errors import InputError

MAX_SEED = 2**63 - 1
MAX_STOPS = 32
MAX_STOP_CHARS = 1000
"""Stop strings: at most MAX_STOPS of at most MAX_STOP_CHARS characters each, which bounds the
per-token stop search (decode.TextAssembler) to a few thousand characters."""
MIN_TEMPERATURE = 1e-4
"""Below this, softmax(logits / T) overflows to NaN in fp32; use 0 for greedy decoding."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {type(value).__name__}")
    return value


Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]


class GenerationSettings(BaseModel):
    """Everything a single `generate`/`stream` call may set; invalid values raise `InputError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: Integer = Field(256, ge=1)
    """Tokens to generate at most; the question and the answer must fit the model's window
    (`guard.check_run`), so the decode cache stays bounded."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer; never part of the returned text."""
    temperature: Number = Field(0.0, ge=0.0, le=100.0)
    """0 = greedy; otherwise from 1e-4 to 100."""
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: Integer = Field(0, ge=0)
    """0 = off."""
    seed: Integer | None = Field(None, ge=0, le=MAX_SEED)
    """Makes sampling (temperature > 0) reproducible."""
    repetition_penalty: Number = Field(1.0, gt=0.0)
    """> 1 discourages repeating question or answer tokens (1.0 = off)."""
    progress: bool = False
    """A tqdm bar on stderr during prefill."""
    json_schema: dict[str, Any] | None = None
    """The answer is one JSON value matching this schema, guaranteed by a grammar (grammar.py);
    stop strings do not apply. With `tools`, an answer that is not a tool call is that JSON value
    (OpenAI's `response_format` beside tools): "auto" writes the value or calls, "none" the value."""
    tools: tuple[dict[str, Any], ...] | None = None
    """OpenAI-style function tools ({"type": "function", "function": {"name", "description",
    "parameters"}}), described in the prompt; calls come back as `<tool_call>` blocks in the
    text (`grammar.parse_tool_calls`)."""
    tool_choice: str = "auto"
    """With `tools`: "auto" (text and/or calls), "none", "required" (one call) or a
    tool name (one call of it); also accepted as None, "any", True or {"type": "function",
    "function": {"name": ...}}. Every mode is grammar-constrained ("none": text without a call;
    grammar.py); stop strings do not apply."""
    parallel_tool_calls: bool = True
    """With `tools` and tool_choice "auto": False allows at most one call (OpenAI's
    `parallel_tool_calls=False`, LlamaIndex's `allow_parallel_tool_calls=False`). The forced
    choices always write exactly one."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = (value,)
        if not (isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value)):
            raise ValueError(f"stop must be a string or a list of strings, got {_short(value)}")
        if len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(value)}")
        longest = max((len(s) for s in value), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest:,}")
        return tuple(value)

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> tuple[dict[str, Any], ...] | None:
        if value is None:
            return None
        tools = grammar.check_tools(value)
        grammar.check_tool_schemas(tools)  # once per call; `_tool_choice` reads only the names
        return tools

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"json_schema must be a dict (a JSON schema), got {type(value).__name__}")
        grammar.schema_grammar(value)  # an unsupported schema fails here, not mid-decode
        return value

    @model_validator(mode="before")
    @classmethod
    def _tool_choice(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("tool_choice" in data or data.get("tools")):
            tools = grammar.check_tools(data.get("tools") or ())
            data = {**data, "tool_choice": grammar.check_tool_choice(data.get("tool_choice"), tools)}
        return data

    @field_validator("temperature")
    @classmethod
    def _usable_temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {value!r}")
        return value

    @field_validator("progress", "parallel_tool_calls", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any, info: ValidationInfo) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{info.field_name} must be True or False, got {value!r}")
        return value

    @classmethod
    def of(cls, **values) -> GenerationSettings:
        """Validate keyword arguments; unknown names and bad values raise `InputError`."""
        try:
            return cls(**values)
        except ValidationError as err:
            raise InputError(explain(err)) from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    @classmethod
    def default_names(cls) -> tuple[str, ...]:
        """The settings a wrapper instance holds defaults for: all but CALL_ONLY."""
        return tuple(n for n in cls.model_fields if n not in CALL_ONLY)


CALL_ONLY = ("json_schema", "tools", "tool_choice", "parallel_tool_calls")
"""Settings that belong to one call (or a bound runnable: `bind_tools`, `with_structured_output`),
never to a wrapper instance."""


def explain(err: ValidationError) -> str:
    """One line per problem: which setting, what is wrong, what was given."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "settings"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown setting; valid settings are {', '.join(GenerationSettings.names())}"
        got = f" (got {_short(e['input'])})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{where}: {msg}{got}")
    return "invalid generation settings: " + "; ".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters so that a huge value never floods the message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text):,} chars)"
