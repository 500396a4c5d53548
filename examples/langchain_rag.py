"""RAG over a whole corpus with LangChain and ParallelComp: no top-k, no truncation.

The corpus is the license texts that ship with the OS (/usr/share/common-licenses, ~55K tokens;
Python's own pydoc pages are used where that folder is missing). A retriever returns *every*
document; `ParallelCompLLM` prefills them as parallel chunks, keeps the chunks whose content
makes the question most likely, and answers from those. The chain reports which documents
were kept and which were evicted, with their scores.

    pip install "parallelcomp[langchain]"
    python examples/langchain_rag.py                      # embedded SmolLM2-135M, offline
    python examples/langchain_rag.py --question "..." --model /path/to/hf-model

On a 2-core CPU this takes a few minutes (prefill of ~27 chunks of 2048 tokens).
"""

from __future__ import annotations

import argparse
import os
import pydoc
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402

from parallelcomp import ParallelCompConfig  # noqa: E402
from pc_integrations.langchain import (  # noqa: E402
    CorpusRetriever,
    ParallelCompLLM,
    create_parallelcomp_retrieval_chain,
)

LICENSES = Path("/usr/share/common-licenses")
FALLBACK_MODULES = ("argparse", "subprocess", "collections", "pathlib", "logging", "json", "csv", "sqlite3")
QUESTION = (
    "Under the Apache License 2.0, what is the name of the text file whose attribution notices "
    "must be included in redistributions?"
)
MIN_TOKENS = 32_000


class RunInfo(BaseCallbackHandler):
    """Keeps the model's generation_info (sources, chunks, stats) as LangChain reports it."""

    def on_llm_end(self, response, **kwargs) -> None:
        self.info = response.generations[0][0].generation_info


def load_corpus() -> list[Document]:
    """One Document per license file (symlinks resolved, duplicates dropped), else pydoc pages."""
    if LICENSES.is_dir():
        files = sorted({p.resolve() for p in LICENSES.iterdir() if p.is_file()})
        return [Document(page_content=f.read_text(errors="replace"), metadata={"source": str(f)}) for f in files]
    return [
        Document(page_content=pydoc.render_doc(name, renderer=pydoc.plaintext), metadata={"source": f"pydoc:{name}"})
        for name in FALLBACK_MODULES
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    # K=1, as `make ask`'s retrieval preset: the embedded 135M model answers best from one chunk. On
    # 2026-12-06 (bf16) it kept Apache-2.0's first chunk either way and answered 'the "Notices.txt"
    # file' with K=1 (the licence says a "NOTICE" text file), "a copyleft license" with K=3.
    parser.add_argument("--keep", type=int, default=1, help="chunks kept after scoring (K)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    start = time.perf_counter()
    config = ParallelCompConfig(chunk_tokens=args.chunk_tokens, keep_chunks=args.keep)
    llm = ParallelCompLLM.from_pretrained(args.model, config, max_new_tokens=args.max_new_tokens, progress=True)
    docs = load_corpus()
    total = sum(llm.get_num_tokens(d.page_content) for d in docs)
    print(f"model {llm.model_name}; corpus: {len(docs)} documents, {total:,} tokens (all of it goes to the model)")
    if total < MIN_TOKENS:
        print(f"note: the corpus is below {MIN_TOKENS:,} tokens on this system", file=sys.stderr)

    chain = create_parallelcomp_retrieval_chain(CorpusRetriever(documents=docs), llm)
    print(f"\nQ: {args.question}\nA: ", end="", flush=True)
    out: dict = {}
    run = RunInfo()
    for piece in chain.stream({"input": args.question}, {"callbacks": [run]}):
        if piece.get("answer"):
            print(piece["answer"], end="", flush=True)
        out.update({k: out.get(k, "") + v if k == "answer" else v for k, v in piece.items()})
    print()

    stats = run.info["stats"]
    print(
        f"\n{stats['n_chunks']} chunks of <= {stats['chunk_tokens']} tokens, {stats['n_kept']} kept; "
        f"prefill {stats['prefill_seconds']:.1f} s, decode {stats['decode_seconds']:.1f} s "
        f"({stats['new_tokens']} tokens, finish: {stats['finish_reason']})"
    )
    kept_chunks = {c["index"] for c in run.info["chunks"] if c["kept"]}
    print("\nkept (score = question NLL given its best chunk, lower is more relevant):")
    for s in sorted(out["sources"], key=lambda s: s["score"]):
        if s["kept"]:
            kept = [c for c in s["chunks"] if c in kept_chunks]
            print(f"  {s['score']:.3f}  {s['metadata']['source']}  (kept chunks {kept} of {s['chunks']})")
    evicted = [s for s in out["sources"] if not s["kept"]]
    print(f"evicted: {len(evicted)} documents:", ", ".join(Path(s["metadata"]["source"]).name for s in evicted))
    print(f"\nwall time {time.perf_counter() - start:.1f} s (model load included)")


if __name__ == "__main__":
    main()
