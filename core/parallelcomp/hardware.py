"""Precision and threads chosen for the machine the model runs on (docs/hardware.md).

* dtype: CUDA → bfloat16. CPU → bfloat16 only where the processor has native bf16 arithmetic
  (the `avx512_bf16` or `amx_bf16` flag on x86, `bf16` on Arm) *and* a small matmul measures
  faster in bf16 than in fp32; else float32. Without native support torch emulates bf16 and a
  matmul runs 20-90x slower than fp32 (measured on an AVX2-only EPYC, docs/hardware.md), so the
  flag check comes first and the measurement confirms it. The measurement runs once per machine
  and torch version and is cached as a small JSON file whose checksum is verified on read; one
  taken while other work held the CPU is used by this process only and taken again next time.
* attention: on such a CPU a bf16 model's attention runs as matmuls (`matmul_attention`).
* threads: torch's intra-op threads = the physical cores this process may run on (its CPU
  affinity mask, counted per physical core, capped by a cgroup CPU quota), unless the caller or
  OMP_NUM_THREADS says otherwise.
* memory: glibc keeps freed blocks for reuse during a run (`configure_allocator`) and gives its
  free pages back to the OS when the run ends (`release_free_heap`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
_PROBE = (256, 576, 1536)  # m, k, n: a SmolLM2-sized MLP matmul; ~0.45 GFLOP, < 1 s even emulated
_ATTENTION_PROBE = (1, 9, 3, 2048, 64)  # rows, query heads, KV heads, tokens, head dim: one SmolLM2 chunk; ~0.1 s
BUSY_SHARE = 0.75  # a measurement whose threads got less of their CPUs than this is not cached (docs/hardware.md)

_log = logging.getLogger(__name__)
_uncached: dict[Path, dict[str, float]] = {}  # measured on a busy machine: this process's answer only


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on Arm)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def default_dtype(device: torch.device, cache_dir: Path | None = None) -> torch.dtype:
    """bfloat16 on CUDA; on CPU bfloat16 only when native and measured faster, else float32."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type != "cpu" or not has_native_bf16():
        return torch.float32
    rates = matmul_rates(cache_dir)
    return torch.bfloat16 if rates["bfloat16"] > rates["float32"] else torch.float32


def matmul_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a bf16 model's attention should run as matmuls (`attention._causal_matmul`)
    rather than torch's fused kernel: on a CPU whose native bf16 GEMMs beat fp32
    (`default_dtype`'s test) and where the matmul attention measures faster than the fused one.
    On AVX-512 BF16 without AMX the fused CPU kernel runs no faster in bf16 than in fp32 and the
    matmuls about twice its rate (docs/hardware.md); where the fused kernel has a native bf16
    path (e.g. AMX) the measurement keeps it."""
    if device.type != "cpu" or dtype != torch.bfloat16 or default_dtype(device) != torch.bfloat16:
        return False
    rates = attention_rates()
    return rates["matmul"] > rates["fused"]


def matmul_rates(cache_dir: Path | None = None) -> dict[str, float]:
    """GFLOP/s of the probe matmul in float32 and bfloat16 on this CPU, measured once and cached."""
    return _measured("matmul-rates", ("float32", "bfloat16"), {"probe": list(_PROBE)}, cache_dir,
                     lambda: {name: measure_gflops(getattr(torch, name)) for name in ("float32", "bfloat16")})


def attention_rates(cache_dir: Path | None = None) -> dict[str, float]:
    """GFLOP/s of causal bf16 attention over one 2,048-token chunk with SmolLM2's heads on the
    fused kernel and on the matmul one (the choice `matmul_attention` makes), measured once and
    cached like `matmul_rates`."""
    names = ("fused", "matmul")
    return _measured("attention-rates", names, {"probe": list(_ATTENTION_PROBE)}, cache_dir,
                     lambda: {n: r for n, r in measure_attention(_ATTENTION_PROBE).items() if n in names})


def measure_attention(shape: tuple[int, int, int, int, int] = _ATTENTION_PROBE, dtype: torch.dtype = torch.bfloat16,
                      repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` GFLOP/s of causal attention, shape (rows, query heads, KV heads,
    tokens, head dim), in `dtype`, on torch's fused SDPA ("fused"), on
    `attention._causal_matmul` ("matmul") and, where it takes the shape, on the C kernel
    (attention_kernel.py, "amx" or "avx512"); causal FLOPs are half of 4·rows·heads·tokens²·dim."""
    from . import attention_kernel
    from .attention import _causal_matmul

    b, h, h_kv, t, d = shape
    q = torch.randn(b, h, t, d, dtype=dtype)
    k, v = (torch.randn(b, h_kv, t, d, dtype=dtype) for _ in range(2))
    kernels = {"fused": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                 enable_gqa=True),
               "matmul": lambda: _causal_matmul(q, k, v, None)}
    if attention_kernel.takes(q, k, v):
        kernels[attention_kernel.name()] = lambda: attention_kernel.attend(q, k, v, causal=True)
    best = dict.fromkeys(kernels, math.inf)
    for attend in kernels.values():
        attend()  # warm-up
    for _ in range(repeats):  # interleaved, so that a burst of other work hits both kernels alike
        for name, attend in kernels.items():
            start = time.perf_counter()
            attend()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 2 * b * h * t * t * d / seconds / 1e9 for name, seconds in best.items()}


def measure_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = _PROBE, seconds: float = 0.2,
                   device: torch.device | str = "cpu") -> float:
    """Best-of-a-few GFLOP/s of an (m×k)·(k×n) matmul in `dtype` on `device`. On a GPU each timing
    spans 50 products between synchronisations, so launch latency is not what is measured."""
    m, k, n = shape
    device = torch.device(device)
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    repeats, sync = (50, torch.cuda.synchronize) if device.type == "cuda" else (1, lambda: None)
    a @ b  # warm-up (kernel selection, first-touch)
    sync()
    best, spent = math.inf, 0.0
    while spent < seconds or best == math.inf:
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync()
        elapsed = (time.perf_counter() - start) / repeats
        best, spent = min(best, elapsed), spent + elapsed * repeats
    return 2 * m * k * n / best / 1e9


def available_cores(sys_root: Path = Path("/sys")) -> int:
    """Physical cores this process may use: affinity mask → distinct cores, capped by cgroup quota."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = sys_root / f"devices/system/cpu/cpu{cpu}/topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("?", str(cpu)))  # no topology (containers, macOS): count logical CPUs
    return max(1, min(len(cores), _cgroup_quota(sys_root) or len(cores)))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (None: OMP_NUM_THREADS if set, else `available_cores()`)."""
    if threads is None:
        threads = None if os.environ.get("OMP_NUM_THREADS") else available_cores()
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for its own moving threshold (malloc.c)
TRIM_THRESHOLD = 2**31 - 1  # the largest mallopt takes: the heap's top is never trimmed on free
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def configure_allocator() -> bool:
    """Keep the C heap's freed blocks for reuse while a run lasts (glibc only; `from_pretrained`
    calls it, like `configure_threads`): blocks up to 32 MB come from the heap, and freeing never
    trims the heap's top; `release_free_heap` gives the free pages back when each run ends. Not
    when the user set glibc's malloc tunables (MALLOC_*_ variables or glibc.malloc in
    GLIBC_TUNABLES). Returns whether it changed the allocator.

    By default glibc hands a block above its mmap threshold to the OS on free, and trims the heap's
    top once it holds more than twice that threshold free. Phase 1 frees a micro-batch's
    activations, tens of MB, at every layer and allocates them again at the next, so each layer
    faulted them in afresh (measured in docs/store.md, "Memory between runs")."""
    libc = _libc()
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if libc is None or any(v in os.environ for v in _ALLOCATOR_ENV) or "glibc.malloc." in tunables:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc's `malloc_trim(0)`); the engine calls it
    when a run ends (guard.RunLock). A no-op where the C library is not glibc.

    torch takes CPU tensors from malloc. A chunk's per-layer KV (a few MB) lands in the brk heap
    (below the mmap threshold, whether `configure_allocator` fixed it or glibc raised it as large
    blocks were freed), and the heap shrinks only from its top. A store that evicts and refills
    between runs, and the runs' transient activations, leave it full of free holes, so RSS climbs
    past the store's budget (docs/store.md, "Memory between runs"); malloc_trim also releases the
    whole free pages in the middle of the heap."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """glibc through ctypes, or None (another OS, or a C library without malloc_trim and mallopt,
    such as musl)."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: its C library's
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def _cgroup_quota(sys_root: Path) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` quota (rounded up), or None when unlimited."""
    try:
        quota, period = (sys_root / "fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))


def _measured(name: str, names: tuple[str, ...], probe: dict, cache_dir: Path | None, measure) -> dict[str, float]:
    """`measure()` → {names…: rate} once per CPU model, flag set, torch version and thread count;
    cached as `<name>-<digest>.json` under a checksum, measured again when the file is unusable.

    Only a measurement taken with the CPUs to ourselves is cached: if other work kept this
    process's threads below BUSY_SHARE of their CPUs meanwhile, the rates serve this process
    alone. Contention does not slow every candidate alike (a kernel of many small operations
    waits at every one), so a busy minute must not decide for every later run."""
    key = {"cpu": platform.processor() or platform.machine(), "flags": sorted(cpu_flags()),
           "torch": torch.__version__, "threads": torch.get_num_threads(), **probe}
    path = _cache_file(cache_dir, name, key)
    cached = _read_checked(path, key, names) or _uncached.get(path)
    if cached is not None:
        return cached
    wall, cpu = time.perf_counter(), time.process_time()
    rates = measure()
    share = (time.process_time() - cpu) / max((time.perf_counter() - wall) * torch.get_num_threads(), 1e-9)
    if share >= BUSY_SHARE:
        _write_checked(path, key, rates)
    else:
        _uncached[path] = rates
        _log.info("%s: the CPU was busy (our threads got %.0f%% of it); measured again next run", name, 100 * share)
    return rates


def _cache_file(cache_dir: Path | None, name: str, key: dict) -> Path:
    if cache_dir is None:
        from .default_model import cache_root

        cache_dir = cache_root()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{name}-{digest}.json"


def _checksum(key: dict, rates: dict) -> str:
    return hashlib.sha256(json.dumps([key, rates], sort_keys=True).encode()).hexdigest()


def _read_checked(path: Path, key: dict, names: tuple[str, ...]) -> dict[str, float] | None:
    """The cached rates, or None when the file is missing, foreign, malformed or fails its checksum."""
    try:
        data = json.loads(path.read_text())
        rates = {name: float(data["rates"][name]) for name in names}
        if data["key"] != key or data["sha256"] != _checksum(key, data["rates"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rates if all(math.isfinite(r) and r > 0 for r in rates.values()) else None


def _write_checked(path: Path, key: dict, rates: dict) -> None:
    """Atomic write (temp file + rename); a read-only cache only costs a re-measurement next time."""
    payload = json.dumps({"key": key, "rates": rates, "sha256": _checksum(key, rates)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(payload)
        os.replace(tmp, path)
    except OSError:
        pass
