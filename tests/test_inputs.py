"""Bad input gets a typed ParallelCompError that says what to change, and nothing is cut silently."""

from __future__ import annotations

import pytest

from parallelcomp import ConfigError, InputError, ParallelComp, ParallelCompConfig, ParallelCompError


@pytest.fixture(scope="module")
def pc(tokenizer):
    from .conftest import tiny_model

    return ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=1))


@pytest.mark.parametrize(
    "question, kwargs, match",
    [
        ("", {"documents": ["a doc"]}, "question is empty"),
        ("   ", {"documents": ["a doc"]}, "question is empty"),
        (42, {"documents": ["a doc"]}, "question must be a string"),
        ("Q?", {"documents": []}, "documents is empty"),
        ("Q?", {"documents": ["ok", "  \n"]}, "document 1 is empty"),
        ("Q?", {"documents": ["ok", 3]}, "document 1 is a int"),
        ("Q?", {"documents": "one string"}, "for one long text pass \\[text\\]"),
        ("Q?", {"documents": ["a"], "context": "b"}, "not both"),
        ("Q?", {"context": 5}, "context must be a string"),
        ("Q?", {"documents": ["a"], "stop": 3}, "stop must be a string or a list"),
        ("Q?", {"documents": ["a"], "max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
        ("Q?", {"documents": ["a"], "max_new_tokens": "5"}, "max_new_tokens: expected an integer, got str"),
        ("Q?", {"documents": ["a"], "temperature": -1}, "temperature: Input should be greater than or equal to 0"),
        ("Q?", {"documents": ["a"], "temperature": True}, "temperature: expected a number, got bool"),
        ("Q?", {"documents": ["a"], "temperature": 1e-45}, "temperature must be 0 \\(greedy\\) or >= 0.0001"),
        ("Q?", {"documents": ["a"], "temperature": 1e39}, "temperature: Input should be less than or equal to 100"),
        ("Q?", {"history": None, "progress": "yes"}, "progress must be True or False"),
        ("Q?", {"history": "hi"}, "history must be a list of"),
        ("Q?", {"history": [{"role": "system"}]}, "history message 0 must be"),
        ("Q?", {"history": [{"role": "user", "content": 5}]}, "history message 0 must be"),
        ("Q?", {"history": [{"role": "bogus", "content": "x"}]}, "history message 0 must be"),
        ("Q?", {"history": [{"role": "user", "content": "\ud800"}]}, "history message 0 .*lone surrogate"),
        ("Where is <<<PARALLELCOMP_DOCUMENTS>>>?", {"documents": ["a"]}, "the question contains '<<<PARALLELCOMP"),
        ("Q?", {"history": [{"role": "user", "content": "<<<PARALLELCOMP_DOCUMENTS>>>"}]}, "history message 0 contains"),
        ("Q?", {"documents": ["a"], "top_p": 0}, "top_p: Input should be greater than 0"),
        ("Q?", {"documents": ["a"], "top_p": "0.5"}, "top_p: expected a number, got str"),
        ("Q?", {"documents": ["a"], "top_p": None}, "top_p: expected a number, got NoneType"),
        ("Q?", {"documents": ["a"], "top_p": complex(0.5, 1)}, "top_p: expected a number, got complex"),
        ("Q?", {"documents": ["a"], "top_k": True}, "top_k: expected an integer, got bool"),
        ("Q?", {"documents": ["a"], "seed": 1.5}, "seed: expected an integer, got float"),
        ("Q?", {"documents": ["a"], "seed": 2**64}, "seed: Input should be less than or equal to"),
        ("Q?", {"documents": ["a"], "repetition_penalty": float("nan")}, "expected a finite number"),
        ("Q?", {"documents": ["a"], "max_tokens": 5}, "max_tokens: unknown setting; valid settings are max_new_tokens"),
    ],
)
def test_bad_call_arguments(pc, question, kwargs, match):
    with pytest.raises(InputError, match=match):
        pc.generate(question, **kwargs)


def test_helpers_and_loading_take_only_what_they_can_use(pc, model_dir, monkeypatch):
    import os

    for text, match in [(["a", "b"], "count_tokens takes one string, got list"), (5, "got int"),
                        ("\ud800", "lone surrogate")]:
        with pytest.raises(InputError, match=match):
            pc.count_tokens(text)
    with pytest.raises(InputError, match="question must be a string"):
        pc.prompt_parts(5, True)
    with pytest.raises(InputError, match="progress"):
        pc.score("two words", documents=["a doc"], progress="yes")
    assert pc.generate("Q?", documents=["a doc"], history=None, max_new_tokens=1).stats.new_tokens == 1

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_load)
    with pytest.raises(ConfigError, match="model must be a local directory path"):
        ParallelComp.from_pretrained(5)
    with pytest.raises(ConfigError, match=f"from 1 to this machine's {os.cpu_count()} logical CPUs"):
        ParallelComp.from_pretrained(model_dir, threads=10**6)


def test_question_longer_than_the_chunk_budget(pc):
    with pytest.raises(InputError, match="leave no room in the model.s 1024-token window; shorten the question"):
        pc.generate("why " * 1200, documents=["short doc"], max_new_tokens=8)


def test_huge_document_is_refused_before_any_work(pc):
    with pytest.raises(InputError, match="max_input_chars"):
        pc.generate("Q?", documents=["x" * 10_000_000])


@pytest.mark.parametrize(
    "values, match",
    [
        ({"keep_chunks": 0}, "keep_chunks"),
        ({"chunk_tokens": -5}, "chunk_tokens"),
        ({"chunk_tokens": 5}, "chunk_tokens: Input should be greater than or equal to 16"),
        ({"prefill_batch_tokens": 0}, "prefill_batch_tokens"),
        ({"kv_budget_tokens": 10, "kv_budget_ratio": 0.5}, "not both"),
        ({"pool_kernel": 4}, "odd"),
        ({"bogus": 1}, "bogus"),
        ({"kv_store_dir": 5}, "kv_store_dir"),
        ({"kv_store_dir": ""}, "kv_store_dir is empty"),
        ({"keep_chunks": "3"}, "keep_chunks: Input should be a valid integer"),
        ({"keep_chunks": True}, "keep_chunks: Input should be a valid integer"),
        ({"use_chat_template": "no"}, "use_chat_template: Input should be a valid boolean"),
        ({"memory_budget_bytes": True}, "memory_budget_bytes: Input should be a valid integer"),
        ({"kv_budget_ratio": "0.5"}, "kv_budget_ratio: Input should be a valid number"),
        ({"lexical_weight": float("inf")}, "lexical_weight: Input should be a finite number"),
    ],
)
def test_invalid_config(values, match):
    with pytest.raises(ConfigError, match=match):
        ParallelCompConfig(**values)


def test_the_store_directory_may_be_a_path_object_or_start_at_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ParallelCompConfig(kv_store_dir=tmp_path / "kv").kv_store_dir == str(tmp_path / "kv")
    assert ParallelCompConfig(kv_store_dir="~/kv").kv_store_dir == str(tmp_path / "kv")


def test_chunk_tokens_above_the_model_window(tokenizer):
    from .conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(ConfigError, match="exceeds the model's trained window of 1024"):
        ParallelComp(model, tokenizer, ParallelCompConfig(chunk_tokens=4096))


def test_a_device_torch_cannot_use_is_a_config_error_before_loading(model_dir, monkeypatch):
    import torch

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_load)
    with pytest.raises(ConfigError, match="'gpu' is not a torch device name"):
        ParallelComp.from_pretrained(model_dir, device="gpu")
    with pytest.raises(ConfigError, match="device must be a string"):
        ParallelComp.from_pretrained(model_dir, device=0)
    with pytest.raises(ConfigError, match="'meta' is not supported"):
        ParallelComp.from_pretrained(model_dir, device="meta")
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:999' does not exist: torch sees"):
            ParallelComp.from_pretrained(model_dir, device="cuda:999")
    else:
        with pytest.raises(ConfigError, match="'cuda' is not available: torch .*device='cpu'"):
            ParallelComp.from_pretrained(model_dir, device="cuda")


@pytest.mark.parametrize("config", [{"keep_chunks": 1}, "retrieval", 3])
def test_a_config_that_is_not_a_parallelcomp_config_is_a_config_error(tokenizer, config):
    from .conftest import tiny_model

    with pytest.raises(ConfigError, match="config must be a ParallelCompConfig"):
        ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, config)
    with pytest.raises(ConfigError, match=f"got {type(config).__name__}"):  # before any file is read
        ParallelComp.from_pretrained("/nonexistent", config=config)


def test_unknown_preset_and_errors_share_one_base():
    with pytest.raises(ParallelCompError, match="unknown preset"):
        ParallelCompConfig.preset("nope")
    with pytest.raises(ConfigError, match="unknown preset \\['fast'\\]"):
        ParallelCompConfig.preset(["fast"])
    assert issubclass(InputError, ParallelCompError) and issubclass(ConfigError, ParallelCompError)


def test_split_and_evicted_documents_are_reported(tokenizer):
    from .conftest import tiny_model

    pc = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=1, chunk_tokens=40))
    long_doc = "\n\n".join(f"Paragraph {i} tells about the river and the stone." for i in range(12))
    out = pc.generate("Where is the river?", documents=["A short note.", long_doc], max_new_tokens=2)
    assert out.stats.split_documents == [1]
    pieces = [long_doc[s.start : s.end] for c in out.chunks for s in c.spans if s.document == 1]
    assert "\n\n".join(pieces) == long_doc  # split at paragraph breaks, only the breaks dropped (#12)
    assert sum(c.kept for c in out.chunks) == 1 and out.stats.n_chunks == len(out.chunks) > 2
    kept_docs = {d for c in out.chunks if c.kept for d in c.documents}
    assert set(out.stats.evicted_documents) == {0, 1} - kept_docs


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 1, "seed": 3}, {"repetition_penalty": 2}, {"top_k": 5, "temperature": 1}]
)
def test_integer_valued_float_settings_work(pc, kwargs):
    out = pc.generate("Where is the river?", documents=["The river runs north."], max_new_tokens=3, **kwargs)
    assert out.stats.new_tokens >= 1 and out.text


@pytest.mark.parametrize("max_new_tokens", [10**9, 2**63, 1025])
@pytest.mark.parametrize("chunk_tokens", [None, 64])
@pytest.mark.parametrize("documents", [["The river runs north."], None])
def test_max_new_tokens_beyond_the_window_is_refused_naming_the_limit(
    tokenizer, max_new_tokens, chunk_tokens, documents
):
    from .conftest import tiny_model

    engine = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(chunk_tokens=chunk_tokens))
    with pytest.raises(InputError, match="max_new_tokens") as err:
        engine.generate("Where is the river?", documents=documents, max_new_tokens=max_new_tokens)
    assert "1024-token window" in str(err.value)  # the limit comes from the model's window


@pytest.mark.parametrize(
    "question, kwargs, match",
    [
        ("Q\ud800?", {"documents": ["a doc"]}, r"question has a lone surrogate '\\ud800' at character 1"),
        ("Q?", {"documents": ["ok", "ab\udfffc"]}, r"document 1 has a lone surrogate '\\udfff' at character 2"),
        ("Q?", {"context": "x" * 5 + "\ud800"}, "context has a lone surrogate .* at character 5"),
        ("Q?", {"documents": {"a doc": 1}}, "documents must be a list or tuple of strings, got dict"),
        ("Q?", {"documents": {"a doc", "b doc"}}, "documents must be a list or tuple of strings, got set"),
        ("Q?", {"documents": 5}, "documents must be a list or tuple of strings, got int"),
        ("Q?", {"documents": True}, "documents must be a list or tuple of strings, got bool"),
        ("Q?", {"documents": object()}, "documents must be a list or tuple of strings, got object"),
        ("Q?", {"documents": (d for d in ["a"])}, "documents must be a list or tuple of strings, got generator"),
        ("Q?", {"documents": ["a"], "stop": ["x"] * 33}, "at most 32 stop strings, got 33"),
        ("Q?", {"documents": ["a"], "stop": "x" * 100_000}, "at most 1000 characters, got one of 100,000"),
    ],
)
def test_bad_text_and_container_inputs(pc, question, kwargs, match):
    with pytest.raises(InputError, match=match) as err:
        pc.generate(question, **kwargs)
    assert len(str(err.value)) < 400  # a huge value is cut in the message


def test_surrogates_in_config_text_are_a_config_error():
    with pytest.raises(ConfigError, match="lone surrogate"):
        ParallelCompConfig(instruction="Answer \ud800 briefly.")


def test_tuple_of_documents_is_accepted(pc):
    out = pc.generate("Where is the river?", documents=("The river runs north.", "A stone."), max_new_tokens=2)
    assert out.stats.n_documents == 2


MANY_DOCS = [f"Note {i}: the river passes stone number {i} on its way north to the sea." for i in range(40)]


@pytest.mark.parametrize(
    "config, max_new_tokens, knob",
    [
        ({"prefill_batch_tokens": 4096}, 1, "one prefill micro-batch \\(lower prefill_batch_tokens"),
        ({"prefill_batch_tokens": 64}, 900, "the question step and decode cache \\(lower max_new_tokens"),
    ],
)
def test_memory_estimate_above_the_budget_names_the_largest_part(tokenizer, config, max_new_tokens, knob):
    from parallelcomp import ResourceError

    from .conftest import tiny_model

    engine = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer,
                          ParallelCompConfig(chunk_tokens=64, keep_chunks=1, memory_budget_bytes=1, **config))
    with pytest.raises(ResourceError, match=f"above memory_budget_bytes .*; the largest part is {knob}"):
        engine.generate("Where?", documents=MANY_DOCS, max_new_tokens=max_new_tokens)


def test_the_run_fits_a_budget_of_exactly_its_estimate(tokenizer, monkeypatch):
    from parallelcomp import ResourceError, guard

    from .conftest import tiny_model

    model = tiny_model("llama", len(tokenizer))
    seen, original = [], guard.estimate
    monkeypatch.setattr(guard, "estimate", lambda *a: seen.append(original(*a)) or seen[-1])
    config = {"chunk_tokens": 64, "prefill_batch_tokens": 256}
    ParallelComp(model, tokenizer, ParallelCompConfig(**config)).generate("Where?", documents=MANY_DOCS,
                                                                          max_new_tokens=1)
    peak = seen[-1].peak
    ParallelComp(model, tokenizer, ParallelCompConfig(**config, memory_budget_bytes=peak)).generate(
        "Where?", documents=MANY_DOCS, max_new_tokens=1
    )
    too_little = ParallelComp(model, tokenizer, ParallelCompConfig(**config, memory_budget_bytes=peak - 1))
    with pytest.raises(ResourceError, match="or raise memory_budget_bytes in ParallelCompConfig"):
        too_little.generate("Where?", documents=MANY_DOCS, max_new_tokens=1)


def test_default_budget_is_the_free_memory(pc, monkeypatch):
    from parallelcomp import ResourceError, guard

    monkeypatch.setattr(guard, "available_bytes", lambda device: 1000)
    with pytest.raises(ResourceError, match="above the free memory now"):
        pc.generate("Where?", documents=["The river runs north."], max_new_tokens=2)


def test_the_estimate_counts_what_the_kv_store_may_keep(tokenizer):
    from parallelcomp import guard
    from parallelcomp.chunking import Chunk

    from .conftest import tiny_model

    shape = guard.ModelShape.of(tiny_model("llama", len(tokenizer)))
    chunks = [Chunk(i, list(range(50)), ()) for i in range(4)]
    config = ParallelCompConfig(chunk_tokens=64, keep_chunks=1)
    base = guard.estimate(shape, config, 10, chunks, 5, 8)
    all_kv = 200 * shape.kv_token_bytes
    assert base.stored == 0
    assert guard.estimate(shape, config, 10, chunks, 5, 8, store_room=10**12).stored == all_kv
    capped = guard.estimate(shape, config, 10, chunks, 5, 8, store_room=all_kv // 3)
    assert capped.stored == all_kv // 3 and capped.peak == base.peak + all_kv // 3


@pytest.mark.parametrize("history, role, roles", [
    ([{"role": "system", "content": "Be brief."}], "user", "system, user"),
    ([{"role": "user", "content": "Add 1+2."}, {"role": "assistant", "content": "3"}], "tool", "user, assistant, tool"),
    ([{"role": "user", "content": "Hi."}], "user", "user, user"),
])
def test_a_chat_the_template_refuses_is_an_input_error_naming_its_roles(tokenizer, history, role, roles):
    """Mistral-v0.1, Llama-2 and Gemma-2 templates raise on a system or tool turn, or on turns that
    do not alternate; that was a raw jinja2 TemplateError."""
    from .conftest import STRICT_TEMPLATE, tiny_model, with_template

    tok = with_template(tokenizer, STRICT_TEMPLATE)
    engine = ParallelComp(tiny_model("mistral", len(tok)), tok, ParallelCompConfig())
    match = rf"chat template refuses this chat \(roles: {roles}\): Conversation roles must alternate"
    with pytest.raises(InputError, match=match):
        engine.generate("What now?", history=history, role=role, max_new_tokens=2)


def test_copies_of_wrappers_share_the_engine_and_pickling_is_a_config_error(pc):
    """A deep copy (`copy.deepcopy`, pydantic's `model_copy(deep=True)`) walked into the engine's
    lock and raised a raw TypeError; it now shares the engine, whose weights are never copied."""
    import copy
    import pickle

    from pc_integrations.langchain import ChatParallelComp, ParallelCompLLM

    llm = ParallelCompLLM(engine=pc, max_new_tokens=3)
    assert copy.deepcopy(llm).engine is pc and llm.model_copy(deep=True).engine is pc
    assert copy.deepcopy(ChatParallelComp(llm=llm)).llm.engine is pc and copy.deepcopy(pc) is pc
    twin = copy.copy(pc)  # a shallow copy is still a new engine object (LlamaIndex's engine_for)
    assert twin is not pc and twin.model is pc.model
    for target in (pc, llm):
        with pytest.raises(ConfigError, match="cannot be pickled"):
            pickle.dumps(target)
