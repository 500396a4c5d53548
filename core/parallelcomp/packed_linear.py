"""A bf16 model's linear layers on CPU with their weights packed once for oneDNN.

torch's CPU linear in bf16 gives oneDNN the plain (N, K) weight, and oneDNN reorders it into its
blocked layout on every call. Packed once (`compat.mkldnn_pack_linear_weight`, as torch.compile's
freezing does for CPU bf16 linear layers) and kept beside the plain weight, a call skips that
reorder. Measured on the AVX-512 BF16 host (docs/hardware.md, "Packed linear weights"): SmolLM2's
gate and up projections at 2,090 rows took 8.8 ms instead of 9.9, and a phase-1 forward 1.61 s
instead of 1.69, the same bits.

The price is memory: a second copy of every projection weight (SmolLM2-135M: 202.5 MiB;
Qwen2.5-1.5B: about 2.6 GB). `ParallelCompConfig.pack_weights=False` keeps only the plain ones.

The outputs must be torch's own, bit for bit, so that a chunk's KV, and with it the chunk store's
keys, do not depend on the choice: each weight shape is checked once against F.linear on probes,
and weights of a shape whose bits differ stay plain. A weight replaced or changed in place after
packing (a new tensor, or a bumped version counter) is packed again. The LM head stays plain: it
meets one row per chunk in phase 1, and nll.py reads its weight in vocabulary slices.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from .compat import mkldnn_pack_linear_weight, mkldnn_packed_linear

PROBE_ROWS = (1, 37, 300)
"""Row counts of the probes on which each weight shape's packed outputs must equal F.linear's
(oneDNN picks its kernel by the rows)."""

_packs: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple[int, int], torch.Tensor | None]] = weakref.WeakKeyDictionary()
"""Module → (its weight's identity when packed, the packed weight or None where the bits differ)."""
_checked: dict[tuple[int, int, bool], bool] = {}
"""(N, K, with a bias) → whether packed weights of that shape give F.linear's bits (`_same_bits`)."""


def supported() -> bool:
    """Whether this torch packs bf16 linear weights for oneDNN on this CPU."""
    return not unsupported_reason()


def unsupported_reason() -> str:
    """Why `supported()` is False ("" when it is True): torch built without oneDNN, without the
    packing ops, or a CPU without oneDNN's bf16 kernels."""
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (mkldnn)"
    if mkldnn_pack_linear_weight is None or mkldnn_packed_linear is None:
        return f"torch {torch.__version__} has no mkldnn._reorder_linear_weight or mkldnn._linear_pointwise"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bf16 kernels for this CPU (it needs AVX-512 BW/VL/DQ or newer)"
    return ""


def modules(model) -> list[tuple[nn.Module, Callable]]:
    """`model`'s nn.Linear modules (the class itself: quantized and LoRA layers keep their own) but
    the LM head, each with `_forward`, for layer_kernel.fused, their weights packed now (so the
    memory is held before any run is budgeted, guard.py); empty unless `model` is bf16 on a CPU
    where packing is `supported`."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16 or not supported():
        return []
    head = model.get_output_embeddings()
    found = [(m, _forward) for m in model.modules() if type(m) is nn.Linear and m is not head
             and m.weight.dtype == torch.bfloat16]
    for module, _ in found:
        packed(module)
    return found


def nbytes(found: list[tuple[nn.Module, Callable]]) -> int:
    """Bytes of the packed copies held for the modules of `found` (`modules`)."""
    return sum(m.weight.numel() * m.weight.element_size() for m, _ in found if packed(m) is not None)


def packed(module: nn.Linear) -> torch.Tensor | None:
    """`module`'s packed weight, packed now if it is not yet or its weight changed since; None
    where packed weights of its shape give other bits than F.linear (`_same_bits`) or oneDNN
    refuses the weight (the module then runs F.linear)."""
    weight = module.weight
    key = (weight.data_ptr(), -1 if weight.is_inference() else weight._version)
    held = _packs.get(module)
    if held is not None and held[0] == key:
        return held[1]
    pack = None
    if _checked.get(_shape(module), True):  # not a shape already found to differ
        try:
            with torch.no_grad():
                pack = mkldnn_pack_linear_weight(weight.detach(), 2048)  # a phase-1 chunk's rows: the layout's hint
                if not _same_bits(module, pack):
                    pack = None
        except RuntimeError:  # a layout or dtype oneDNN does not take
            pack = None
    _packs[module] = (key, pack)
    return pack


def _shape(module: nn.Linear) -> tuple[int, int, bool]:
    return (*module.weight.shape, module.bias is not None)


def _same_bits(module: nn.Linear, pack: torch.Tensor) -> bool:
    """Whether the packed weight gives F.linear's bits on probes of PROBE_ROWS rows, checked once
    per weight shape and bias presence (oneDNN picks its kernels by the shapes, not the values)."""
    shape = _shape(module)
    if shape not in _checked:
        probe = torch.Generator().manual_seed(0)
        xs = [torch.randn(rows, module.in_features, generator=probe).to(module.weight.dtype) for rows in PROBE_ROWS]
        _checked[shape] = all(torch.equal(mkldnn_packed_linear(x, pack, module.bias, "none", [], ""),
                                          nn.functional.linear(x, module.weight, module.bias)) for x in xs)
    return _checked[shape]


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() >= 2 and x.numel() > 0
            and x.is_contiguous() and x.shape[-1] == self.in_features
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        pack = packed(self)
        if pack is not None:
            return mkldnn_packed_linear(x, pack, self.bias, "none", [], "")
    return nn.functional.linear(x, self.weight, self.bias)


def is_forward(module: nn.Module) -> bool:
    """Whether `module` runs `_forward` (inside the engine's layers block)."""
    return getattr(vars(module).get("forward"), "__func__", None) is _forward
