"""`RayParallelComp`: the `ParallelComp` API with the two stages that touch every chunk
(`fill_store`, `score_chunks`) run on Ray actors (worker.py), each over the chunks it owns
(placement.py). The driver keeps its own model replica: it chunks, encodes the shared prefix, picks
the global top-K, merges the kept KV it pulls from the workers (transfer.py), runs the question
step with calibration, and decodes, exactly as one process does (engine.py).

Faults: every wait is bounded by `timeout_s`. A worker that dies (its actor is gone) is dropped for
the rest of the engine's life and its chunks are scored again on the next worker in rendezvous
order; a worker that does not answer in time is stopped and the call fails with a
DistributedError. With no worker left, calls fail with a DistributedError.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch

import parallelcomp

from .. import hardware, lexical
from ..chunking import Chunk
from ..config import ParallelCompConfig
from ..engine import ParallelComp, Scored, _check_config, _check_device, _check_dtype, _check_threads, _resolve_model
from ..errors import ConfigError, DistributedError
from ..eviction import TopK
from ..kv import LayerKV
from ..output import ReuseStats, SpreadStats
from ..prompts import PromptParts
from . import placement, transfer
from .worker import ChunkWorker, Shard

DEFAULT_TIMEOUT_S = 1800.0
MAX_TIMEOUT_S = 7 * 24 * 3600
"""A week: Ray's waits take the timeout as a C integer of milliseconds (inf overflowed it)."""
CONNECT_TIMEOUT_S = 10.0
"""How long a cluster address may take to accept a TCP connection before from_pretrained gives up;
Ray itself retries an address where nothing listens for minutes (over 5 here, with no error)."""
CLOSE_WAIT_S = 10.0
"""The longest `close` waits for Ray to count the stopped workers' resources free (about a second
on a local Ray here)."""


class _Lost:
    """The result of a call whose worker died."""

    def __init__(self, error: Exception):
        self.error = error


def _ray():
    try:
        import ray
    except ImportError as err:
        msg = 'parallelcomp.distributed needs Ray: pip install "parallelcomp[ray]"'
        raise DistributedError(msg) from err
    return ray


class RayParallelComp(ParallelComp):
    """A `ParallelComp` whose chunks are encoded and scored on Ray workers (docs/distributed.md)."""

    def __init__(self, model, tokenizer, config: ParallelCompConfig | None, workers: dict, timeout_s: float,
                 per_worker: dict[str, float] | None = None):
        """`workers`: name → handle of a `ray.remote(ChunkWorker)` actor that loaded the same model;
        `per_worker`: the Ray resources each one holds ({"CPU": 1}), which `close` waits to see
        freed. Use `from_pretrained`, which starts them."""
        super().__init__(model, tokenizer, config)
        self.timeout_s = _check_timeout(timeout_s)
        self._workers = dict(workers)
        self._per_worker = dict(per_worker or {})
        self._closed = False
        self._check_workers()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        config: ParallelCompConfig | None = None,
        num_workers: int = 2,
        address: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        threads: int | None = None,
        worker_threads: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RayParallelComp:
        """Load the model in this process (the driver) and in `num_workers` Ray actors.

        model, config, device, dtype, threads: as `ParallelComp.from_pretrained` (threads: the
        driver's). The model path must exist on every node that runs a worker.
        address: a Ray cluster ("auto", "head:6379"; Ray Client's "ray://head:10001" is passed on
        untested); None with no Ray running in this process starts a local one (Ray reads
        RAY_ADDRESS for None and "auto"). An address where nothing answers within
        CONNECT_TIMEOUT_S is a ConfigError. Each worker reserves `worker_threads` CPUs and runs
        that many torch threads, plus one GPU when the device is CUDA.
        timeout_s: the longest any one worker call may take before the run fails (loading included).
        config.kv_store_bytes None: a third of this machine's RAM, shared among the workers.
        """
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ConfigError(f"num_workers must be a positive integer, got {num_workers!r}")
        if not isinstance(worker_threads, int) or isinstance(worker_threads, bool) or worker_threads < 1:
            raise ConfigError(f"worker_threads must be a positive integer, got {worker_threads!r}")
        timeout_s = _check_timeout(timeout_s)
        _check_threads(threads)
        _check_address(address, connect=False)
        ray = _ray()
        config = _check_config(config)
        path = _resolve_model(model)
        device = _check_device(device)
        dtype = _check_dtype(dtype) or hardware.default_dtype(device)
        if not ray.is_initialized():  # else Ray ignores the address: this process joined a cluster already
            joining = (os.environ.get("RAY_ADDRESS") or address) if address in (None, "auto") else address
            _check_address(joining, connect=True)  # Ray takes RAY_ADDRESS in place of None and "auto"
            try:
                ray.init(address=address, runtime_env=_runtime_env(), log_to_driver=False,
                         **({} if address else {"include_dashboard": False}))
            except (ConnectionError, ValueError) as err:  # no cluster at "auto"; Ray Client not installed
                raise ConfigError(f"could not join the Ray cluster at address={address!r}: {err}") from err
        per_worker = {"CPU": worker_threads, **({"GPU": 1} if device.type == "cuda" else {})}
        _check_resources(ray, num_workers, per_worker)
        driver = ParallelComp.from_pretrained(path, config, device, dtype, threads)
        # Every replica attends as the driver does: "auto" can fall back to "matmul" or "fused" by
        # a rate each process measures (hardware.matmul_attention), which a busy machine with an
        # empty cache can tip either way in different processes, and the KV would not match.
        worker_config = config.replace(attention_kernel=_as_setting(driver.attention_kernel))
        if config.kv_store_bytes is None:
            worker_config = worker_config.replace(kv_store_bytes=psutil.virtual_memory().total // 3 // num_workers)
        actor = ray.remote(ChunkWorker).options(
            num_cpus=worker_threads, num_gpus=1 if device.type == "cuda" else 0, max_restarts=0
        )
        dtype_name = str(dtype).removeprefix("torch.")
        workers = {f"worker-{i}": actor.remote(path, worker_config, device.type, dtype_name, worker_threads)
                   for i in range(num_workers)}
        try:
            return cls(driver.model, driver.tokenizer, config, workers, timeout_s, per_worker)
        except BaseException:
            for handle in workers.values():
                ray.kill(handle)
            raise

    # ------------------------------------------------------------------ workers

    @property
    def workers(self) -> list[str]:
        """Names of the workers still in use."""
        return list(self._workers)

    def worker_handle(self, name: str):
        """The Ray actor handle of a worker (for monitoring, or to stop it in a test)."""
        if name not in self._workers:
            raise DistributedError(f"no worker {name!r} in use; the workers are {self.workers}")
        return self._workers[name]

    def close(self) -> None:
        """Stop every worker (their stores go with them); the engine cannot run afterwards.

        Returns once Ray counts the workers' CPUs (and GPUs) free again, or after CLOSE_WAIT_S:
        Ray frees an actor's resources a moment after `ray.kill` returns, and an engine started
        right after found none free."""
        ray = _ray()
        freed = {kind: n * len(self._workers) for kind, n in self._per_worker.items()}
        before = ray.available_resources()
        for handle in self._workers.values():
            ray.kill(handle)
        self._workers.clear()
        self._closed = True
        deadline = time.monotonic() + CLOSE_WAIT_S
        while any(ray.available_resources().get(kind, 0) < before.get(kind, 0) + n for kind, n in freed.items()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)

    def __enter__(self) -> RayParallelComp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_workers(self) -> None:
        """Every worker loaded the same model identity as the driver (store.model_identity), so
        the KV it sends is exactly what the driver's model would have computed."""
        mine, digest = self._model_identity()
        calls = {handle.describe.remote(): (name, []) for name, handle in self._workers.items()}
        errors = []
        for (name, _), info in self._gather(calls, SpreadStats()):
            if isinstance(info, _Lost):
                errors.append(f"{name}: {info.error}")
            elif info["identity"] != digest:
                theirs = info["fields"]
                differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
                what = "; ".join(f"{k} {str(theirs.get(k))[:60]!r} there, {str(mine.get(k))[:60]!r} here"
                                 for k in differ)
                raise ConfigError(f"{name} loaded the model with another {', '.join(differ)} than this process "
                                  f"({what}); give from_pretrained an explicit device= and dtype=, and the same "
                                  "model files on every node")
        if errors:
            raise DistributedError("a worker could not load the model: " + "; ".join(errors))

    # ------------------------------------------------------------------ the two distributed stages

    def fill_store(self, chunks: list[Chunk], keys: dict[int, str], prefix_ids: list[int], report: ReuseStats,
                   bar=None) -> int:
        """Phase 1 of each chunk on the worker that owns it, into that worker's store."""
        by_index = {c.index: c for c in chunks}

        def fill(name: str, indices: list[int]):
            shard_keys = {i: keys[i] for i in indices}
            return self._workers[name].fill.remote(self.config, prefix_ids, [by_index[i] for i in indices], shard_keys)

        held = 0
        for _, (shard_report, shard_held) in self._scatter(keys, fill, SpreadStats(), bar):
            report.add(shard_report)
            held += shard_held
        return held

    def score_chunks(self, parts: PromptParts, chunks: list[Chunk], keys: dict[int, str], prefix: list[LayerKV],
                     report: ReuseStats, matches: dict[int, float], bar=None) -> Scored:
        """Phases 1-2 and the local top-K on each worker; the global top-K here; then only the
        kept chunks' KV moves. A worker lost at either step has its chunks scored again elsewhere."""
        if not chunks:  # a plain chat turn: nothing to spread
            return super().score_chunks(parts, chunks, keys, prefix, report, matches, bar)
        by_index = {c.index: c for c in chunks}
        call = uuid.uuid4().hex

        def score(name: str, indices: list[int]):
            shard_keys = {i: keys[i] for i in indices}
            return self._workers[name].score.remote(call, self.config, parts, [by_index[i] for i in indices],
                                                    shard_keys, {i: matches[i] for i in indices})

        spread = SpreadStats()
        shards: list[tuple[str, Shard]] = []
        pulled: dict[int, list] = {}  # chunk index → its kept KV, as arrays
        todo = keys
        try:
            while True:
                shards += self._scatter(todo, score, spread, bar)
                top = TopK[int](self.config.keep_chunks)  # ties to the earlier chunk, as in one process
                owners = {i: name for name, shard in shards for i in shard.scores}
                for _, shard in shards:
                    for index, nll in shard.scores.items():
                        top.offer(lexical.rank(nll, matches[index], self.config.lexical_weight), index, index)
                kept = top.kept()
                lost = self._take(call, owners, [i for i in kept if i not in pulled], pulled, spread)
                if not lost:
                    break
                todo = {i: keys[i] for i, name in owners.items() if name in lost}
                shards = [(name, shard) for name, shard in shards if name not in lost]
                spread.reassigned_chunks += len(todo)
        finally:
            for handle in self._workers.values():
                handle.release.remote(call)  # no wait: frees the candidates the driver did not take
        latest: dict[str, int] = {}
        for name, shard in shards:
            report.add(shard.report)
            spread.worker_chunks[name] = spread.worker_chunks.get(name, 0) + len(shard.scores)
            spread.worker_seconds[name] = spread.worker_seconds.get(name, 0.0) + shard.seconds
            latest[name] = shard.store_bytes
        spread.workers = len(latest)
        scores = {i: s for _, shard in shards for i, s in shard.scores.items()}
        raw_bytes = {i: n for _, shard in shards for i, n in shard.raw_bytes.items()}
        kept_kv = [(by_index[i], transfer.unpack(pulled[i], self.model.dtype, self.model.device)) for i in kept]
        return Scored(scores, raw_bytes, kept_kv, sum(latest.values()), spread)

    def write_behind(self, stats) -> None:
        """Every worker writes the chunks it encoded to its disk tier, now that the answer is
        complete (ParallelComp.write_behind); what they did counts in `stats`. A worker that does not
        answer costs a warning here, not the finished answer. The driver writes the documents it
        tokenized (its own store holds no chunk)."""
        super().write_behind(stats)
        calls = {handle.flush.remote(): (name, []) for name, handle in self._workers.items()}
        try:
            for _, report in self._gather(calls, stats):
                if not isinstance(report, _Lost):
                    stats.add(report)
        except DistributedError as err:
            warnings.warn(f"KV store: {err}; the workers' disk tiers may lack this call's chunks", stacklevel=2)

    def _take(self, call: str, owners: dict[int, str], indices: list[int], pulled: dict[int, list],
              spread: SpreadStats) -> set[str]:
        """Pull these kept chunks' KV from their owners into `pulled`; return the owners lost."""
        wanted: dict[str, list[int]] = {}
        for index in indices:
            wanted.setdefault(owners[index], []).append(index)
        lost = set(wanted) - set(self._workers)
        calls = {self._workers[name].take.remote(call, chunk_ids): (name, chunk_ids)
                 for name, chunk_ids in wanted.items() if name not in lost}
        for (name, _), arrays in self._gather(calls, spread):
            if isinstance(arrays, _Lost):
                lost.add(name)
                continue
            pulled.update(arrays)
            spread.transfer_bytes += sum(transfer.n_bytes(a) for a in arrays.values())
        return lost

    # ------------------------------------------------------------------ scatter, gather, failover

    def _scatter(self, keys: dict[int, str], call: Callable, spread: SpreadStats, bar) -> list[tuple[str, object]]:
        """Run `call(worker, indices)` on every worker for the chunks it owns. A lost worker's
        chunks go to the next worker in rendezvous order until every chunk is done."""
        results = []
        while keys:
            if self._closed:
                raise DistributedError("this engine was closed (close(), or the end of its with block); make a new "
                                       "RayParallelComp")
            if not self._workers:
                raise DistributedError(f"no Ray worker is left (lost: {', '.join(spread.failed_workers)}); "
                                       "make a new RayParallelComp")
            plan = placement.assign(keys, list(self._workers))
            calls = {call(name, indices): (name, indices) for name, indices in plan.items()}
            redo: dict[int, str] = {}
            for (name, indices), result in self._gather(calls, spread):
                if isinstance(result, _Lost):
                    redo.update({i: keys[i] for i in indices})
                    continue
                results.append((name, result))
                if bar is not None:
                    bar.update(len(indices))
            spread.reassigned_chunks += len(redo)
            keys = redo
        return results

    def _gather(self, calls: dict, spread: SpreadStats) -> Iterator[tuple[tuple[str, list[int]], object]]:
        """(call's tag, its result, or _Lost when its worker died) as each call finishes. A worker
        that does not answer within timeout_s is stopped and a DistributedError raised."""
        ray = _ray()
        deadline = time.monotonic() + self.timeout_s
        pending = list(calls)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted({calls[ref][0] for ref in pending})
                for name in late:
                    ray.kill(self._workers.pop(name))
                    spread.failed_workers.append(name)
                msg = (f"{', '.join(late)} did not answer within timeout_s={self.timeout_s:g} s and "
                       f"{'were' if len(late) > 1 else 'was'} stopped; raise timeout_s for long corpora on slow "
                       "workers, or check the cluster with `ray status`")
                raise DistributedError(msg)
            ref = ready[0]
            name = calls[ref][0]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if name in self._workers:
                    del self._workers[name]
                    spread.failed_workers.append(name)
                result = _Lost(err)
            yield calls[ref], result


def _check_resources(ray, num_workers: int, per_worker: dict[str, float]) -> None:
    """A DistributedError now, rather than workers that wait for resources until timeout_s."""
    free = ray.available_resources()
    need = {kind: num_workers * n for kind, n in per_worker.items()}
    worker_threads = per_worker["CPU"]
    short = {kind: n for kind, n in need.items() if free.get(kind, 0) < n}
    if short:
        have = ", ".join(f"{free.get(kind, 0):g} {kind}" for kind in short)
        want = ", ".join(f"{n} {kind}" for kind, n in short.items())
        msg = (f"{num_workers} workers of {worker_threads} thread(s) need {want} but the Ray cluster has {have} "
               "free; lower num_workers or worker_threads, stop other engines (close()), or add nodes")
        raise DistributedError(msg)


def _check_timeout(timeout_s) -> float:
    if isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and 0 < timeout_s <= MAX_TIMEOUT_S:
        return float(timeout_s)
    raise ConfigError(f"timeout_s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:,}, got {timeout_s!r}")


def _as_setting(kernel: str) -> str:
    """The ParallelCompConfig.attention_kernel that makes another replica attend as an engine
    whose `attention_kernel` is `kernel`: the kernel's own name, "fused" for torch's sdpa and for
    a model's own backend (which every setting but the kernels' keeps)."""
    return kernel if kernel in ("matmul", "amx", "avx512") else "fused"


def _check_address(address, connect: bool) -> None:
    """A ConfigError unless `address` is None, "auto", "local", or a host:port (optionally
    scheme://host:port, as Ray Client's ray://); with `connect`, one that accepts a TCP connection
    within CONNECT_TIMEOUT_S."""
    if address is None or address in ("auto", "local"):
        return
    usage = "address must be None (a local cluster), 'auto', 'host:port' or 'ray://host:port'"
    if not isinstance(address, str):
        raise ConfigError(f"{usage}, got {type(address).__name__}")
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{usage}, got {address!r}")
    if not connect:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        msg = (f"no Ray cluster answers at {address!r} ({err.strerror or err}); start one there (`ray start "
               "--head`), fix the address (or RAY_ADDRESS), or pass address=None for a local cluster")
        raise ConfigError(msg) from None


def _runtime_env() -> dict:
    """Workers import parallelcomp from where this process did (a source checkout included)."""
    root = str(Path(parallelcomp.__file__).resolve().parent.parent)
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
