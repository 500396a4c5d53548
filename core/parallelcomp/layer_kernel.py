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
formula (Gemma's 1 + weight, a GELU gate) keeps its own forward. `logsumexp_update` is nll.py's
running log-sum-exp over the LM head's vocabulary slices; it replaces no module.
"""

from __future__ import annotations

import ctypes
import functools
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
    """silu(gate) * up of two contiguous bf16 tensors of one shape, rounded as eager torch rounds."""
    out = torch.empty_like(gate)
    _library()[0].pc_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads())
    return out


def takes_logits(x: torch.Tensor) -> bool:
    """Whether `logsumexp_update` runs on `x`: rows of bf16 on the CPU, each row contiguous, with the kernels available."""
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


def _plain(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0


def modules(model) -> list[tuple[nn.Module, Callable]]:
    """`model`'s modules the kernels can run, each with the forward that runs them: those whose
    class forward is `_rms_norm_formula` or `_swiglu_formula` (with nn.Linear projections and a
    SiLU), of a bf16 model on CPU. Empty where the kernels are unavailable. A call whose tensors
    the kernel does not take (another dtype, a strided view, a weight that is not the rows'
    length) runs the class's forward."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16 or not available():
        return []
    found = []
    for module in model.modules():
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
        module.forward = functools.partial(forward, module)
    try:
        yield
    finally:
        for module, _ in mine:
            del module.forward


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
    lib.pc_silu_mul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2
    lib.pc_logsumexp_update.restype = None
    lib.pc_logsumexp_update.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_long]
    return lib, ""
