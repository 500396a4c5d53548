"""Issue #13: abandoned streams, engines sharing a model, cancellation, model files, CLI inputs and
the stop-string search. Waits are deadlock bounds (a thread that must finish), never timings."""

from __future__ import annotations

import asyncio
import builtins
import gc
import json
import os
import threading
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallelcomp import InputError, ModelLoadError, ParallelComp, ParallelCompConfig, guard
from parallelcomp.cli import read_documents
from parallelcomp.decode import TextAssembler
from pc_integrations.common import aiter_in_thread

from .conftest import tiny_model

QUESTION = "Where does the river run?"
DOCS = [
    "The river runs north past the copper garden.",
    "Seven stones lie under the purple cloud.",
    "The window faces the delta where boats wait.",
]
BOUND = 120  # seconds: only reached when something deadlocks


def bounded(fn, seconds: float = BOUND):
    """fn() in a thread; fails the test (instead of hanging it) if it has not returned in time."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s: deadlock"
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------- abandoned streams


@pytest.mark.parametrize("preset", ["paper", "paper-calibration"])
@pytest.mark.parametrize("abandon", ["break", "drop"])
def test_an_abandoned_stream_frees_the_model_without_a_gc_pass(tokenizer, preset, abandon):
    engine = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig.preset(preset))
    expected = engine.generate(QUESTION, documents=DOCS, max_new_tokens=6).text
    gc.disable()
    try:
        if abandon == "break":
            for _ in engine.stream(QUESTION, documents=DOCS, max_new_tokens=40):
                break
        else:
            stream = engine.stream(QUESTION, documents=DOCS, max_new_tokens=40)
            next(iter(stream))
            del stream
        assert engine.model.config._attn_implementation == "sdpa"  # calibration's switch undone
        assert not engine._lock.locked()
        out = bounded(lambda: engine.generate(QUESTION, documents=DOCS, max_new_tokens=6))
    finally:
        gc.enable()
    assert out.text == expected


def test_a_second_call_from_the_thread_holding_an_open_stream_is_an_error_not_a_deadlock(tokenizer, monkeypatch):
    monkeypatch.setattr(guard, "HANDOFF_S", 0.3)  # how long it waits for another thread to advance the stream
    model = tiny_model("llama", len(tokenizer))
    first = ParallelComp(model, tokenizer)
    other = ParallelComp(model, tokenizer, ParallelCompConfig.preset("paper-compression"))
    stream = first.stream(QUESTION, documents=DOCS, max_new_tokens=20)
    next(iter(stream))
    with pytest.raises(InputError, match="still open in this thread"):
        other.generate(QUESTION, documents=DOCS)  # same thread: before #13 this blocked forever
    stream.close()
    assert other.generate(QUESTION, documents=DOCS, max_new_tokens=3).stats.new_tokens >= 1


def test_a_pool_thread_that_ran_an_open_streams_step_waits_for_it_when_another_thread_advances_it(tokenizer):
    """Starlette's iterate_in_threadpool (FastAPI's StreamingResponse of a sync stream) runs each
    step of a stream in whichever pool thread is free: a new request can start in the thread that
    ran the open stream's last step. Before, that request was refused as a self-deadlock."""
    model = tiny_model("llama", len(tokenizer))
    first = ParallelComp(model, tokenizer)
    other = ParallelComp(model, tokenizer, ParallelCompConfig.preset("paper-compression"))
    solo_first = first.generate(QUESTION, documents=DOCS, max_new_tokens=20).text
    solo_other = other.generate(QUESTION, documents=DOCS, max_new_tokens=6).text
    stream = first.stream(QUESTION, documents=DOCS, max_new_tokens=20)
    deltas = iter(stream)
    rest: list[str] = []

    def pool_thread():  # runs a step of the open stream, then starts a new request
        rest.append(next(deltas))
        finisher = threading.Timer(0.2, lambda: rest.extend(deltas))  # the next steps, in another thread
        finisher.start()
        try:
            return other.generate(QUESTION, documents=DOCS, max_new_tokens=6)
        finally:
            finisher.join()

    out = bounded(pool_thread)
    assert "".join(rest) == stream.output.text == solo_first
    assert out.text == solo_other


@pytest.mark.parametrize("where", ["same thread", "other thread"])
def test_a_stream_dropped_in_a_reference_cycle_frees_the_model_for_the_next_call(tokenizer, where):
    """Starlette's StreamingResponse drops a sync stream inside a reference cycle when the client
    disconnects (a CancelledError's traceback holds the frame that holds the stream). Only the
    garbage collector finalizes it; before, the next call waited for a collection that an idle
    server may not run for minutes (or, in the thread that ran the stream, was refused)."""
    model = tiny_model("llama", len(tokenizer))
    engine = ParallelComp(model, tokenizer)
    expected = engine.generate(QUESTION, documents=DOCS, max_new_tokens=6).text
    gc.disable()
    try:
        def abandon():
            stream = engine.stream(QUESTION, documents=DOCS, max_new_tokens=40)
            next(iter(stream))
            cycle = {"stream": stream}
            cycle["self"] = cycle  # unreachable once this frame returns, but not freed by refcounts

        def call():
            return engine.generate(QUESTION, documents=DOCS, max_new_tokens=6)

        if where == "same thread":
            out = bounded(lambda: (abandon(), call())[1], seconds=30)
        else:
            bounded(abandon)
            assert engine._lock.locked()
            out = bounded(call, seconds=30)
    finally:
        gc.enable()
    assert out.text == expected


# ---------------------------------------------------------------------- engines sharing a model


def test_engines_on_one_model_share_its_lock_and_each_matches_its_solo_output(tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_model("llama", len(tokenizer))
    engines = [
        ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=2, chunk_tokens=24)),
        ParallelComp(model, tokenizer, ParallelCompConfig.preset("paper-compression", keep_chunks=2, chunk_tokens=24)),
        ParallelComp(model, tokenizer, ParallelCompConfig.preset("paper-calibration-compression", chunk_tokens=24)),
    ]
    assert len({id(e._lock) for e in engines}) == 1

    def run(engine):
        return engine.generate(QUESTION, documents=DOCS * 2, max_new_tokens=6).token_ids

    solo = [run(ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, e.config)) for e in engines]
    assert len({tuple(s) for s in solo}) == len(engines)  # the configurations really differ
    assert [run(e) for e in engines + engines[::-1]] == solo + solo[::-1]  # interleaved calls
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, engines[i % 3]) for i in range(6)]
        results = bounded(lambda: [f.result() for f in futures])
    assert results == [solo[i % 3] for i in range(6)]


def test_an_engine_built_while_another_streams_on_its_model_chooses_as_on_an_idle_model(tokenizer):
    """A paused stream keeps the model inside the run's attention scope; an engine built then
    read that backend ("parallelcomp") and chose other kernels, and another store identity."""
    model = tiny_model("llama", len(tokenizer))
    first = ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=1))
    idle = ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=1))
    stream = first.stream(QUESTION, documents=DOCS, max_new_tokens=20)
    next(iter(stream))  # the run is open, between two tokens
    during = ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=1))
    assert during._model_identity() == idle._model_identity()  # computed while the run is open
    stream.close()
    chosen = ("attention_kernel", "decode_kernel", "layer_kernel", "tiles")
    assert [getattr(during, k) for k in chosen] == [getattr(idle, k) for k in chosen]
    corpus = idle.encode(DOCS)
    assert during.generate(QUESTION, corpus=corpus, max_new_tokens=6).text == \
        idle.generate(QUESTION, documents=DOCS, max_new_tokens=6).text


def test_a_thread_given_a_finished_threads_ident_waits_for_the_model(tokenizer, monkeypatch):
    """A stream opened in a thread that then ended (the stream handed on) still holds the model;
    a later thread the OS gives the same ident must wait for it, not be told its own stream is open."""
    engine = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=1))
    expected = engine.generate(QUESTION, documents=DOCS, max_new_tokens=4).text
    opened = {}

    def open_stream():
        opened["stream"] = engine.stream(QUESTION, documents=DOCS, max_new_tokens=20)
        next(iter(opened["stream"]))

    first = threading.Thread(target=open_stream)
    first.start()
    first.join(BOUND)
    # Every thread gets the finished one's ident, as the OS may give it. The lock now tells threads
    # apart by their Thread objects and no longer asks for idents; the old one failed here.
    reused = types.SimpleNamespace(**vars(threading))
    reused.get_ident = lambda: first.ident
    monkeypatch.setattr(guard, "threading", reused)
    result = {}

    def call():
        try:
            result["text"] = engine.generate(QUESTION, documents=DOCS, max_new_tokens=4).text
        except Exception as err:  # noqa: BLE001 - reported below
            result["error"] = err

    second = threading.Thread(target=call)
    second.start()
    second.join(0.5)
    assert second.is_alive() and not result  # waiting for the model
    opened["stream"].close()
    second.join(BOUND)
    assert result == {"text": expected}


# ---------------------------------------------------------------------- cancellation


def test_cancelling_eight_async_callers_stops_the_engine_at_its_next_token(tokenizer):
    engine = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=1))
    expected = engine.generate(QUESTION, documents=DOCS, max_new_tokens=6).text
    forwards = [0]
    hook = engine.model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))

    async def main() -> int:
        first = asyncio.Event()

        async def consume():
            async for _ in aiter_in_thread(lambda: engine.stream(QUESTION, documents=DOCS, max_new_tokens=500)):
                first.set()

        tasks = [asyncio.create_task(consume()) for _ in range(8)]
        return await _cancel_all(tasks, forwards, first.is_set)  # once one caller decodes, seven wait

    try:
        at_cancel = asyncio.run(main())
        _join_workers()
        # at most the forward in flight finishes; the seven queued callers never start
        assert forwards[0] - at_cancel <= 1
    finally:
        hook.remove()
    assert not engine._lock.locked()
    assert bounded(lambda: engine.generate(QUESTION, documents=DOCS, max_new_tokens=6)).text == expected


def test_cancelling_llama_index_acomplete_and_achat_stops_the_engine(tokenizer):
    """They ran in `asyncio.to_thread`, which a cancelled task cannot stop: each decoded on to
    max_new_tokens for nobody while queued calls waited."""
    from llama_index.core.llms import ChatMessage

    from pc_integrations.llama_index import ParallelCompLLM

    engine = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig(keep_chunks=1))
    llm = ParallelCompLLM(engine, max_new_tokens=500)
    forwards = [0]
    hook = engine.model.register_forward_pre_hook(lambda module, args: forwards.__setitem__(0, forwards[0] + 1))
    calls = [lambda: llm.acomplete(QUESTION, documents=DOCS),
             lambda: llm.achat([ChatMessage(role="user", content=QUESTION)], documents=DOCS)]

    async def main(call) -> int:
        tasks = [asyncio.create_task(call()) for _ in range(4)]
        return await _cancel_all(tasks, forwards, lambda: forwards[0] >= 5)  # one decodes, three wait

    try:
        for call in calls:
            at_cancel = asyncio.run(main(call))
            _join_workers()
            assert forwards[0] - at_cancel <= 1
    finally:
        hook.remove()
    assert not engine._lock.locked()


async def _cancel_all(tasks, forwards: list[int], started) -> int:
    """Once `started()`, cancel every task and check each ended cancelled; the model forwards
    counted at that moment."""
    while not started():
        await asyncio.sleep(0.01)
    at_cancel = forwards[0]
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    return at_cancel


def _join_workers() -> None:
    for thread in [t for t in threading.enumerate() if t.name == "parallelcomp-worker"]:
        thread.join(BOUND)
        assert not thread.is_alive(), "a worker is still running after cancellation"


# ---------------------------------------------------------------------- model files


def test_a_tokenizer_asking_for_remote_code_never_runs_it_nor_prompts(model_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (model_dir / "custom_tok.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    custom = "custom_tok.CustomTok"
    config.update(tokenizer_class="CustomTok", auto_map={"AutoTokenizer": [custom, custom]})
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *args: prompts.append(args) or "y")
    with pytest.raises(ModelLoadError, match="custom code"):
        ParallelComp.from_pretrained(model_dir)
    assert prompts == [] and not marker.exists()


def test_a_truncated_safetensors_file_is_named(model_dir):
    weights = model_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match=f"{weights}: truncated safetensors file"):
        ParallelComp.from_pretrained(model_dir)
    os.truncate(weights, 5)
    with pytest.raises(ModelLoadError, match="model.safetensors: truncated safetensors file .*no header"):
        ParallelComp.from_pretrained(model_dir)


def test_weights_that_do_not_fit_the_config_are_a_model_load_error(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match=r"could not load model .*\(config.json, .*model.safetensors\)"):
        ParallelComp.from_pretrained(model_dir)


# ---------------------------------------------------------------------- CLI inputs


def test_corpus_symlinks_leading_outside_and_special_files_are_skipped(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("inside")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (corpus / "out.txt").symlink_to(secret)
    (corpus / "in.txt").symlink_to(corpus / "a.txt")
    os.mkfifo(corpus / "pipe")
    (corpus / "loop").symlink_to(corpus / "loop")
    (corpus / "gone").symlink_to(corpus / "missing.txt")
    names, texts = bounded(lambda: read_documents([str(corpus)]))
    assert names == [str(corpus / "a.txt")] and texts == ["inside"]
    err = capsys.readouterr().err
    assert f"skipping {corpus / 'in.txt'}: the same file was read already as {corpus / 'a.txt'}" in err
    assert f"skipping {corpus / 'out.txt'}: symlink to {secret}, outside" in err
    assert f"skipping {corpus / 'pipe'}: not a regular file (a FIFO)" in err
    assert f"skipping {corpus / 'loop'}: " in err and f"skipping {corpus / 'gone'}: " in err


@pytest.mark.parametrize(
    "path, match",
    [
        ("/dev/zero", "not a regular file \\(a character device\\)"),
        ("/proc/self/status", "size is not known in advance"),
        ("FIFO", "not a regular file \\(a FIFO\\)"),
    ],
)
def test_special_files_named_on_the_command_line_are_refused(tmp_path, path, match):
    if path == "FIFO":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    with pytest.raises(InputError, match=match):
        bounded(lambda: read_documents([path]))


def test_a_huge_file_is_refused_by_its_size_before_reading(tmp_path):
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as f:
        f.truncate(64 * 2**30)  # sparse: reading it whole would take minutes and 64 GiB
    with pytest.raises(InputError, match="more than max_input_chars characters"):
        bounded(lambda: read_documents([str(huge)]))
    small = tmp_path / "small.txt"
    small.write_text("x" * 5000)
    with pytest.raises(InputError, match="past 4,000 more bytes"):
        read_documents([str(small)], max_chars=1000)


# ---------------------------------------------------------------------- stop strings


class _CharTokenizer:
    """Token id i decodes to ALPHABET[i]; a lone '\ufffd' stands for an unfinished UTF-8 byte."""

    ALPHABET = "ab \ufffd"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.ALPHABET[i] for i in ids)


def _reference_deltas(ids: list[int], stops: list[str]) -> tuple[str, bool]:
    """The pre-#13 algorithm (quadratic in stop length), as the behaviour to keep."""
    stops = [s for s in stops if s]
    text_all, emitted, out = "", 0, []
    for n in range(1, len(ids) + 1):
        text = _CharTokenizer().decode(ids[:n])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            text_all = text[: min(hits)]
            out.append(text_all[emitted:])
            return "".join(out), True
        text_all = text
        safe = len(text.rstrip("\ufffd"))
        held = max((k for s in stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        upto = max(safe - held, emitted)
        out.append(text[emitted:upto])
        emitted = upto
    out.append(text_all[emitted:])
    return "".join(out), False


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, 3), max_size=40),
    stops=st.lists(st.text(alphabet="ab ", max_size=6), max_size=3),
)
def test_the_linear_stop_search_emits_what_the_quadratic_one_did(ids, stops):
    assembler = TextAssembler(_CharTokenizer(), stops)
    pieces = []
    for token in ids:
        pieces.append(assembler.add(token))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    assert ("".join(pieces), assembler.stopped) == _reference_deltas(ids, stops)
