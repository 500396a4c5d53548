"""The examples that take `--model`, run as a user runs them (a subprocess, offline) over the
corpus they read, on a tiny random Llama saved as a local model directory: their
wiring end to end (encoding, the wrapper, the framework's agent or query engine, the report they
print), in seconds. What the embedded SmolLM2 answers is in each example's docstring and
docs/integrations.md; examples/quickstart.py runs only on the embedded model (`make ask` runs the
same path)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
LICENCES = Path("/usr/share/common-licenses")


def needs_licences(example: str):
    """The example's corpus is Debian's licence texts (the base-files package, which `make ask`
    reads too), with no fallback: a system without that directory cannot run the example at all.
    CI runs on Debian, where it runs."""
    return pytest.mark.skipif(not LICENCES.is_dir(), reason=f"examples/{example} reads {LICENCES}, absent here")


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with an 8K window (the examples' 2048-token chunks must fit it)."""
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama", len(tokenizer), max_position_embeddings=8192).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs_licences("agent.py")
def test_the_agent_example_calls_its_tool_once_and_answers_with_its_result(wide_model_dir):
    """A random model's forced call still parses and closes within the example's token limit:
    the tool's argument is bounded, so the grammar ends the string (examples/agent.py)."""
    out = run_example("agent.py", "--model", str(wide_model_dir))
    assert "tool: search_licences(" in out and "calls [('search_licences', {'question': " in out
    history = [line.split(": ", 1) for line in out.splitlines()  # the messages, after the tool's own line
               if line[:6].strip() in ("human", "ai", "tool") and "tool: search_licences(" not in line]
    assert [role.strip() for role, _ in history] == ["human", "ai", "tool"]
    assert out.split("\nanswer: ")[-1].split("\ntotal ")[0] == ast.literal_eval(history[2][1])


def test_the_langchain_rag_example_reports_kept_and_evicted_sources(wide_model_dir):
    """Its corpus is the licence texts, or Python's pydoc pages where they are missing: it runs anywhere."""
    out = run_example("langchain_rag.py", "--model", str(wide_model_dir), "--keep", "1", "--max-new-tokens", "4")
    kept = [line for line in out.splitlines() if "(kept chunks" in line]
    assert len(kept) == 1 and (str(LICENCES) in kept[0]) == LICENCES.is_dir()
    assert "evicted: " in out and "wall time" in out


@needs_licences("llamaindex_query_engine.py")
def test_the_llamaindex_example_answers_and_lists_its_sources(wide_model_dir):
    out = run_example("llamaindex_query_engine.py", "--model", str(wide_model_dir), "--max-new-tokens", "4")
    assert "answer: " in out and "sources (" in out and "3 kept" in out
