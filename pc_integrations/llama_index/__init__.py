"""LlamaIndex integration (llama-index-core 0.14): `ParallelCompSynthesizer` for query engines and
`ParallelCompLLM`, a `CustomLLM`. Both share one engine and all prompt/attribution logic
(`pc_integrations.common`) with the LangChain wrapper.

    engine = ParallelComp.from_pretrained()                       # embedded SmolLM2-135M
    llm = ParallelCompLLM(engine, max_new_tokens=128)
    query_engine = RetrieverQueryEngine(
        index.as_retriever(similarity_top_k=len(nodes)),          # retrieve the whole corpus
        response_synthesizer=ParallelCompSynthesizer(llm, streaming=True),
    )
    tool = QueryEngineTool.from_defaults(query_engine, name="docs", description="...")  # agents
    SubQuestionQueryEngine.from_defaults(query_engine_tools=[...], llm=llm,
                                         question_gen=ParallelCompQuestionGenerator(llm))
"""

from pc_integrations.llama_index.llms import REFINE_TEMPLATE, TEXT_QA_TEMPLATE, NoToolCallError, ParallelCompLLM
from pc_integrations.llama_index.question_gen import ParallelCompQuestionGenerator
from pc_integrations.llama_index.synthesizer import ATTRIBUTION_KEYS, ParallelCompSynthesizer

__all__ = [
    "ATTRIBUTION_KEYS",
    "NoToolCallError",
    "REFINE_TEMPLATE",
    "TEXT_QA_TEMPLATE",
    "ParallelCompLLM",
    "ParallelCompQuestionGenerator",
    "ParallelCompSynthesizer",
]
