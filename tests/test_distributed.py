"""parallelcomp.distributed on a local Ray (2 workers, tiny models): the same answers as one
process, token for token; a corpus's KV stays on its workers across questions; a lost worker's
chunks are scored again elsewhere; typed errors for a missing Ray and bad settings.

One Ray per test session (starting it takes seconds) and one engine per model family. Bit for
bit needs the same float work on both sides (docs/distributed.md, "Exactness"): the workers batch
only their own chunks, so these configs give every chunk its own micro-batch and phase-2 forward
(prefill_batch_tokens < 2 × the shortest chunk), and every process here runs one torch thread,
as the workers do.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import parallelcomp
from parallelcomp import ConfigError, DistributedError, ParallelComp, ParallelCompConfig, layer_kernel
from parallelcomp import engine as engine_module
from parallelcomp import kv as kvops
from parallelcomp.cli import main
from parallelcomp.config import PAPER_CALIBRATION_RULES

from .conftest import tiny_model
from .test_attention_kernel import needs_kernel as needs_attention_kernel
from .test_layer_kernel import needs_kernel
from .test_core import text

ray = pytest.importorskip("ray")

from parallelcomp.distributed import RayParallelComp, placement  # noqa: E402
from parallelcomp.distributed.engine import _runtime_env  # noqa: E402

QUESTIONS = ["Where is the copper garden?", "Which river runs past the stone?"]
# Eight documents of 22-40 tokens, chunk_tokens=40: one document per chunk.
DOCS = [text(200 + i, n) for i, n in enumerate([30, 22, 35, 28, 25, 33, 24, 31])]
CONFIGS = {
    "compression+calibration": dict(kv_budget_ratio=0.5, calibration_rules=PAPER_CALIBRATION_RULES,
                                    calibrate_prefix=True),
    "plain": {},
    "lexical": dict(lexical_weight=1.0),  # the BM25 prior is computed once, over every worker's chunks
}
BASE = dict(keep_chunks=3, chunk_tokens=40, prefill_batch_tokens=40)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # from_pretrained(threads=1) below set it for the process


@pytest.fixture(scope="session")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in ~/.ray for a throwaway cluster
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default 15 starves the workers on a busy machine
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30,
             runtime_env=_runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory, tokenizer):
    """family → a local HF directory holding a tiny random model of that family."""

    def save(family: str) -> Path:
        path = tmp_path_factory.getbasetemp() / f"tiny-{family}"
        if not path.exists():
            tiny_model(family, len(tokenizer)).save_pretrained(path)
            tokenizer.save_pretrained(path)
        return path

    return save


@pytest.fixture(scope="session")
def ray_engines(local_ray, saved_models):
    """family → (RayParallelComp with 2 workers, the single-process ParallelComp), same model files.
    Llama's stays for the session; another family's is closed when the next one starts, so at
    most 4 of the session Ray's 8 (logical) CPUs are held by these workers."""
    engines = {}

    def get(family: str):
        for other in [f for f in engines if f not in (family, "llama")]:
            engines.pop(other)[0].close()
        if family not in engines:
            config = ParallelCompConfig(**BASE, **CONFIGS["compression+calibration"])
            path = saved_models(family)
            ours = RayParallelComp.from_pretrained(path, config, num_workers=2, dtype="float32", threads=1)
            engines[family] = ours, ParallelComp.from_pretrained(path, config, dtype="float32", threads=1)
        return engines[family]

    yield get
    for ours, _ in engines.values():
        ours.close()


def with_config(engine, **config):
    """The engine with another config (the LlamaIndex wrapper makes its variants this way)."""
    import copy

    variant = copy.copy(engine)
    variant.config = ParallelCompConfig(**{**BASE, **config})
    return variant


def kill(handle):
    """ray.kill, then wait until the actor is gone: the kill is asynchronous, and a call sent
    right after it may still be served."""
    ray.kill(handle)
    for _ in range(600):
        try:
            ray.get(handle.describe.remote())
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed worker still answers after 60 s")


def assert_same(got, ref):
    assert got.token_ids == ref.token_ids and got.text == ref.text
    # equal to fp32 rounding: bit for bit on the AVX2 host, but on an AVX-512 host one full-suite
    # run saw a 1-ulp difference (12.207420349 against 12.207421303) between a worker process and
    # the driver (both one thread), which the GEMM kernels do not promise across processes
    assert [c.score for c in got.chunks] == pytest.approx([c.score for c in ref.chunks], rel=1e-6, abs=0)
    assert [(c.index, c.kept, c.kv_tokens, c.lexical) for c in got.chunks] == \
           [(c.index, c.kept, c.kv_tokens, c.lexical) for c in ref.chunks]
    for field in ("p0", "kv_tokens", "kv_bytes", "kv_bytes_uncompressed", "calibration_evicted", "n_kept"):
        assert getattr(got.stats, field) == getattr(ref.stats, field), field


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_generate_and_score_equal_the_single_process_engine(family, ray_engines, config):
    ours, ref = ray_engines(family)
    ours, ref = with_config(ours, **CONFIGS[config]), with_config(ref, **CONFIGS[config])
    for question in QUESTIONS:
        got = ours.generate(question, documents=DOCS, max_new_tokens=12)
        want = ref.generate(question, documents=DOCS, max_new_tokens=12)
        assert_same(got, want)
        assert len(set(want.token_ids)) > 1, "degenerate output makes this comparison weak"
        # each chunk was scored by its owner under rendezvous hashing (not necessarily both workers)
        plan = placement.assign(dict(enumerate(ref.encode(DOCS).keys)), ["worker-0", "worker-1"])
        assert got.stats.worker_chunks == {name: len(indices) for name, indices in plan.items()}
        assert want.stats.workers == 0 and want.stats.transfer_bytes == 0
    target = "The copper garden lies north of the river stone."
    got, want = ours.score(target, documents=DOCS), ref.score(target, documents=DOCS)
    assert got.token_nlls == pytest.approx(want.token_nlls, rel=1e-6, abs=0)  # to fp32 rounding, as in assert_same
    assert [c.score for c in got.chunks] == pytest.approx([c.score for c in want.chunks], rel=1e-6, abs=0)


def test_a_corpus_stays_on_its_workers_and_only_kept_kv_moves(ray_engines):
    ours, ref = ray_engines("llama")
    ours, ref = with_config(ours, kv_budget_ratio=0.5), with_config(ref, kv_budget_ratio=0.5)
    docs = [d.replace(".", " again.") for d in DOCS]  # chunks no other test has stored
    corpus = ours.encode(docs)
    assert corpus.encoded_chunks == len(docs) and corpus.bytes_held > 0
    placements = []
    for question in QUESTIONS:
        out = ours.generate(question, corpus=corpus, max_new_tokens=8)
        assert_same(out, ref.generate(question, documents=docs, max_new_tokens=8))
        s = out.stats
        assert (s.encoded_chunks, s.reused_chunks, s.reused_tokens) == (0, len(docs), corpus.n_tokens)
        placements.append(s.worker_chunks)
        # what moved is the kept chunks' compressed KV: the merged KV less the driver's own prefix
        per_token = s.kv_bytes // s.kv_tokens
        assert s.transfer_bytes == per_token * (s.kv_tokens - s.prefix_tokens) > 0
    assert placements[0] == placements[1] and all(placements[0].values())
    # both workers hold chunks: the keys (tiny model seed 0, identity without the model's path)
    # are the same in every run, so this is deterministic, not luck per run
    assert len(placements[0]) == 2
    assert ours.store.bytes_held == 0  # the driver holds no chunk KV


def test_workers_write_their_disk_tier_after_the_last_token(local_ray, saved_models, tmp_path):
    """As in one process (test_store.py): no chunk file exists when the first token arrives, every
    chunk's file after the last one, written by the workers and timed in the run's stats; a
    single-process engine then reads them all from disk and answers the same."""
    config = ParallelCompConfig(**BASE, kv_store_dir=str(tmp_path))
    path = saved_models("llama")
    files = lambda: sorted(tmp_path.glob("v1/*/*/*.safetensors"))
    with RayParallelComp.from_pretrained(path, config, num_workers=2, dtype="float32", threads=1) as ours:
        stream = ours.stream(QUESTIONS[0], documents=DOCS, max_new_tokens=8)
        first = next(iter(stream))
        assert files() == []
        text = first + "".join(stream)
        s = stream.output.stats
        assert len(files()) == s.n_chunks == s.encoded_chunks and len(s.worker_chunks) == 2
        assert s.store_write_seconds > 0 and s.store_write_errors == 0
    fresh = ParallelComp.from_pretrained(path, config.replace(kv_store_bytes=0), dtype="float32", threads=1)
    out = fresh.generate(QUESTIONS[0], documents=DOCS, max_new_tokens=8)
    assert out.text == text and out.stats.store_disk_hits == out.stats.n_chunks


def test_workers_run_this_checkout_with_the_drivers_model(ray_engines):
    ours, _ = ray_engines("llama")
    infos = ray.get([ours.worker_handle(name).describe.remote() for name in ours.workers])
    assert {info["package"] for info in infos} == {parallelcomp.__file__}
    assert {info["identity"] for info in infos} == {ours._model_identity()[1]}
    assert {info["threads"] for info in infos} == {1}
    with pytest.raises(DistributedError, match=re.escape(f"no worker 'worker-9' in use; the workers are {ours.workers}")):
        ours.worker_handle("worker-9")


def test_workers_attend_as_the_driver_decided_and_a_mismatch_names_what_differs(local_ray, model_dir, monkeypatch):
    """"auto" attention can fall back to "matmul" or "fused" by a rate each process measures
    (hardware.matmul_attention); a busy machine with an empty cache once tipped a worker the other
    way than the driver, and from_pretrained failed. Here the driver's measurement says the
    opposite of the workers' own: they attend as the driver does. A worker whose model identity
    differs all the same is refused with the fields that differ."""
    from parallelcomp import hardware
    from parallelcomp.distributed import RayParallelComp

    real = hardware.matmul_attention
    monkeypatch.setattr(hardware, "matmul_attention", lambda device, dtype: not real(device, dtype))
    with RayParallelComp.from_pretrained(model_dir, num_workers=2, worker_threads=1, dtype="float32") as pc:
        assert pc.attention_kernel == "matmul"  # fp32: the workers' own measurement says "fused"
        infos = ray.get([pc.worker_handle(name).describe.remote() for name in pc.workers])
        assert [info["fields"]["attn_implementation"] for info in infos] == ["matmul", "matmul"]
        fields, _ = pc._model_identity()
        pc._identity = ({**fields, "dtype": "torch.bfloat16"}, "another digest")
        with pytest.raises(ConfigError, match=r"worker-\d loaded the model with another dtype than this process "
                                              r"\(dtype 'torch.float32' there, 'torch.bfloat16' here\)"):
            pc._check_workers()


@needs_kernel
def test_a_bf16_worker_runs_its_calls_on_the_layer_kernels(saved_models, monkeypatch):
    """A worker (the class a Ray actor wraps, here in this process) holds the layer kernels around
    `fill` (phase 1) and `score` (phase 2 over its stored chunks), as the driver's engine does around
    a run, and leaves no module patched after either."""
    from parallelcomp.distributed.worker import ChunkWorker

    calls = []
    for name in ("rms_norm", "silu_mul"):
        real = getattr(layer_kernel, name)
        monkeypatch.setattr(layer_kernel, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    config = ParallelCompConfig(**BASE)
    worker = ChunkWorker(str(saved_models("llama")), config, "cpu", "bfloat16", 1)
    engine = worker.engine
    parts = engine.prompt_parts(QUESTIONS[0], with_documents=True)
    corpus = engine._chunk(DOCS, parts.prefix_ids)
    chunks, keys = list(corpus.chunks), dict(zip((c.index for c in corpus.chunks), corpus.keys))
    assert engine.layer_kernel == layer_kernel.NAME and not calls
    _, held = worker.fill(config, parts.prefix_ids, chunks, keys)
    assert held > 0 and {"rms_norm", "silu_mul"} <= set(calls)
    calls.clear()
    shard = worker.score("call", config, parts, chunks, keys, dict.fromkeys(keys, 0.0))
    assert shard.report.reused_chunks == len(chunks) and {"rms_norm", "silu_mul"} <= set(calls)
    assert not any("forward" in vars(m) for m in engine.model.modules())


@needs_attention_kernel
def test_a_worker_on_the_amx_kernel_keeps_tiles_and_sends_kept_chunks_untiled(tmp_path, tokenizer, monkeypatch):
    """A worker whose phase 2 runs on the AMX kernel keeps its chunks tiled, as a single-process
    engine does (docs/store.md, "Chunks kept in the kernel's layout"), and sends the driver its
    kept chunks in the model's layout: the same arrays, bit for bit, as a worker that keeps that
    layout, with the same scores."""
    from parallelcomp.distributed.worker import ChunkWorker

    path = tmp_path / "wide-llama"
    tiny_model("llama", len(tokenizer), head_dim=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = ParallelCompConfig(**BASE)
    sent, scores = {}, {}
    for tiles in (True, False):
        with monkeypatch.context() as patch:
            if not tiles:
                patch.setattr(engine_module, "_keeps_tiles", lambda *args: False)
            worker = ChunkWorker(str(path), config, "cpu", "bfloat16", 1)
        engine = worker.engine
        parts = engine.prompt_parts(QUESTIONS[0], with_documents=True)
        corpus = engine._chunk(DOCS, parts.prefix_ids)
        chunks, keys = list(corpus.chunks), dict(zip((c.index for c in corpus.chunks), corpus.keys))
        worker.fill(config, parts.prefix_ids, chunks, keys)
        assert engine.tiles == tiles
        assert all(isinstance(layer, kvops.Tiled) == tiles for entry in engine.store._lru.values() for layer in entry.kv)
        shard = worker.score("call", config, parts, chunks, keys, dict.fromkeys(keys, 0.0))
        scores[tiles] = shard.scores
        sent[tiles] = worker.take("call", sorted(worker._kept["call"]))
    assert scores[True] == scores[False] and sent[True] and sent[True].keys() == sent[False].keys()
    tokens = {c.index: len(c.token_ids) for c in chunks}
    for i, arrays in sent[True].items():
        assert arrays[0].shape[-2] == tokens[i]  # the chunk's own tokens, not whole blocks of 64
        assert len(arrays) == len(sent[False][i]) and all((a == b).all() for a, b in zip(arrays, sent[False][i]))


def test_workers_lost_one_by_one(local_ray, saved_models, monkeypatch):
    """Three workers: one dies after it scored, before the driver pulls its kept KV; one is
    killed between questions; the last does not answer in time. The first two cost nothing but
    time (their chunks are scored again on a survivor, the answer is unchanged); the third is a
    DistributedError, and so is every call after it."""
    path = saved_models("llama")
    config = ParallelCompConfig(**BASE)
    ref = ParallelComp.from_pretrained(path, config, dtype="float32", threads=1)
    want = [ref.generate(q, documents=DOCS, max_new_tokens=10) for q in QUESTIONS]
    take, killed = RayParallelComp._take, []

    def take_after_a_kill(self, call, owners, indices, pulled, spread):
        if not killed:
            killed.append(owners[indices[0]])
            kill(self.worker_handle(killed[0]))
        return take(self, call, owners, indices, pulled, spread)

    with RayParallelComp.from_pretrained(path, config, num_workers=3, dtype="float32", threads=1) as ours:
        corpus = ours.encode(DOCS)
        with monkeypatch.context() as patch:
            patch.setattr(RayParallelComp, "_take", take_after_a_kill)
            out = ours.generate(QUESTIONS[0], corpus=corpus, max_new_tokens=10)
        assert_same(out, want[0])
        s = out.stats
        assert s.failed_workers == killed and s.reassigned_chunks == s.encoded_chunks > 0
        assert killed[0] not in s.worker_chunks and s.workers == 2 and len(ours.workers) == 2

        owned = ours.generate(QUESTIONS[1], corpus=corpus, max_new_tokens=4).stats.worker_chunks
        victim, survivor = sorted(owned)
        kill(ours.worker_handle(victim))  # between questions: its chunks' KV is gone with it
        out = ours.generate(QUESTIONS[1], corpus=corpus, max_new_tokens=10)
        assert_same(out, want[1])
        s = out.stats
        assert s.failed_workers == [victim] and s.reassigned_chunks == s.encoded_chunks == owned[victim]
        assert s.worker_chunks == {survivor: len(DOCS)} and ours.workers == [survivor]

        ours.timeout_s = 1e-6  # no call can answer that fast: the survivor counts as hung
        with pytest.raises(DistributedError, match="did not answer within timeout_s"):
            ours.generate(QUESTIONS[0], corpus=corpus, max_new_tokens=10)
        assert ours.workers == []
        with pytest.raises(DistributedError, match="no Ray worker is left"):
            ours.generate(QUESTIONS[0], corpus=corpus, max_new_tokens=10)


def test_an_engine_can_start_right_after_another_closed_on_the_same_cpus(local_ray, model_dir):
    """close() returns once Ray counts the workers' CPUs free; before, an engine started right
    after found 0 CPU free and raised (a reader met it running the README's examples)."""
    free = int(ray.available_resources()["CPU"])
    threads = min(2, free, os.cpu_count())  # a worker runs at most this machine's CPUs in threads
    held = dict(num_workers=free // threads, worker_threads=threads)  # every free CPU, or all but one
    with RayParallelComp.from_pretrained(model_dir, **held) as pc:
        pc.generate("Where?", documents=["The river runs north."], max_new_tokens=2)
    again = RayParallelComp.from_pretrained(model_dir, **held)
    again.close()
    with pytest.raises(DistributedError, match=r"this engine was closed \(close\(\), or the end of its with block\)"):
        again.generate("Where?", documents=["The river runs north."], max_new_tokens=2)
    assert int(ray.available_resources()["CPU"]) == free


def test_too_few_free_cpus_is_an_error_not_a_wait(local_ray, model_dir):
    with pytest.raises(DistributedError, match="need 9 CPU but the Ray cluster has"):
        RayParallelComp.from_pretrained(model_dir, num_workers=9)


def test_ray_missing_is_a_typed_error_naming_the_extra(monkeypatch, model_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(DistributedError, match=r'pip install "parallelcomp\[ray\]"'):
        RayParallelComp.from_pretrained(model_dir, num_workers=2)


@pytest.mark.parametrize("kwargs", [dict(num_workers=0), dict(num_workers=1.5), dict(worker_threads=0),
                                    dict(timeout_s=0), dict(timeout_s=float("inf")), dict(timeout_s=1e300),
                                    dict(threads=-1)])
def test_bad_settings_are_config_errors(kwargs, model_dir):
    with pytest.raises(ConfigError):
        RayParallelComp.from_pretrained(model_dir, **kwargs)


def test_an_address_where_no_cluster_answers_is_a_config_error_at_once(model_dir, monkeypatch):
    """Ray retries such an address for minutes; we give up after one refused connection."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # this process may have joined this suite's cluster
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init reached"))
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            with pytest.raises(ConfigError, match="no Ray cluster answers at"):
                RayParallelComp.from_pretrained(model_dir, address=address)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # Ray reads it for None and "auto"
        for address in (None, "auto"):
            with pytest.raises(ConfigError, match="RAY_ADDRESS"):
                RayParallelComp.from_pretrained(model_dir, address=address)
    for address in (5, "head", "head:port", "head:0", ":6379"):
        with pytest.raises(ConfigError, match="address must be"):
            RayParallelComp.from_pretrained(model_dir, address=address)


def test_ray_refusing_to_join_is_a_config_error(model_dir, monkeypatch):
    """Ray's own refusal (here its message for "auto" with no cluster on the machine, raised by a
    stand-in: this suite's cluster is running) comes back typed, with Ray's reason."""
    import ray

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match="could not join the Ray cluster at address='auto': Could not find any"):
        RayParallelComp.from_pretrained(model_dir, address="auto")


def test_cli_rejects_a_bad_worker_count(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCS[0])
    assert main(["ask", "Where?", str(doc), "--model", str(model_dir), "--workers", "0"]) == 2
    assert "error: --workers must be a positive integer" in capsys.readouterr().err


def test_the_wrappers_take_a_ray_engine_unchanged(ray_engines):
    from pc_integrations.langchain import ParallelCompLLM as LangChainLLM
    from pc_integrations.llama_index import ParallelCompLLM as LlamaIndexLLM

    ours, ref = ray_engines("llama")
    got = LangChainLLM(engine=ours, max_new_tokens=8).generate([QUESTIONS[0]], documents=DOCS).generations[0][0]
    want = LangChainLLM(engine=ref, max_new_tokens=8).generate([QUESTIONS[0]], documents=DOCS).generations[0][0]
    assert got.text == want.text and got.generation_info["sources"] == want.generation_info["sources"]
    assert got.generation_info["stats"]["transfer_bytes"] > 0 == want.generation_info["stats"]["transfer_bytes"]
    got = LlamaIndexLLM(ours, max_new_tokens=8).complete(QUESTIONS[1], documents=DOCS)
    want = LlamaIndexLLM(ref, max_new_tokens=8).complete(QUESTIONS[1], documents=DOCS)
    assert got.text == want.text and got.text


def test_nothing_imports_ray_until_an_engine_is_made():
    code = "import sys, parallelcomp, parallelcomp.cli, parallelcomp.distributed; assert 'ray' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
