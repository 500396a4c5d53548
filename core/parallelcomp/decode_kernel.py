"""The C kernels of a one-token decode step (`decode_kernel.c`), compiled on first use (docs/decode.md).

A decode step reads every weight and the whole merged KV once; torch's CPU kernels for a
one-token step (a one-row GEMV, attention of a few query rows) read them at a third to a half of
the memory bandwidth here, and transformers' modules add ~20 ms a step of small operators. The C
kernels are small (attention, the one-row product, and `DecodeStep`'s whole Llama-family step;
AVX2 + FMA, OpenMP threads from torch's own pool), so they are compiled here by the system's C
compiler on first use (native.py: cached per source, compiler and flags, checksummed); they run
only where the CPU has AVX2 and FMA and the build succeeded. Everywhere else (no compiler, another
architecture, CUDA) decoding keeps torch's kernels, and `RunStats.decode_kernel` says which ran.
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import native, packed_linear

SOURCE = Path(__file__).with_name("decode_kernel.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared")
NAME = "c-avx2"  # RunStats.decode_kernel when these kernels run
_GROUPS, _HEAD_DIM = 16, 256  # MAX_G, MAX_D in the C source



def available() -> bool:
    """Whether one-token steps on this CPU can run the C kernels (built, or buildable, and loadable)."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True): the CPU, or the compiler's or loader's error."""
    return _library()[1]


def takes(groups: int, *head_dims: int) -> bool:
    """Whether the kernel's shape limits admit `groups` query rows per KV head (at most 16) and
    these head sizes (multiples of 8 up to 256)."""
    return 1 <= groups <= _GROUPS and all(8 <= d <= _HEAD_DIM and d % 8 == 0 for d in head_dims)


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `attend` takes these tensors: CPU, float32 or bfloat16 KV of one dtype, rows
    contiguous in the last dimension, shapes that `takes` admits, and a built kernel."""
    return (key.device.type == "cpu" and key.dtype == value.dtype and key.dtype in (torch.float32, torch.bfloat16)
            and key.stride(-1) == 1 and value.stride(-1) == 1
            and takes(query.shape[2], key.shape[-1], value.shape[-1]) and available())


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale · q·Kᵀ) V for every key (no mask), in fp32; returns the query's dtype.

    query (B, H_kv, G, D): the G query heads of each KV head packed as rows; key (B, H_kv, T, D)
    and value (B, H_kv, T, Dv) may be views with gaps between heads and batch entries (the
    preallocated decode cache). Call only where `supports` holds.
    """
    b, h, g, d = query.shape
    t, dv = key.shape[2], value.shape[-1]
    q = (query.float() * (d ** -0.5 if scale is None else scale)).contiguous()
    out = torch.empty(b, h, g, dv, dtype=torch.float32)
    code = _library()[0].pc_decode_attention(
        q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), int(key.dtype == torch.bfloat16),
        b, h, g, t, d, dv, *key.stride()[:3], *value.stride()[:3], torch.get_num_threads())
    if code != 0:  # shapes are checked by `supports`; 2 is a failed allocation in C
        raise MemoryError(f"decode attention kernel failed (code {code}) for {b}x{h}x{g} rows over {t} keys")
    return out.to(query.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` of one row x (any leading shape of one element) in fp32; returns x's dtype. Call
    only where `takes_linear(x, weight)` holds."""
    n, k = weight.shape
    row = x.reshape(k).float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    out = torch.empty(n, dtype=torch.float32)
    code = _library()[0].pc_linear(row.data_ptr(), weight.data_ptr(), None if b is None else b.data_ptr(),
                                out.data_ptr(), int(weight.dtype == torch.bfloat16), n, k, weight.stride(0),
                                torch.get_num_threads())
    if code != 0:  # widths are checked by `takes_linear`
        raise ValueError(f"decode product kernel declined a {n}x{k} weight (code {code})")
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def takes_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of x on CPU against a weight `takes_weight` admits, of x's dtype."""
    return _one_row(x, weight) and takes_weight(weight)


def takes_weight(weight: torch.Tensor) -> bool:
    """A float32 or bfloat16 CPU weight with rows contiguous and a multiple of 8 long, and built kernels."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and weight.dim() == 2
            and weight.stride(1) == 1 and weight.shape[1] % 8 == 0 and available())


@contextmanager
def one_row_linears(model) -> Iterator[None]:
    """Inside the block, each `torch.nn.Linear` of `model` whose weight the kernel takes computes a
    one-row input with `linear` (a one-token step's projections and LM head) and any other input as
    before: by its class's forward or the packed one it ran before (packed_linear.py). The weights
    are checked once here; each call checks only its input."""
    modules = {m: vars(m).get("forward") for m in model.modules()
               if type(m) is torch.nn.Linear and ("forward" not in vars(m) or packed_linear.is_forward(m))
               and takes_weight(m.weight)}
    for m, before in modules.items():
        m.forward = functools.partial(_linear_forward, m, before)
    try:
        yield
    finally:
        for m, before in modules.items():
            if before is None:
                del m.forward
            else:
                m.forward = before


def _one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.numel() == weight.shape[1] and x.dtype == weight.dtype and x.device.type == "cpu"


def _linear_forward(module: torch.nn.Linear, before: Callable | None, x: torch.Tensor) -> torch.Tensor:
    if _one_row(x, module.weight):
        return linear(x, module.weight, module.bias)
    return torch.nn.functional.linear(x, module.weight, module.bias) if before is None else before(x)


# the per-layer table of pc_decode_step, in the C enum's order
_FIELDS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm", "gate_proj",
           "up_proj", "down_proj", "q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias", "gate_proj.bias",
           "up_proj.bias", "down_proj.bias", "q_norm", "k_norm", "keys", "values", "head_stride", "held")
_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # decoders whose layer pc_decode_step computes


class DecodeStep:
    """A whole one-token step in one C call (`pc_decode_step`): every layer, the final norm and the
    LM head of a Llama-family decoder (llama, mistral, qwen2, qwen3), over a preallocated cache.

    Between the kernels above, transformers' modules spend ~20 ms a step here on norms, the rotary
    embedding, adds and module calls (docs/decode.md); this step has none of that. It computes what
    the modeling code computes, in its order and, in a bfloat16 model, with its roundings; the
    rotary embedding's cos and sin come from the model's own `rotary_emb`, so any RoPE scaling is
    the model's. `for_model` returns None for anything else, and the step then runs through
    transformers as before.
    """

    def __init__(self, model, cache, layers: list[dict[str, torch.Tensor | int]]):
        cfg = model.config.get_text_config()
        self.cache, self.layers = cache, layers  # layers keeps the float32 biases the table points to
        self.steps = 0
        """Steps run so far."""
        decoder = model.model
        self.embed, self.rotary, self.norm = decoder.embed_tokens.weight, decoder.rotary_emb, decoder.norm.weight
        self.lm_head = model.lm_head.weight
        self.dtype = model.dtype
        attn = decoder.layers[0].self_attn
        self.shape = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads,
                      attn.head_dim, cfg.intermediate_size, self.lm_head.shape[0])
        self.eps, self.scale = decoder.norm.variance_epsilon, attn.scaling
        windows = [getattr(m.self_attn, "sliding_window", getattr(cfg, "sliding_window", None)) for m in decoder.layers]
        self.window = min((w for w in windows if w), default=None)  # per layer (qwen2/3) or global (mistral)
        self._table = torch.tensor(  # one row per layer; its last column, "held", is set at each step
            [[v if isinstance(v, int) else 0 if v is None else v.data_ptr() for v in map(layer.get, _FIELDS[:-1])] + [0]
             for layer in layers], dtype=torch.int64).reshape(len(layers), len(_FIELDS))

    @classmethod
    def for_model(cls, model, cache) -> "DecodeStep | None":
        """The step for this model and cache, or None where it does not apply: another
        architecture or activation, a module with hooks, a weight the kernels do not take, a
        cache that is not batch-1 preallocated buffers, or kernels that are unavailable. Its
        attention is packed sdpa's (attention.packed_one_query): the engine uses it only for models
        that attend with sdpa (`RunStats.decode_kernel` "c-avx2")."""
        from .kv import PreallocatedLayer

        cfg, dtype = model.config.get_text_config(), model.dtype  # model.dtype scans the parameters: read it once
        if (model.config.model_type not in _FAMILIES or getattr(cfg, "hidden_act", None) != "silu"
                or model.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16)
                or not available() or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())):
            return None
        decoder = getattr(model, "model", None)
        if (decoder is None or type(getattr(model, "lm_head", None)) is not torch.nn.Linear
                or model.lm_head.bias is not None or model.lm_head.weight.dtype != dtype
                or not takes_weight(model.lm_head.weight) or not _plain_norm(decoder.norm, decoder.norm, dtype)
                or len(cache.layers) != len(decoder.layers)):
            return None
        layers = []
        for block, cached in zip(decoder.layers, cache.layers):
            attn, mlp = block.self_attn, block.mlp
            linears = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
                       "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
            norms = {"input_layernorm": block.input_layernorm, "post_attention_layernorm": block.post_attention_layernorm,
                     "q_norm": getattr(attn, "q_norm", None), "k_norm": getattr(attn, "k_norm", None)}
            if (not isinstance(cached, PreallocatedLayer) or cached._keys.shape[0] != 1
                    or not (cached._keys.is_contiguous() and cached._values.is_contiguous())
                    or cached._keys.dtype != dtype or cached._keys.shape != cached._values.shape
                    or any(type(m) is not torch.nn.Linear or m.weight.dtype != dtype
                           or not m.weight.is_contiguous() or not takes_weight(m.weight) for m in linears.values())
                    or any(n is not None and not _plain_norm(n, decoder.norm, dtype) for n in norms.values())):
                return None
            layer = {name: m.weight for name, m in linears.items()}
            layer.update({f"{name}.bias": m.bias.float().contiguous() for name, m in linears.items() if m.bias is not None})
            layer.update({name: n.weight for name, n in norms.items() if n is not None})
            layer.update(keys=cached._keys, values=cached._values, head_stride=cached._keys.stride(1))
            layers.append(layer)
        step = cls(model, cache, layers)
        hidden, heads, kv_heads, head_dim, _, _ = step.shape
        cos, _ = step.rotary(torch.zeros(1, 1, hidden, dtype=dtype), torch.zeros(1, 1, dtype=torch.long))
        if (heads % kv_heads or not takes(heads // kv_heads, head_dim) or hidden % 8 or cos.shape[-1] != head_dim
                or cache.layers[0]._keys.shape[1:] != (kv_heads, cache.layers[0]._keys.shape[2], head_dim)):
            return None  # a partial rotary embedding, or heads the kernels do not take
        return step

    def takes_step(self) -> bool:
        """Whether the next token fits the cache and every layer sees all of it (no sliding window
        shorter than the cache)."""
        held = [layer.keys.shape[-2] for layer in self.cache.layers]
        return all(n < layer._keys.shape[-2] for n, layer in zip(held, self.cache.layers)) and (
            self.window is None or max(held) + 1 <= self.window)

    def __call__(self, token_id: int, position: int) -> torch.Tensor:
        """The next-token logits (1, 1, vocab), in the model's dtype, after writing the token's KV."""
        hidden, heads, kv_heads, head_dim, inter, vocab = self.shape
        x = self.embed[token_id].to(torch.float32, copy=True)  # overwritten by the step
        cos, sin = self.rotary(x.view(1, 1, -1).to(self.dtype), torch.tensor([[position]]))
        cos, sin = cos.float().reshape(-1).contiguous(), sin.float().reshape(-1).contiguous()
        held = [layer.keys.shape[-2] for layer in self.cache.layers]
        self._table[:, -1] = torch.tensor(held)
        logits = torch.empty(vocab, dtype=torch.float32)
        code = _library()[0].pc_decode_step(
            x.data_ptr(), self._table.data_ptr(), len(self.layers), self.norm.data_ptr(), self.lm_head.data_ptr(),
            logits.data_ptr(), cos.data_ptr(), sin.data_ptr(), int(self.dtype == torch.bfloat16), hidden, heads,
            kv_heads, head_dim, inter, vocab, self.eps, self.scale, torch.get_num_threads())
        if code != 0:  # shapes are checked by `for_model`; 2 is a failed allocation in C
            raise MemoryError(f"decode step kernel failed (code {code})")
        for layer, n in zip(self.cache.layers, held):
            layer.advance(n + 1)
        self.steps += 1
        return logits.to(self.dtype).view(1, 1, vocab)


def _plain_norm(norm, final, dtype: torch.dtype) -> bool:
    """An RMSNorm as LlamaRMSNorm computes it, with the final norm's epsilon and a contiguous weight
    of the model's dtype."""
    weight = getattr(norm, "weight", None)
    return (getattr(norm, "variance_epsilon", None) == final.variance_epsilon and isinstance(weight, torch.Tensor)
            and weight.dtype == dtype and weight.is_contiguous())


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library, or None and why not."""
    lib, why = native.load(SOURCE, FLAGS, frozenset({"avx2", "fma"}), "decode kernels (decoding with torch's)")
    if lib is None:
        return None, why
    lib.pc_decode_attention.restype = lib.pc_linear.restype = lib.pc_decode_step.restype = ctypes.c_int
    lib.pc_decode_attention.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_long] * 13
    lib.pc_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_long] * 4
    lib.pc_decode_step.argtypes = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 5
                                   + [ctypes.c_int] + [ctypes.c_long] * 6 + [ctypes.c_double] * 2 + [ctypes.c_long])
    return lib, ""

