"""Precision and threads chosen for the machine (hardware.py): flag detection mocked both ways."""

from __future__ import annotations

import json

import pytest
import torch

from parallelcomp import ConfigError, ParallelComp, hardware
from parallelcomp.cli import main


X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert hardware.cpu_flags(X86) == {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512_bf16"}
    assert hardware.has_native_bf16(hardware.cpu_flags(ARM))
    assert not hardware.has_native_bf16(frozenset({"avx2", "fma", "avx512f"}))
    assert hardware.cpu_flags("no flags here") == frozenset()


@pytest.fixture
def measured(monkeypatch):
    """Fake matmul measurements: {dtype name: GFLOP/s}, recording every call."""
    rates, calls = {"float32": 100.0, "bfloat16": 300.0}, []

    def fake(dtype, *args, **kwargs):
        calls.append(dtype)
        return rates[str(dtype).removeprefix("torch.")]

    monkeypatch.setattr(hardware, "measure_gflops", fake)
    monkeypatch.setattr(hardware, "BUSY_SHARE", 0.0)  # instant fakes: never "busy" (tested below)
    return rates, calls


def test_no_native_bf16_means_float32_without_measuring(monkeypatch, measured, tmp_path):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert hardware.default_dtype(torch.device("cpu"), tmp_path) == torch.float32
    assert measured[1] == []


@pytest.mark.parametrize("bf16_rate, expected", [(300.0, torch.bfloat16), (50.0, torch.float32)])
def test_native_bf16_is_chosen_only_when_it_measures_faster(monkeypatch, measured, tmp_path, bf16_rate, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    measured[0]["bfloat16"] = bf16_rate
    assert hardware.default_dtype(torch.device("cpu"), tmp_path) == expected


@pytest.mark.parametrize("flags, bf16_rate, matmul_rate, device, dtype, expected", [
    ({"avx512_bf16"}, 300.0, 270.0, "cpu", torch.bfloat16, True),
    ({"avx512_bf16"}, 300.0, 100.0, "cpu", torch.bfloat16, False),  # the fused kernel measures faster (AMX)
    ({"avx512_bf16"}, 300.0, 270.0, "cpu", torch.float32, False),
    ({"avx512_bf16"}, 50.0, 270.0, "cpu", torch.bfloat16, False),  # bf16 GEMMs slower than fp32
    ({"avx2"}, 300.0, 270.0, "cpu", torch.bfloat16, False),  # emulated bf16
    ({"avx512_bf16"}, 300.0, 270.0, "cuda", torch.bfloat16, False),  # fused kernels on GPUs
])
def test_matmul_attention_only_where_bf16_matmuls_and_the_matmul_attention_measure_faster(
        monkeypatch, measured, tmp_path, flags, bf16_rate, matmul_rate, device, dtype, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "_cache_file", lambda cache_dir, name, key: tmp_path / f"{name}.json")
    monkeypatch.setattr(hardware, "measure_attention", lambda shape: {"fused": 130.0, "matmul": matmul_rate})
    measured[0]["bfloat16"] = bf16_rate
    assert hardware.matmul_attention(torch.device(device), dtype) is expected


def test_real_attention_measurement_returns_both_kernels_and_is_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "BUSY_SHARE", 0.0)  # cached even if this host is busy right now
    rates = hardware.attention_rates(tmp_path)
    assert set(rates) == {"fused", "matmul"} and all(r > 0 for r in rates.values())
    (cached,) = tmp_path.glob("attention-rates-*.json")
    assert hardware.attention_rates(tmp_path) == rates  # read back, not measured again (timings never repeat)


class FakeClocks:
    """Wall and process CPU time that only a fake measurement advances."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def perf_counter(self):
        return self.wall

    def process_time(self):
        return self.cpu


def test_a_measurement_taken_while_the_cpu_was_busy_serves_this_process_only(monkeypatch, tmp_path):
    clocks, calls, share = FakeClocks(), [], [0.4]

    def measure(shape):  # one wall second, our 2 threads on the CPU for `share` of it
        calls.append(shape)
        clocks.wall += 1.0
        clocks.cpu += 2 * share[0]
        return {"fused": 130.0, "matmul": 2.5 if share[0] < 0.5 else 270.0}  # contention hurts matmul most

    monkeypatch.setattr(hardware, "time", clocks)
    monkeypatch.setattr(hardware, "measure_attention", measure)
    monkeypatch.setattr(hardware.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(hardware, "_uncached", {})
    assert hardware.attention_rates(tmp_path)["matmul"] == 2.5
    assert hardware.attention_rates(tmp_path)["matmul"] == 2.5 and len(calls) == 1  # kept for this process
    assert list(tmp_path.iterdir()) == []  # but never written
    hardware._uncached.clear()  # the next process measures again, now on an idle machine
    share[0] = 0.95
    assert hardware.attention_rates(tmp_path)["matmul"] == 270.0 and len(calls) == 2
    (cached,) = tmp_path.glob("attention-rates-*.json")
    hardware._uncached.clear()
    assert hardware.attention_rates(tmp_path)["matmul"] == 270.0 and len(calls) == 2  # from the file


def test_cuda_keeps_bfloat16(measured):
    assert hardware.default_dtype(torch.device("cuda")) == torch.bfloat16
    assert measured[1] == []


def test_measurement_is_cached_and_a_bad_cache_file_is_never_trusted(monkeypatch, measured, tmp_path):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert hardware.matmul_rates(tmp_path) == {"float32": 100.0, "bfloat16": 300.0}
    assert len(measured[1]) == 2
    assert hardware.matmul_rates(tmp_path) == {"float32": 100.0, "bfloat16": 300.0}
    assert len(measured[1]) == 2  # served from the cache
    (cached,) = tmp_path.glob("matmul-rates-*.json")
    data = json.loads(cached.read_text())
    data["rates"]["bfloat16"] = 1e9  # tampered: the checksum no longer matches
    cached.write_text(json.dumps(data))
    assert hardware.matmul_rates(tmp_path)["bfloat16"] == 300.0
    assert len(measured[1]) == 4
    cached.write_text('{"truncated": ')
    assert hardware.matmul_rates(tmp_path)["bfloat16"] == 300.0
    assert len(measured[1]) == 6


def test_real_measurement_returns_positive_rates():
    assert hardware.measure_gflops(torch.float32, (16, 16, 16), seconds=0.001) > 0


def _topology(root, cpus):
    for cpu, (package, core) in cpus.items():
        topo = root / f"devices/system/cpu/cpu{cpu}/topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")


def test_available_cores_counts_physical_cores_in_the_affinity_mask(monkeypatch, tmp_path):
    _topology(tmp_path, {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1), 4: (1, 0), 5: (1, 0)})  # SMT pairs
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert hardware.available_cores(tmp_path) == 2
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert hardware.available_cores(tmp_path) == 3


def test_available_cores_respects_a_cgroup_quota(monkeypatch, tmp_path):
    _topology(tmp_path, {i: (0, i) for i in range(8)})
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)))
    cgroup = tmp_path / "fs/cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "cpu.max").write_text("150000 100000\n")
    assert hardware.available_cores(tmp_path) == 2
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert hardware.available_cores(tmp_path) == 8


def test_threads_are_set_unless_the_user_chose(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(hardware, "available_cores", lambda: 1)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert hardware.configure_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert hardware.configure_threads() == 2  # the user's OMP_NUM_THREADS wins
        assert hardware.configure_threads(1) == 1  # an explicit count wins over both
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, "torch.float32"])
def test_from_pretrained_dtype_override_is_reported(model_dir, dtype):
    pc = ParallelComp.from_pretrained(model_dir, dtype=dtype, threads=torch.get_num_threads())
    out = pc.generate("Where?", documents=["The river runs north."], max_new_tokens=2)
    expected = str(dtype).removeprefix("torch.")
    assert str(pc.model.dtype) == f"torch.{expected}"
    assert out.stats.dtype == expected and out.stats.threads == torch.get_num_threads()


@pytest.mark.parametrize("kwargs, match", [({"dtype": "fp8"}, "dtype must be one of float32, bfloat16, float16"),
                                           ({"dtype": 5}, "dtype must be one of"),
                                           ({"threads": 0}, "threads must be an integer from 1 to this machine"),
                                           ({"threads": True}, "threads must be an integer from 1 to this machine")])
def test_bad_dtype_or_threads_is_a_config_error(model_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ParallelComp.from_pretrained(model_dir, **kwargs)


def test_cli_dtype_flag(model_dir, tmp_path, capsys):
    doc = tmp_path / "a.txt"
    doc.write_text("The river runs north past the copper garden.")
    code = main(["ask", "--model", str(model_dir), "--dtype", "bfloat16", "--threads", str(torch.get_num_threads()),
                 "--max-new-tokens", "2", "--json", "Where does the river run?", str(doc)])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["stats"]["dtype"] == "bfloat16"


HEAP = """
import ctypes, resource, sys, psutil, torch
from parallelcomp import hardware
rss = lambda: psutil.Process().memory_info().rss
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(hardware.configure_allocator() if sys.argv[1] == "configure" else False)
torch.empty(2**21).fill_(1)  # an 8 MB block, freed at once: glibc's own mmap threshold rises past it
if sys.argv[2] == "again":  # 200 MB of 2 MB blocks freed and allocated again, as by each layer of phase 1
    # straight from malloc, the C heap torch's CPU tensors come from, with nothing else allocated
    # in between: a small allocation above the last block (a tensor's C++ objects, a growing
    # list's storage) would pin the heap's top now and then, and the control needs that top free
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    blocks = [0] * 100
    def fill():
        for i in range(100):
            blocks[i] = libc.malloc(2**21)
            ctypes.memset(blocks[i], 1, 2**21)
    fill()
    before = faults()
    for pointer in blocks:
        libc.free(pointer)
    fill()
    print(faults() - before)
else:  # the same blocks, each behind a live 64 KB one, freed: the heap cannot shrink from its top
    blocks, pins = [], []
    for _ in range(100):
        blocks.append(torch.empty(2**19).fill_(1))
        pins.append(torch.empty(2**14).fill_(1))
    before = rss()
    del blocks
    freed = rss()
    hardware.release_free_heap()
    print(before - freed, freed - rss())
"""


def _heap(allocator: str, pattern: str, **env) -> tuple[bool, list[int]]:
    """HEAP in a fresh process (which arena and thresholds a test process's earlier allocations
    left is not a test's to know): whether configure_allocator changed anything, then the numbers."""
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", HEAP, allocator, pattern], capture_output=True, text=True,
                         timeout=120, check=True, env={**os.environ, **env})
    changed, numbers = run.stdout.split("\n", 1)
    return changed == "True", [int(n) for n in numbers.split()]


needs_glibc = pytest.mark.skipif(
    hardware._libc() is None,
    reason="the allocator tuning is glibc's mallopt/malloc_trim, which this C library (macOS, Windows, musl) lacks; "
           "there configure_allocator and release_free_heap are no-ops by design")
PAGES_200MB = 200 * 2**20 // 4096


@needs_glibc
def test_freed_heap_blocks_behind_live_ones_go_back_to_the_os_when_released():
    """A heap full of freed few-MB blocks, each behind a live small one (a store that evicted
    chunks between runs), stays resident until release_free_heap returns it."""
    _, (on_free, on_release) = _heap("default", "pinned")
    assert on_free < 20 * 2**20 and on_release > 150 * 2**20


@needs_glibc
def test_the_configured_allocator_reuses_freed_blocks_without_faulting_them_in_again():
    """glibc alone gives 200 MB freed at the heap's top back to the OS at once, so allocating them
    again faults every page in afresh; configured, the pages stay for reuse. MALLOC_*_ set by the
    user wins."""
    changed, (faults,) = _heap("default", "again")
    assert not changed and faults > 0.8 * PAGES_200MB
    changed, (faults,) = _heap("configure", "again")
    assert changed and faults < 0.05 * PAGES_200MB
    changed, (faults,) = _heap("configure", "again", MALLOC_TOP_PAD_="131072")
    assert not changed and faults > 0.8 * PAGES_200MB


def test_a_run_releases_the_freed_heap_unless_it_left_the_memory_tier_as_it_was(monkeypatch, make_engine):
    """Every run ends by giving the freed heap back, except a question that encoded nothing and
    left the memory tier's chunks as they were (its question heads may replace the last
    question's, or join them): its transients are the next question's."""
    released = []
    monkeypatch.setattr(hardware, "release_free_heap", lambda: released.append(1))
    pc = make_engine("llama")
    docs = ["Paris is the capital of France. " * 8, "Berlin is the capital of Germany. " * 8]
    corpus = pc.encode(docs)
    assert len(released) == 1
    out = pc.generate("What is the capital of France?", corpus=corpus, max_new_tokens=3)
    assert out.stats.encoded_chunks == 0 and out.stats.reused_head_tokens == 0  # its question heads were stored
    assert len(released) == 1
    pc.score("Paris is the capital.", documents=docs)
    assert len(released) == 2
    held = pc.store.chunk_bytes
    out = pc.generate("And of Germany?", documents=docs, max_new_tokens=3)  # its heads replace the last question's
    assert out.stats.encoded_chunks == 0 and out.stats.reused_head_tokens > 0 and pc.store.chunk_bytes == held
    list(pc.stream("And of Italy?", documents=docs, max_new_tokens=3))
    assert len(released) == 2  # two questions over the tier's chunks as they were: no release
    pc.generate("And of Spain?", documents=docs + ["Madrid is the capital of Spain. " * 8], max_new_tokens=3)
    assert len(released) == 3  # a new chunk encoded and stored
    small = make_engine("llama", kv_store_bytes=1)  # nothing fits the memory tier: every question encodes
    small.generate("What is the capital of France?", documents=docs, max_new_tokens=3)
    small.generate("What is the capital of France?", documents=docs, max_new_tokens=3)
    assert len(released) == 5
