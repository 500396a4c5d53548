"""Thin LangChain and LlamaIndex wrappers over `parallelcomp.ParallelComp`.

Import the framework modules directly (`pc_integrations.langchain`, `pc_integrations.llama_index`);
this package itself imports neither framework.
"""
