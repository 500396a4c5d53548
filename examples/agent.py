"""A LangChain agent answering over a 32K-token corpus with the embedded SmolLM2-135M (8K window).

The agent is `langchain.agents.create_agent` with `ChatParallelComp` as its model. Its one tool,
`search_licences`, asks the same engine about the nine licence texts that `make ask` reads
(~32K SmolLM2 tokens, four times the model's trained window): the corpus is encoded once
(`engine.encode`), and every tool call prefills only its question over the stored chunk KV,
keeps the best chunk and answers from it. Tool calls are grammar-constrained, so they always
parse. A 135M model does not pick its turns well, so the agent is set up as small models need:
a `wrap_model_call` middleware forces one call (`tool_choice="any"`; left to choose, SmolLM2
answers without looking anything up), and the tool is `return_direct`, so its answer ends the
run. The tool's one argument is bounded (`max_length`, which the call's grammar enforces), so a
model that runs on inside the string (SmolLM2 in bf16 once wrote "…allows users to.com.com.com…"
until the token limit stopped it) still closes the call within `max_tokens`. Asked for a text
answer after the tool result (`tool_choice="none"`), SmolLM2-135M imitates the call in its
history instead (it wrote `<tool_call id=...>` blocks, and `<tool_check>` blocks once the grammar
excluded those); a stronger model (`--model`) can be given that last turn.

    pip install "parallelcomp[langchain]" "langchain>=1.5,<2"
    python examples/agent.py                                     # offline, a few minutes on 2 cores
    python examples/agent.py --question "..." --model /path/to/hf-model
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import wrap_model_call  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from parallelcomp import ParallelComp, ParallelCompConfig  # noqa: E402
from pc_integrations.langchain import ChatParallelComp  # noqa: E402

LICENSES = [Path("/usr/share/common-licenses") / name for name in
            ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0")]
QUESTION = "Who is the license steward of the Mozilla Public License 2.0?"


class Lookup(BaseModel):
    question: str = Field(max_length=120)  # the grammar closes the string by then


@wrap_model_call
def look_it_up(request, handler):
    """The model's turn is one forced tool call."""
    return handler(request.override(tool_choice="any"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--model", default=None, help="a local HF model directory (default: embedded SmolLM2)")
    args = parser.parse_args()

    start = time.perf_counter()
    # One best chunk of 2048 tokens per question, as `make ask` does (README, Makefile).
    engine = ParallelComp.from_pretrained(args.model, ParallelCompConfig.preset("retrieval"))
    texts = [p.read_text() for p in LICENSES]
    corpus = engine.encode(texts)
    print(f"corpus: {len(texts)} files, {corpus.n_tokens:,} tokens in "
          f"{len(corpus.chunks)} chunks, encoded in {corpus.encode_seconds:.0f} s")

    @tool(args_schema=Lookup, return_direct=True)
    def search_licences(question: str) -> str:
        """Answer a question from the full text of nine software licences."""
        out = engine.generate(question, corpus=corpus, max_new_tokens=48)
        kept = [LICENSES[d].name for c in out.chunks if c.kept for d in c.documents]
        print(f"  tool: search_licences({question!r}) kept {kept} -> {out.text!r}")
        return out.text

    model = ChatParallelComp(engine=engine, max_tokens=160)  # room for the JSON around 120 characters
    agent = create_agent(model, tools=[search_licences], middleware=[look_it_up],
                         system_prompt="Answer questions about software licences. Use search_licences to look "
                                       "facts up.")
    result = agent.invoke({"messages": [("user", args.question)]})
    for message in result["messages"]:
        calls = getattr(message, "tool_calls", None)
        print(f"{message.type:>6}: {message.content!r}" + (f" calls {[(c['name'], c['args']) for c in calls]}"
                                                             if calls else ""))
    print(f"answer: {result['messages'][-1].content}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
