"""The one seam for version drift: transformers (transformers5.md §5.1) and torch's private ops.

transformers 5.24 renamed the cache keyword `past_key_values` → `cache` (and the output field);
unknown keywords are swallowed silently, so the name is detected from the forward signature
instead of guessed. Everything else in the package calls `forward` below.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache


@lru_cache(maxsize=None)
def _cache_kwarg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: DynamicCache | None,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int | torch.Tensor = 1,
    **kwargs,
) -> torch.Tensor:
    """One causal-LM forward that appends to `cache` in place (None: no cache, the attention
    brings its own keys); returns the kept logits."""
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=cache is not None,
        logits_to_keep=logits_to_keep,
        **{_cache_kwarg(type(model)): cache},
        **kwargs,
    )
    return out.logits


def last_hidden(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`forward` without a cache and without the head: the decoder's last hidden states (after its
    final norm), for a model whose forward is transformers' LlamaForCausalLM one (nll.plain_head),
    whose decoder is `model.model`."""
    decoder = model.model
    out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                  **{_cache_kwarg(type(decoder)): None})
    return out.last_hidden_state


def same_code(f, g) -> bool:
    """Whether functions `f` and `g` compile to the same code, their own docstrings aside: how the
    package recognises a transformers forward whose arithmetic it replaces (layer_kernel, nll).
    Decorated functions compare level by level down to the functions they wrap (`__wrapped__`):
    transformers 5.21 wraps every model's forward in one shared decorator, whose code alone says
    nothing about the model."""

    def body(code):
        consts = code.co_consts  # the first is the docstring, or None without one (CPython ≤ 3.13);
        if consts and (consts[0] is None or isinstance(consts[0], str)):  # not __doc__, which
            consts = consts[1:]  # transformers' auto_docstring rewrites per model
        return code.co_code, consts, code.co_names, code.co_varnames

    while f is not None and g is not None:
        a, b = getattr(f, "__code__", None), getattr(g, "__code__", None)
        if a is None or b is None or body(a) != body(b):
            return False
        f, g = getattr(f, "__wrapped__", None), getattr(g, "__wrapped__", None)
    return f is None and g is None


# torch's CPU flash attention, which returns the log-sum-exp next to the output (a private aten op
# of torch ≥ 2.3); split-key decode attention needs it (attention._split_key_attention). None where
# this torch lacks it: one-token steps then run unsplit.
cpu_flash_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)

# oneDNN's linear on a weight packed once into its blocked layout (private mkldnn ops, what
# torch.compile's freezing uses for CPU bf16 linear layers; packed_linear.py). None where this
# torch lacks them.
mkldnn_pack_linear_weight = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
mkldnn_packed_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
