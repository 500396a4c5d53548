"""A decoder layer's RMSNorms and SwiGLU gate, and phase 2's log-sum-exp, as C kernels
(`layer_kernel.c`), compiled on first use (native.py), for bf16 models on x86-64 CPUs with
AVX-512 BF16.

Eager transformers runs each of these steps as several passes over whole tensors; on SmolLM2 they
took as long as the layer's matrix products in phase 1 (docs/hardware.md). `fused(modules(model))`
gives the model's matching modules a one-pass forward for the duration of a block, and puts their
own back after it: the engine holds it for each run, and each Ray worker for each call
(ParallelCompConfig.layer_kernel). A module matches only where its forward is, bytecode for
bytecode, the formula the kernel computes (`_rms_norm_formula`, `_swiglu_formula`: transformers'
LlamaRMSNorm and LlamaMLP, which Mistral, Qwen2, Qwen3 and others copy), so a family with another
formula (Gemma's 1 + weight, a GELU gate) keeps its own forward. The rotary embedding (`rope`)
runs through the function module transformers gives each attention module for
apply_rotary_pos_emb (the `kernels` package's per-module hook), where it is Llama's formula; with
no such hook (an older transformers, no `kernels` package) it stays in torch. `logsumexp_update`
is nll.py's running log-sum-exp over the LM head's vocabulary slices; it replaces no module.
"""

from __future__ import annotations

import ctypes
import functools
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.activations import SiLUActivation

from . import native
from .compat import same_code

SOURCE = Path(__file__).with_name("layer_kernel.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-fPIC", "-shared")
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
NAME = "c-avx512"  # RunStats.layer_kernel and the model identity (store.model_identity) where these kernels run


def available() -> bool:
    """Whether this CPU runs the kernels: AVX-512 BF16 and a build that loads."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _library()[1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of each row of contiguous bf16 `x` with bf16 `weight` (`_rms_norm_formula`)."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    _library()[0].pc_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps,
                              torch.get_num_threads())
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of two contiguous bf16 tensors of one shape, rounded as eager torch rounds
    (silu(gate) looked up in `_silu_table`)."""
    out = torch.empty_like(gate)
    _library()[0].pc_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), _silu_table().data_ptr(),
                              torch.get_num_threads())
    return out


@functools.cache
def _silu_table() -> torch.Tensor:
    """torch's SiLU of every bf16 value, indexed by the value's 16 bits (0x0000 … 0xFFFF), as the
    fp32 bit patterns (int32) of the bf16 results: pc_silu_mul's lookup table (256 KB). Made by
    this process's torch, so the kernel's SiLU is eager torch's bit for bit."""
    patterns = torch.cat([torch.arange(0, 2**15), torch.arange(-(2**15), 0)]).to(torch.int16)
    with torch.no_grad():
        return nn.functional.silu(patterns.view(torch.bfloat16)).float().view(torch.int32).contiguous()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding of (B, H, T, D) bf16 `x` with (B or 1, T, D) `cos` and `sin`
    (`_rope_takes`), rounded as eager torch rounds; the result has `x`'s strides."""
    out = torch.empty_like(x)
    b, h, t, d = x.shape
    batch_stride = cos.stride(0) if cos.shape[0] == b else 0
    _library()[0].pc_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), b, h, t, d, *x.stride()[:3],
                          batch_stride, cos.stride(1), torch.get_num_threads())
    return out


def takes_logits(x: torch.Tensor) -> bool:
    """Whether `logsumexp_update` runs on `x`: bf16 rows on the CPU, each contiguous, and the kernels available."""
    return x.dim() == 2 and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.stride(1) == 1 and available()


def logsumexp_update(x: torch.Tensor, high: torch.Tensor, total: torch.Tensor) -> None:
    """Fold the (rows, n) bf16 values `x` (`takes_logits`) into each row's running log-sum-exp,
    high + log(total) (contiguous fp32, -inf and 0 before the first slice), in fp32, in place."""
    _library()[0].pc_logsumexp_update(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), high.data_ptr(),
                                      total.data_ptr(), torch.get_num_threads())


# transformers' LlamaRMSNorm.forward, which `rms_norm` computes (no docstring: compared as code).
def _rms_norm_formula(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


# transformers' apply_rotary_pos_emb and the rotate_half it calls by that name, which `rope` computes.
def _rope_formula(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def rotate_half(x):
    """Rotates half the hidden dims of the input."""  # transformers' own docstring: it moves the constants
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


# transformers' LlamaMLP.forward, whose gate `silu_mul` computes where act_fn is a SiLU.
def _swiglu_formula(self, x):
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _fused_rms_norm(self, hidden_states):
    weight = self.weight
    if (_plain(hidden_states) and weight.dtype == torch.bfloat16 and weight.is_contiguous()
            and weight.shape == hidden_states.shape[-1:]):
        return rms_norm(hidden_states, weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _fused_swiglu(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if _plain(gate) and _plain(up) and gate.shape == up.shape:
        return self.down_proj(silu_mul(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _fused_rope(self, q, k, cos, sin, unsqueeze_dim=1):
    if unsqueeze_dim == 1 and _rope_takes(q, cos, sin) and _rope_takes(k, cos, sin):
        return rope(q, cos, sin), rope(k, cos, sin)
    return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)


def _rope_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """(B, H, T, D) bf16 rows with D a multiple of 32, dense (so empty_like keeps its strides), and
    (B or 1, T, D) bf16 cos and sin of one layout with contiguous rows, all on the CPU."""
    return (x.dim() == 4 and x.numel() > 0 and x.shape[-1] % 32 == 0 and x.stride(-1) == 1
            and x.dtype == cos.dtype == sin.dtype == torch.bfloat16 and x.device.type == "cpu"
            and cos.device.type == sin.device.type == "cpu" and cos.shape == sin.shape
            and cos.shape[0] in (1, x.shape[0]) and cos.shape[1:] == x.shape[2:] and cos.stride() == sin.stride()
            and cos.stride(-1) == 1 and _dense(x))


def _dense(x: torch.Tensor) -> bool:
    """Whether `x` fills its memory with no gaps or overlaps in some order of its dimensions (a
    transposed view of a contiguous tensor does): then empty_like gives it the same strides."""
    size = 1
    for dim in sorted(range(x.dim()), key=lambda i: (x.stride(i), x.shape[i])):
        if x.shape[dim] != 1 and x.stride(dim) != size:
            return False
        size *= x.shape[dim]
    return True


def _plain(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0


def modules(model) -> list[tuple[nn.Module, Callable]]:
    """`model`'s modules the kernels can run, each with the forward that runs them: those whose
    class forward is `_rms_norm_formula` or `_swiglu_formula` (with nn.Linear projections and a
    SiLU), and the attention modules' own rotary-embedding function modules (the `kernels`
    package's `_kernel_funcs`, through which transformers routes apply_rotary_pos_emb) where that
    function is `_rope_formula`, of a bf16 model on CPU. Empty where the kernels are unavailable.
    A call whose tensors the kernel does not take (another dtype, a strided view, a weight that is
    not the rows' length, a head size that is not a multiple of 32) runs the class's forward."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16 or not available():
        return []
    found = []
    for module in model.modules():
        for wrapper in vars(module).get("_kernel_funcs", {}).values():  # kernels' per-module function hooks
            func = _wrapped_function(wrapper)
            if same_code(func, _rope_formula) and same_code(getattr(func, "__globals__", {}).get("rotate_half"),
                                                             rotate_half):
                found.append((wrapper, _fused_rope))
        forward = type(module).forward
        if same_code(forward, _rms_norm_formula) and getattr(module, "weight", None) is not None:
            found.append((module, _fused_rms_norm))
        elif (same_code(forward, _swiglu_formula) and type(getattr(module, "act_fn", None)) in _SILU
              and all(type(getattr(module, p, None)) is nn.Linear for p in ("gate_proj", "up_proj", "down_proj"))):
            found.append((module, _fused_swiglu))
    return found


@contextmanager
def fused(found: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Inside the block, each module of `found` (`modules`) runs its one-pass forward; after it, the
    class's own forward again. A module that already has a forward of its own instance (a hook
    library's, or an enclosing block's) keeps it."""
    mine = [(module, forward) for module, forward in found if "forward" not in vars(module)]
    for module, forward in mine:
        module.forward = types.MethodType(forward, module)  # a method: `kernels` reads forward.__func__
    try:
        yield
    finally:
        for module, _ in mine:
            del module.forward


def _wrapped_function(wrapper):
    """The function a `kernels` function module (transformers' use_kernel_forward_from_hub on a
    function, e.g. apply_rotary_pos_emb) calls, from its forward's closure; None if none."""
    forward = getattr(type(wrapper), "forward", None)
    code, closure = getattr(forward, "__code__", None), getattr(forward, "__closure__", None)
    if code is None or not closure:
        return None
    cells = dict(zip(code.co_freevars, closure))
    return cells["func"].cell_contents if "func" in cells else None


_SILU = (nn.SiLU, SiLUActivation)  # what ACT2FN["silu"] and ["swish"] build


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None and why not."""
    lib, why = native.load(SOURCE, FLAGS, CPU_FLAGS, "layer kernels")
    if lib is None:
        return None, why
    lib.pc_rms_norm.restype = None
    lib.pc_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float, ctypes.c_long]
    lib.pc_silu_mul.restype = None
    lib.pc_silu_mul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
    lib.pc_rope.restype = None
    lib.pc_rope.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 10
    lib.pc_logsumexp_update.restype = None
    lib.pc_logsumexp_update.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_long]
    return lib, ""
