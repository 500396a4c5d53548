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

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

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
    temperature: Number = Field(0.0, ge=0.0)
    """0 = greedy; otherwise at least 1e-4."""
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: Integer = Field(0, ge=0)
    """0 = off."""
    seed: Integer | None = Field(None, ge=0, le=MAX_SEED)
    """Makes sampling (temperature > 0) reproducible."""
    repetition_penalty: Number = Field(1.0, gt=0.0)
    """> 1 discourages repeating question or answer tokens (1.0 = off)."""
    progress: bool = False
    """A tqdm bar on stderr during prefill."""

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

    @field_validator("temperature")
    @classmethod
    def _usable_temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {value!r}")
        return value

    @field_validator("progress", mode="before")
    @classmethod
    def _strict_bool(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"progress must be True or False, got {value!r}")
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
