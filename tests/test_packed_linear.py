"""packed_linear.py: a bf16 model's linear layers on weights packed once for oneDNN give torch's
own bits at any row count, follow a weight that changes, stay plain where the bits would differ,
and leave the model as it was after a call."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from parallelcomp import decode_kernel, hardware, layer_kernel, packed_linear

from .conftest import tiny_model

# Where the CPU has native bf16 (the embedded model's default dtype there), test_packing_runs_
# wherever_the_cpu_has_native_bf16 never skips, so such a machine cannot skip these silently.
needs_packing = pytest.mark.skipif(not packed_linear.supported(),
                                   reason=f"no packed bf16 linear here: {packed_linear.unsupported_reason()}")

ROWS = (1, 2, 31, 33, 300, 2049)


def test_packing_runs_wherever_the_cpu_has_native_bf16():
    """On an x86-64 CPU with AVX-512 BF16 or AMX, where the engine runs bf16 models, torch's oneDNN
    packs bf16 weights: the tests below must not skip there."""
    native = platform.machine() in ("x86_64", "AMD64") and bool({"avx512_bf16", "amx_bf16"} & hardware.cpu_flags())
    assert packed_linear.supported() or not native, packed_linear.unsupported_reason()


def _linear(n: int, k: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(torch.bfloat16)


@pytest.fixture
def calls(monkeypatch):
    """Counts the packed linear's calls (so a test knows the packed path ran), on fresh caches."""
    counted, op = [], packed_linear.mkldnn_packed_linear
    monkeypatch.setattr(packed_linear, "mkldnn_packed_linear", lambda *a: counted.append(a[0].shape) or op(*a))
    monkeypatch.setattr(packed_linear, "_packs", type(packed_linear._packs)())
    monkeypatch.setattr(packed_linear, "_checked", {})
    return counted


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_gives_torchs_bits_at_any_row_count(calls, bias):
    module = _linear(96, 64, bias)
    with torch.inference_mode():
        for rows in ROWS:
            for x in (torch.randn(rows, 64), torch.randn(2, rows, 64)):  # 2-D and a batch
                x = x.to(torch.bfloat16)
                assert torch.equal(packed_linear._forward(module, x), nn.functional.linear(x, module.weight, module.bias))
    assert packed_linear.packed(module) is not None
    assert len(calls) == 2 * len(ROWS) + len(packed_linear.PROBE_ROWS)  # every call packed, after the probes


@needs_packing
def test_a_weight_changed_after_packing_is_packed_again(calls):
    module = _linear(48, 32, True)
    x = torch.randn(5, 32).to(torch.bfloat16)
    with torch.inference_mode():
        first = packed_linear._forward(module, x)
    with torch.no_grad():
        module.weight.mul_(-2)  # in place: the version counter moves
    with torch.inference_mode():
        assert torch.equal(packed_linear._forward(module, x), nn.functional.linear(x, module.weight, module.bias))
    module.weight = nn.Parameter(torch.randn(48, 32).to(torch.bfloat16))  # a new tensor
    with torch.inference_mode():
        got = packed_linear._forward(module, x)
        assert torch.equal(got, nn.functional.linear(x, module.weight, module.bias)) and not torch.equal(got, first)


@needs_packing
def test_weights_of_a_shape_whose_bits_differ_stay_plain(monkeypatch):
    op = packed_linear.mkldnn_packed_linear
    monkeypatch.setattr(packed_linear, "mkldnn_packed_linear", lambda *a: op(*a) * 2)  # other bits
    monkeypatch.setattr(packed_linear, "_packs", type(packed_linear._packs)())
    monkeypatch.setattr(packed_linear, "_checked", {})
    model = tiny_model("llama", 512).to(torch.bfloat16)
    found = packed_linear.modules(model)
    assert found and packed_linear.nbytes(found) == 0
    module, x = found[0][0], torch.randn(3, found[0][0].in_features).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed_linear._forward(module, x), nn.functional.linear(x, module.weight, module.bias))


@needs_packing
def test_a_weight_onednn_refuses_runs_plain_and_its_shape_is_not_packed_again(monkeypatch):
    tried = []

    def refuse(weight, rows):
        tried.append(weight.shape)
        raise RuntimeError("mkldnn: unsupported weight")  # as oneDNN reports a layout it does not take

    monkeypatch.setattr(packed_linear, "mkldnn_pack_linear_weight", refuse)
    monkeypatch.setattr(packed_linear, "_packs", type(packed_linear._packs)())
    monkeypatch.setattr(packed_linear, "_checked", {})
    model = tiny_model("llama", 512).to(torch.bfloat16)
    found = packed_linear.modules(model)  # no exception: every module stays plain
    assert found and packed_linear.nbytes(found) == 0 and len(tried) == len(found)
    module, x = found[0][0], torch.randn(3, found[0][0].in_features).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed_linear._forward(module, x), nn.functional.linear(x, module.weight, module.bias))
    packed_linear._checked[packed_linear._shape(module)] = False  # a shape whose bits differed
    with torch.no_grad():
        module.weight.mul_(2)  # a changed weight: packed again, unless its shape is known to differ
    tried.clear()
    assert packed_linear.packed(module) is None and tried == []  # no reorder for a shape that stays plain


@needs_packing
def test_an_engine_with_packed_weights_answers_as_one_without_them(calls, tokenizer, make_engine):
    model = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [f"Document {i}: the code word of crate {i} is {i * 7919 % 1000}. " * 30 for i in range(6)]
    outs = {}
    for pack in (False, True):
        calls.clear()
        pc = make_engine(model=model, pack_weights=pack, chunk_tokens=256, keep_chunks=2, kv_store_bytes=0)
        outs[pack] = pc.generate("What is the code word of crate 3?", documents=docs, max_new_tokens=12)
        assert bool(calls) == pack  # the packed path ran only where asked
        assert all("forward" not in vars(m) for m in model.modules())  # vanilla again after the call
    head = model.get_output_embeddings()
    projections = sum(m.weight.numel() * 2 for m in model.modules() if type(m) is nn.Linear and m is not head)
    assert outs[True].stats.packed_weight_bytes == projections and outs[False].stats.packed_weight_bytes == 0
    assert outs[True].text == outs[False].text
    assert [(c.score, c.kept) for c in outs[True].chunks] == [(c.score, c.kept) for c in outs[False].chunks]


@needs_packing
@pytest.mark.skipif(not decode_kernel.available(),
                    reason=f"C decode kernels unavailable: {decode_kernel.unavailable_reason()}")
def test_one_row_linears_take_one_row_from_a_packed_linear_and_hand_it_back(calls, monkeypatch):
    model = tiny_model("llama", 512).to(torch.bfloat16)
    found = packed_linear.modules(model)
    one_row, linear = [], decode_kernel.linear
    monkeypatch.setattr(decode_kernel, "linear", lambda *a: one_row.append(a[1].shape) or linear(*a))
    module = found[0][0]
    one, many = torch.randn(1, 1, module.in_features), torch.randn(4, module.in_features)
    with torch.inference_mode(), layer_kernel.fused(found):
        with decode_kernel.one_row_linears(model):
            module(one.to(torch.bfloat16))
            calls.clear()
            module(many.to(torch.bfloat16))
        assert one_row == [module.weight.shape] and calls == [(4, module.in_features)]
        assert all(packed_linear.is_forward(m) for m, _ in found)  # the packed forwards again
    assert all("forward" not in vars(m) for m in model.modules())
