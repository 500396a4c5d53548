"""LangChain integration: `ParallelCompLLM`, `ChatParallelComp`, retrieval chains and an agent tool.

Requires `langchain-core` (`pip install parallelcomp[langchain]`). Every model step runs in the
core engine; these modules only translate LangChain calls, callbacks and documents.
"""

from ..common import CONTEXT_MARKER
from .chains import (
    CorpusRetriever,
    create_parallelcomp_documents_chain,
    create_parallelcomp_retrieval_chain,
    create_parallelcomp_tool,
)
from .chat_models import ChatParallelComp, messages_to_prompt
from .llms import ParallelCompLLM

__all__ = [
    "CONTEXT_MARKER",
    "ChatParallelComp",
    "CorpusRetriever",
    "ParallelCompLLM",
    "create_parallelcomp_documents_chain",
    "create_parallelcomp_retrieval_chain",
    "create_parallelcomp_tool",
    "messages_to_prompt",
]
