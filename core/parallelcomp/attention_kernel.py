"""The AMX attention kernel (`attention_kernel.c`), compiled on first use (native.py), and its
AVX-512 BF16 build for CPUs without AMX (`BUILDS`).

On a CPU with AMX tiles (Intel Xeon since Sapphire Rapids) a bf16 GEMM runs at 2.3-3.2 TFLOP/s
here, but torch's fused CPU attention at about 0.5: with a head size of 64 its small products
leave the tiles idle while the softmax runs. This kernel packs each head's keys and values once
into the tiles' layout and keeps the softmax's maximum lazily (the C source says how), which
measures about twice torch's rate on phase 1's causal attention (docs/hardware.md). `tile` makes
that layout ahead of time, in C with the kernel's own packing: the store keeps the chunks phase 2
reads in it (docs/store.md, "Chunks kept in the kernel's layout").
`attention.py` runs it when `ParallelCompConfig.attention_kernel` resolves to "amx" (or
"avx512", one of `KERNELS`): phase 1, the prompt prefix, phase 2's attention over each chunk's
keys, and the question step's over the merged KV. It takes bf16 tensors on CPU with head sizes
that are multiples of 32 (keys) and 64 (values), up to 256.

On AVX-512 BF16 without AMX (a 2-core AMD EPYC, 2026-12-06) the "avx512" build attends phase 1's
causal micro-batch (2 × 2,090 tokens, SmolLM2's heads) at 350 GFLOP/s, against 195 for the
matmul kernel and 126 for torch's fused one, with a GEMM at 418 (docs/hardware.md).

The "amx" library also holds `linear`, a bf16 linear layer on the tiles: for few rows it reads the
weight as it lies where torch's GEMM reorders it first, for more it packs the weight and rounds
each block of outputs while the next one is computed; where the engine attends on "amx", the
model's nn.Linear modules run it during each run for calls of at most LINEAR_ROWS rows
(`linear_modules`), so the question step's projections read each weight once, and in phase 2
(`wider_linear`) for calls of more rows (WIDER_BYTES, WIDER_ROWS; docs/hardware.md, "Few rows").
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import native

SOURCE = Path(__file__).with_name("attention_kernel.c")
_AVX512 = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fopenmp", "-fPIC", "-shared")
_AVX512_CPU = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
BUILDS = {
    "amx": (_AVX512 + ("-mamx-tile", "-mamx-bf16"), _AVX512_CPU | {"amx_tile", "amx_bf16"}),
    "avx512": (_AVX512 + ("-DPC_NO_AMX",), _AVX512_CPU),
}
"""The kernel's two builds of one source, best first: its name (ParallelCompConfig.attention_kernel,
RunStats.attention_kernel), then the compiler's flags and the CPU flags it needs. "amx" computes
the products on the tiles; "avx512" computes the same products, over the same packed layouts, with
AVX-512 BF16 instructions (VDPBF16PS) on CPUs without AMX (AMD Zen 4 and later, Intel Cooper
Lake), and has no `linear`. A process loads the best build its CPU runs (`name`)."""
KERNELS = tuple(BUILDS)

LINEAR_ROWS = 32
"""The most rows the engine gives `linear` (which itself takes any number). Against torch's bf16
GEMM on SmolLM2's seven projection shapes (30 layers' weights, AMX host, ad hoc) it is 1.75x faster
at 28 rows, 1.4x at 128 and 1.3x at 256 (measured before calls of more rows could pack the
weight, `packs_weight`); up to 32 rows its outputs were torch's bit for bit, above
32 a few in ten thousand differ by one bf16 unit (oneDNN changes its blocking there), and that was
enough to flip a greedy answer (docs/hardware.md, "Few rows"). The question step's 20-30 rows are
what it is for."""

WIDER_BYTES = 1 << 20
"""Inside `wider_linear` (phase 2), `linear` also takes calls of more rows whose x is at most this
many bytes, whatever the weight: packed once, x stays in the core's L2 (2 MB on every CPU with
AMX) while each 32-column block of the weight passes over it (docs/hardware.md, "Few rows")."""

WIDER_ROWS = 3072
"""... and calls of up to this many rows whose weight is at most PACKED_WEIGHT_BYTES, which it packs
(`packs_weight`). Alone (30 layers of SmolLM2's seven projection shapes, the AMX host, 2 threads,
2026-12-05) that took 61 against torch's 100 ms at 550 rows, 111 against 163 at 1,105 and 305
against 350 at 3,000, but 415 against 388 at 4,180, where oneDNN's blocking for large GEMMs wins."""

PACKED_WEIGHT_BYTES = 2 << 20
"""The largest weight `linear` packs: each thread's share of it then stays in its core's L2 while
64-row blocks of x pass over it. Larger ones came out slower packed than as they lie up to 550 rows
(Qwen2.5-0.5B's 8.3 MB up projection: 2.93 against 2.44 ms at 550 rows) and at 1,105 rows mostly
slower than torch's (Qwen2.5-1.5B's 4.5 MB q: 2.71 against 2.49 ms; the 0.5B up projection 5.26
against 4.73, but its down projection 5.40 against 9.29), so they keep WIDER_BYTES
(docs/hardware.md, "Few rows")."""

_scratch = threading.local()  # each thread's packed-KV workspace (two rows' worth), grown to the largest call
_wider = threading.local()  # .depth: `wider_linear` blocks this thread is in


def available() -> bool:
    """Whether this CPU runs the kernel: AVX-512 BF16 (and for the "amx" build AMX and Linux's
    permission to use the tiles) and a build that loads."""
    return _library()[0] is not None


def name() -> str:
    """The build this process runs (BUILDS: "amx" or "avx512"), "" where none does."""
    return _library()[2]


def unavailable_reason(build: str = "") -> str:
    """Why `available()` is False, or with `build` why that build does not run here ("" when it does)."""
    lib, why, loaded = _library()
    if build:
        return "" if build == loaded else why.get(build, f"this CPU runs the {loaded!r} build, the better one")
    return "" if lib is not None else "; ".join(f"{name}: {reason}" for name, reason in why.items())


def linear_available() -> bool:
    """Whether `linear` runs here: the "amx" build."""
    return name() == "amx"


def takes_heads(device: torch.device, dtype: torch.dtype, head_dim: int, value_dim: int) -> bool:
    """Whether the kernel computes heads of these sizes in this dtype on this device, available or
    not: bf16 on CPU, head_dim a multiple of 32 and value_dim of 64, each at most 256."""
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16 and head_dim % 32 == 0
            and value_dim % 64 == 0 and head_dim <= 256 and value_dim <= 256)


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `attend` computes these (B, H, M, D), (B, H_kv, T, D), (B, H_kv, T, Dv) tensors (or
    `attend_rows` the query with such keys and values per row, B = 1): heads `takes_heads` admits,
    one device and dtype, rows contiguous in the last dimension, H a multiple of H_kv, and an
    available kernel."""
    return (takes_heads(key.device, key.dtype, key.shape[-1], value.shape[-1])
            and all(t.device == key.device and t.dtype == key.dtype and t.stride(-1) == 1 and t.dim() == 4
                    for t in (query, key, value))
            and query.shape[1] % key.shape[1] == 0 and query.shape[-1] == key.shape[-1] and key.shape[2] > 0
            and available())


def takes_rows(query: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """`takes` for `attend_rows`'s query over every row's key and value (B = 1 each), the shapes
    checked once and each row's layout: one dtype and device, rows contiguous in the last
    dimension, the same heads and head sizes, at least one key."""
    key, value = rows[0]
    if not takes(query, key, value):
        return False
    dtype, device = key.dtype, key.device
    shape, values = (1, key.shape[1], key.shape[3]), (1, value.shape[1], value.shape[3])
    for k, v in rows:  # a plain loop over locals: phase 2 checks 65 rows in each of 30 layers at 128K
        if k.dim() != 4 or v.dim() != 4:
            return False
        (kb, kh, kt, kd), (vb, vh, vt, vd) = k.shape, v.shape
        if (k.dtype != dtype or v.dtype != dtype or k.device != device or v.device != device or k.stride(-1) != 1
                or v.stride(-1) != 1 or (kb, kh, kd) != shape or (vb, vh, vd) != values or not 0 < kt == vt):
            return False
    return True


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
           causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q·Kᵀ)·V of each query head h over KV head h // (H / H_kv), and the rows'
    log-sum-exps of the scaled scores. `causal`: row m sees keys t <= T - M + m (a block of
    queries at the end of its keys); else every key. Returns the output (B, H, M, Dv) in bf16, a
    view of a (B, M, H, Dv) tensor (transformers' layout after `.transpose(1, 2)`), and the
    log-sum-exps (B, H, M) in fp32. Call only where `takes` holds."""
    return attend_rows(query, [(key[b : b + 1], value[b : b + 1]) for b in range(key.shape[0])], scale, causal=causal)


def attend_rows(query: torch.Tensor, rows: list[tuple[torch.Tensor, torch.Tensor]], scale: float | None = None,
                causal: bool = False, tails: tuple[torch.Tensor, torch.Tensor] | None = None,
                period: int = 0, tokens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` with keys and values of its own per batch row: row b of query (B, H, M, D) attends
    over rows[b] = (key (1, H_kv, T_b, D), value (1, H_kv, T_b, Dv)), read where they are (phase 2:
    each chunk in the store), in one call of the kernel. Call only where `takes` holds for each.

    `tails`: keys and values (B, H_kv, n, ·) that row b attends after rows[b] (its batch entry b),
    in the same softmax, with query row m seeing the first n - period + (m mod period) + 1 of them
    (phase 2: G·q packed rows of a q-token question, `period` = q, over [prefix ‖ head ‖
    question]). Not with `causal`; `takes` must hold for them too.

    `tokens`: the rows are `tile`d, row b holding tokens[b] keys (not with `causal`). The kernel
    then reads them as they are, and requests each KV head's from memory while it attends the
    one before."""
    b, h, m, d = query.shape
    h_kv, dv = rows[0][0].shape[1], rows[0][1].shape[-1]
    lib = _library()[0]
    tail = [(0,) * 7] * b
    if tails is not None:
        k, v = tails
        ks, vs = k.stride(0) * k.element_size(), v.stride(0) * v.element_size()
        tail = [(k.data_ptr() + i * ks, k.stride(1), k.stride(2), v.data_ptr() + i * vs, v.stride(1), v.stride(2),
                 k.shape[2]) for i in range(b)]
    counts = [k.shape[2] for k, _ in rows] if tokens is None else tokens
    kv = torch.tensor([(k.data_ptr(), k.stride(1), k.stride(2), v.data_ptr(), v.stride(1), v.stride(2), counts[i])
                       + tail[i] for i, (k, v) in enumerate(rows)], dtype=torch.int64)
    threads = torch.get_num_threads()
    out = torch.empty(b, m, h, dv, dtype=torch.bfloat16).transpose(1, 2)
    lse = torch.empty(b, h, m, dtype=torch.float32)
    code = lib.pc_amx_attention(
        query.data_ptr(), kv.data_ptr(), out.data_ptr(), lse.data_ptr(), b, h, h_kv, m, d, dv, *query.stride()[:3],
        *out.stride()[:3], int(causal), period, d**-0.5 if scale is None else scale, int(tokens is not None), threads,
        _workspace(lib.pc_amx_workspace(kv.data_ptr(), b, h_kv, d, dv, int(causal), int(tokens is not None), threads)))
    if code != 0:  # shapes are checked by `takes`
        raise ValueError(f"AMX attention kernel declined {tuple(query.shape)} over {len(rows)} rows (code {code})")
    return out, lse


def tile(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's keys and values (1, H_kv, T, D) and (1, H_kv, T, Dv), bf16, in the layout the
    kernel's tiles load (`attend_rows` with `tokens`; the kernel's own packing, pc_amx_tile): per
    KV head, T rounded up to whole blocks of 64 keys (`tiled_tokens`, zeros past T); the keys as
    16 keys × D/2 pairs of dimensions per group of 16 keys (q·kᵀ's operand), the values as 16
    pairs of keys × 16 columns × the pair, per 32 keys and 16 columns (p·v's). Returned as new
    contiguous (1, H_kv, T rounded up, D or Dv) tensors; `untile` inverts it. Call only where
    `available()`."""
    _, h, t, d = key.shape
    dv, padded = value.shape[-1], tiled_tokens(t)
    keys, values = key.new_empty(1, h, padded, d), value.new_empty(1, h, padded, dv)
    _library()[0].pc_amx_tile(key.data_ptr(), key.stride(1), key.stride(2), value.data_ptr(), value.stride(1),
                              value.stride(2), t, h, d, dv, keys.data_ptr(), values.data_ptr(), torch.get_num_threads())
    return keys, values


def tiled_tokens(tokens: int) -> int:
    """The rows per head `tile` keeps for `tokens` keys: whole blocks of 64."""
    return -(-tokens // 64) * 64


def untile(key: torch.Tensor, value: torch.Tensor, tokens: int,
           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, H_kv, tokens, ·) keys and values that `tile` made `key` and `value` from: new
    contiguous tensors, or written into `out`, two (1, H_kv, tokens, ·) tensors of their dtype
    whose rows are contiguous (any head stride: a span of the decode cache's buffers, kv.decode_cache)."""
    _, h, _, d = key.shape
    dv = value.shape[-1]
    keys, values = out if out is not None else (key.new_empty(1, h, tokens, d), value.new_empty(1, h, tokens, dv))
    if keys.shape != (1, h, tokens, d) or values.shape != (1, h, tokens, dv) or keys.stride(2) != d or keys.stride(3) != 1 \
            or values.stride(2) != dv or values.stride(3) != 1 or keys.dtype != key.dtype or values.dtype != value.dtype:
        raise ValueError(f"untile: `out` must be (1, {h}, {tokens}, ·) tensors of {key.dtype} with contiguous rows")
    _library()[0].pc_amx_untile(key.data_ptr(), value.data_ptr(), tokens, h, d, dv, keys.data_ptr(), values.data_ptr(),
                                keys.stride(1), values.stride(1), torch.get_num_threads())
    return keys, values


def takes_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` computes F.linear(x, weight, bias): bf16 on CPU, a contiguous (N, K) weight
    with K a multiple of 32 and N of 16, x of 1 to LINEAR_ROWS rows of K (inside `wider_linear`, of
    at most WIDER_BYTES, or with a weight of at most PACKED_WEIGHT_BYTES up to WIDER_ROWS), a
    contiguous (N,) bias or none, nothing that autograd should record,
    and an available kernel."""
    if weight.dim() != 2 or x.dim() == 0:
        return False
    n, k = weight.shape
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and weight.is_contiguous() and k % 32 == 0 and n % 16 == 0 and x.shape[-1] == k
            and 0 < x.numel() and (x.numel() <= LINEAR_ROWS * k or (getattr(_wider, "depth", 0) > 0 and (
                x.numel() * 2 <= WIDER_BYTES or (n * k * 2 <= PACKED_WEIGHT_BYTES and x.numel() <= WIDER_ROWS * k))))
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.device.type == "cpu" and bias.is_contiguous()
                                  and bias.shape == (n,)))
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and linear_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) on the tiles (pc_amx_linear): fp32 sums, each rounded once to bf16.
    Call only where `takes_linear` holds."""
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    m = rows.shape[0]
    out = x.new_empty(*x.shape[:-1], n)
    lib, threads, packed = _library()[0], torch.get_num_threads(), packs_weight(m, n, k)
    lib.pc_amx_linear(rows.data_ptr(), m, k, weight.data_ptr(), n, None if bias is None else bias.data_ptr(),
                      out.data_ptr(), _workspace(lib.pc_amx_linear_workspace(m, k, n, threads, packed)), threads, packed)
    return out


def packs_weight(rows: int, n: int, k: int) -> bool:
    """Whether `linear` of `rows` rows through an (n, k) weight packs the weight (the kernel's
    linear_many) rather than x (linear_few): above 64 rows, for a weight of at most
    PACKED_WEIGHT_BYTES, once the rows pay for reading and writing it (rows · 4,096 ≥ n · k: 81 rows
    for SmolLM2's 576 × 576, 216 for its MLP). Both give the same bits."""
    return rows > 64 and n * k * 2 <= PACKED_WEIGHT_BYTES and rows * 4096 >= n * k


@contextmanager
def wider_linear() -> Iterator[None]:
    """Inside the block, on this thread, `takes_linear` also takes calls of more than LINEAR_ROWS
    rows (WIDER_BYTES, WIDER_ROWS): phase 2's projections (prefill.question_nll). Their outputs then
    differ from torch's in a few last bits at 33-767 and 1,923-3,064 rows (oneDNN blocks those
    differently; at 768-1,922 rows the bits were the same; the AMX host, 2 threads), which moves chunk scores by
    rounding. Phase 2's outputs rank the chunks and, with compression, pick which of a kept chunk's
    KV entries stay; the KV itself is phase 1's. The prompt prefix, phase 1 and the question step,
    whose KV the answer reads, keep LINEAR_ROWS, where the bits are torch's."""
    _wider.depth = getattr(_wider, "depth", 0) + 1
    try:
        yield
    finally:
        _wider.depth -= 1


def linear_modules(model) -> list[tuple[nn.Module, Callable]]:
    """`model`'s nn.Linear modules (the class itself, not a subclass: quantized and LoRA layers keep
    their own), each with `_linear_forward`, for layer_kernel.fused; empty where the kernel is
    unavailable or the model is not bf16 on CPU. A call `takes_linear` refuses runs F.linear."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16 or not linear_available():
        return []
    return [(module, _linear_forward) for module in model.modules() if type(module) is nn.Linear]


def _linear_forward(self, x):
    if takes_linear(x, self.weight, self.bias):
        return linear(x, self.weight, self.bias)
    return nn.functional.linear(x, self.weight, self.bias)


def _workspace(nbytes: int) -> int:
    """The address of this thread's workspace of at least `nbytes`, 64-byte aligned."""
    held = getattr(_scratch, "buffer", None)
    if held is None or held.numel() < nbytes + 64:
        held = _scratch.buffer = torch.empty(nbytes + 64, dtype=torch.uint8)
    address = held.data_ptr()
    return address + (-address % 64)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, dict[str, str], str]:
    """The loaded library of the best build that runs here (or None), why each better build does
    not run (by name), and the loaded build's name ("" for none)."""
    reasons = {}
    for build, (flags, cpu) in BUILDS.items():
        lib, why = native.load(SOURCE, flags, cpu, f"{build} attention kernel")
        if lib is not None and lib.pc_amx_init() != 0:
            lib, why = None, "Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
        if lib is not None:
            return _declare(lib, build), reasons, build
        reasons[build] = why
    return None, reasons, ""


def _declare(lib: ctypes.CDLL, build: str = "amx") -> ctypes.CDLL:
    """`lib`, of `build`, with its functions' argument and result types declared (also for a
    build of the same source under AddressSanitizer, scripts/asan-attention-kernel.sh)."""
    lib.pc_amx_attention.restype = ctypes.c_int
    lib.pc_amx_attention.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_long] * 12 + [ctypes.c_int, ctypes.c_long,
                                     ctypes.c_float, ctypes.c_int, ctypes.c_long, ctypes.c_void_p])
    lib.pc_amx_tile.argtypes = ([ctypes.c_void_p] + [ctypes.c_long] * 2 + [ctypes.c_void_p] + [ctypes.c_long] * 6
                                + [ctypes.c_void_p] * 2 + [ctypes.c_long])
    lib.pc_amx_untile.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3
    lib.pc_amx_workspace.restype = ctypes.c_long
    lib.pc_amx_workspace.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_int, ctypes.c_int, ctypes.c_long]
    if build != "amx":
        return lib
    lib.pc_amx_linear.restype = None
    lib.pc_amx_linear.argtypes = ([ctypes.c_void_p] + [ctypes.c_long] * 2 + [ctypes.c_void_p] + [ctypes.c_long]
                                  + [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_int])
    lib.pc_amx_linear_workspace.restype = ctypes.c_long
    lib.pc_amx_linear_workspace.argtypes = [ctypes.c_long] * 4 + [ctypes.c_int]
    return lib
