"""`ParallelCompQuestionGenerator`: the sub-question generator of LlamaIndex's
`SubQuestionQueryEngine`, on the grammar.

`SubQuestionQueryEngine.from_defaults` wants `llama-index-question-gen-openai` (an OpenAI-only
program) unless `question_gen=` is given, and LlamaIndex's `LLMQuestionGenerator` parses JSON
out of free text, which a small model rarely writes ("No valid JSON found in output" with
SmolLM2-135M). This one asks through `ParallelCompLLM.structured_predict` for a list whose tool
names can only be the tools' names (a `Literal` in the schema), with the instructions of
LlamaIndex's OpenAI generator, so every answer parses and names a tool:

    engine = SubQuestionQueryEngine.from_defaults(
        query_engine_tools=tools, llm=llm, question_gen=ParallelCompQuestionGenerator(llm))
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, List, Literal, Sequence

from llama_index.core.bridge.pydantic import BaseModel, Field, create_model
from llama_index.core.prompts import PromptTemplate
from llama_index.core.question_gen.types import BaseQuestionGenerator, SubQuestion
from llama_index.core.schema import QueryBundle
from llama_index.core.tools.types import ToolMetadata

from parallelcomp import InputError

if TYPE_CHECKING:
    from pc_integrations.llama_index.llms import ParallelCompLLM

SUB_QUESTION_PROMPT = PromptTemplate("""\
You have access to multiple tools, each representing a different data source or API.
Each of the tools has a name and a description, formatted as a JSON dictionary.
The keys of the dictionary are the names of the tools and the values are the descriptions.
Your purpose is to help answer a complex user question by generating a list of sub questions that can be \
answered by the tools.

These are the guidelines you consider when completing your task:
* Be as specific as possible
* The sub questions should be relevant to the user question
* The sub questions should be answerable by the tools provided
* You can generate multiple sub questions for each tool
* Tools must be specified by their name, not their description
* You don't need to use a tool if you don't think it's relevant

## Tools
```json
{tools_str}
```

## User Question
{query_str}
""")
"""The instructions of LlamaIndex's OpenAI sub-question generator, without its function name."""

MAX_PER_TOOL = 3
MAX_QUESTION_CHARS = 300
"""Sub-questions per tool and characters per sub-question at most: bounds in the schema, so a
small model cannot run on until `max_new_tokens` ends the call with an error."""


class ParallelCompQuestionGenerator(BaseQuestionGenerator):
    def __init__(self, llm: ParallelCompLLM, prompt: PromptTemplate = SUB_QUESTION_PROMPT) -> None:
        self._llm = llm
        self._prompt = prompt

    def _get_prompts(self) -> dict:
        return {"question_gen_prompt": self._prompt}

    def _update_prompts(self, prompts: dict) -> None:
        if "question_gen_prompt" in prompts:
            self._prompt = prompts["question_gen_prompt"]

    def generate(self, tools: Sequence[ToolMetadata], query: QueryBundle) -> List[SubQuestion]:
        output_cls, variables = _question(tools, query)
        return _sub_questions(self._llm.structured_predict(output_cls, self._prompt, **variables))

    async def agenerate(self, tools: Sequence[ToolMetadata], query: QueryBundle) -> List[SubQuestion]:
        output_cls, variables = _question(tools, query)
        return _sub_questions(await self._llm.astructured_predict(output_cls, self._prompt, **variables))


def _question(tools: Sequence[ToolMetadata], query: QueryBundle) -> tuple[type[BaseModel], dict[str, str]]:
    """The output class and the prompt's variables of a `structured_predict` call."""
    tools_str = json.dumps({t.name: t.description for t in tools}, indent=4)
    return _sub_question_list(tools), {"tools_str": tools_str, "query_str": query.query_str}


def _sub_questions(found: BaseModel) -> List[SubQuestion]:
    return [SubQuestion(sub_question=i.sub_question, tool_name=i.tool_name) for i in found.items]


def _sub_question_list(tools: Sequence[ToolMetadata]) -> type[BaseModel]:
    """LlamaIndex's `SubQuestionList` with `tool_name` one of the tools' names."""
    names = tuple(dict.fromkeys(t.name for t in tools))
    if not names:
        raise InputError("SubQuestionQueryEngine has no tools: pass query_engine_tools")
    item = create_model("SubQuestion", sub_question=(str, Field(description="A question one tool can answer",
                                                                min_length=1, max_length=MAX_QUESTION_CHARS)),
                        tool_name=(Literal[names], Field(description="The name of the tool that answers it")))
    return create_model("SubQuestionList", __doc__="A list of sub questions, each for one tool.",
                        items=(List[item], Field(min_length=1, max_length=MAX_PER_TOOL * len(names))))

