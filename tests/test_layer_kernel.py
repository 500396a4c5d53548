"""The layer kernels (layer_kernel.py) against transformers' own modules and float64, which modules
they take over, and the engine on them against the engine on torch's modules."""

from __future__ import annotations

import os
import platform
import shutil

import pytest
import torch
import transformers
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from parallelcomp import ParallelComp, ParallelCompConfig, hardware, layer_kernel, native

from .conftest import FAMILIES, tiny_model
from .test_core import text

# The kernels need an x86-64 CPU with AVX-512 BF16 and a C compiler; elsewhere the model's own
# modules run, which the rest of the suite covers. test_the_kernels_build_wherever_they_can never
# skips, so such a machine cannot skip these silently.
needs_kernel = pytest.mark.skipif(
    not layer_kernel.available(),
    reason="the layer kernels need an x86-64 CPU with AVX-512 BF16 and a C compiler; "
           f"here: {layer_kernel.unavailable_reason()}")

ULP = 2**-7  # one bf16 unit in the last place, relative


def test_the_kernels_build_wherever_they_can():
    prerequisites = (platform.machine() in ("x86_64", "AMD64") and layer_kernel.CPU_FLAGS <= hardware.cpu_flags()
                     and shutil.which(os.environ.get("CC", "cc")) is not None)
    assert layer_kernel.available() == prerequisites, layer_kernel.unavailable_reason()


def _differences(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of want's bf16 ulp, where they differ."""
    diff = (got.double() - want.double()).abs()
    ulp = want.double().abs().clamp_min(2**-126) * ULP
    return (diff / ulp)[got != want]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows,n", [(4180, 576), (1, 576), (37, 70), (3, 4096), (50, 16), (9, 5)])
def test_rms_norm_equals_transformers_to_a_rounding(monkeypatch, threads, rows, n):
    """LlamaRMSNorm in bf16 against the kernel: equal except where the order of the fp32 sum of
    squares moves a rounding, by one bf16 ulp in at most 1 value in 10,000 (measured: 7 of 2.4
    million). Both are as close to float64 as each other. Row lengths that are not a multiple of
    16 exercise the masked tails; one row is decode's case."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(rows + n)
    norm = LlamaRMSNorm(n, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(n).to(torch.bfloat16)
    x = (torch.randn(rows, n) * torch.logspace(-3, 3, rows)[:, None]).to(torch.bfloat16)
    got, want = layer_kernel.rms_norm(x, norm.weight, 1e-5), norm(x)
    off = _differences(got, want)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert off.numel() <= max(1, want.numel() // 10_000) and (off <= 1.01).all(), off
    exact = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * norm.weight.double()
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * 1.01 + 1e-30


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("count", [6_420_480, 65_536, 16_385, 15, 1])
def test_silu_mul_equals_eager_torch(monkeypatch, threads, count):
    """silu(gate) * up in bf16, eager torch against the kernel, bit for bit: over values from 1e-3
    to 1e3 in size, the edges (±inf, nan, ±0, the largest and smallest bf16) and, at 65,536, every
    bf16 bit pattern once as a gate (so every entry of the kernel's SiLU table)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(count)
    if count == 2**16:  # every int16, so every bf16 bit pattern, once, in random order
        gate = (torch.randperm(count) - 2**15).to(torch.int16).view(torch.bfloat16)
    else:
        gate = (torch.randn(count) * torch.logspace(-3, 3, count)).to(torch.bfloat16)
        edges = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 3.3895e38, -3.3895e38, 1e-38, -88.0, 89.0],
                             dtype=torch.bfloat16)
        gate[: min(count, len(edges))] = edges[: min(count, len(edges))]
    up = torch.randn(count).to(torch.bfloat16)
    got, want = layer_kernel.silu_mul(gate, up), nn.functional.silu(gate) * up
    assert got.isnan().equal(want.isnan())
    assert got[~want.isnan()].view(torch.int16).equal(want[~want.isnan()].view(torch.int16))


_GUARDED = r"""
import ctypes, mmap, sys, torch
sys.path.insert(0, sys.argv[1])
from parallelcomp import layer_kernel
page = mmap.PAGESIZE


def guarded(n):  # n bf16 values (zero) whose storage ends right before a page the process may not read
    buf = mmap.mmap(-1, 4 * page + 2 * n)
    end = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + len(buf) - page
    end -= end % page
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(end), page, 0) == 0
    base = end - ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return buf, torch.frombuffer(buf, dtype=torch.bfloat16, count=n, offset=base - 2 * n)


held = []
for rows, n in ((3, 70), (1, 5), (2, 576), (7, 17)):  # row lengths past whole vectors, one short row
    bx, x = guarded(rows * n)
    bw, w = guarded(n)
    w.fill_(1.0)
    assert torch.isfinite(layer_kernel.rms_norm(x.view(rows, n), w, 1e-5).float()).all()
    held += [bx, bw]
for count in (1, 15, 16, 4097, 16385 + 3):  # one value, a partial vector, past a parallel span
    bg, g = guarded(count)
    bu, u = guarded(count)
    assert torch.isfinite(layer_kernel.silu_mul(g, u).float()).all()
    held += [bg, bu]
print("read nothing past the inputs")
"""


@needs_kernel
def test_the_kernels_read_nothing_past_their_inputs():
    """Inputs whose storage ends right before a page the process may not read (the AMX kernel once
    read past its keys; tests/test_attention_kernel.py): the masked tails must stop at the last
    value. In a subprocess, so that a fault fails this test instead of ending the run."""
    import subprocess
    import sys

    core = os.path.dirname(os.path.dirname(layer_kernel.__file__))
    run = subprocess.run([sys.executable, "-c", _GUARDED, core], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "read nothing past the inputs" in run.stdout, (run.returncode, run.stderr[-2000:])


def rope_hooks(model) -> list[nn.Module]:
    """The function modules through which `model`'s attention modules call apply_rotary_pos_emb
    (the `kernels` package's per-module hooks; none without that package)."""
    return [f for m in model.modules() for f in vars(m).get("_kernel_funcs", {}).values()]


def test_the_kernels_take_the_llama_formula_in_each_family_and_nothing_else(tokenizer):
    """Every RMSNorm (Qwen3's per-head q_norm and k_norm too), every SwiGLU MLP and every attention's
    rotary-embedding hook of the Llama, Mistral, Qwen2 and Qwen3 families is taken; Gemma's RMSNorm
    (x · (1 + weight)) and its GELU gate are not (its rotary embedding, Llama's formula, is), nor
    an MLP whose act_fn is not a SiLU, nor anything of an fp32 model."""
    if not layer_kernel.available():
        assert layer_kernel.modules(tiny_model("llama", 512).to(torch.bfloat16)) == []
        return
    for family in FAMILIES:
        model = tiny_model(family, 512).to(torch.bfloat16)
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        mlps = [m for m in model.modules() if type(m).__name__.endswith("MLP")]
        ropes = rope_hooks(model)
        assert len(ropes) in (0, model.config.num_hidden_layers)
        taken = [m for m, _ in layer_kernel.modules(model)]
        assert len(taken) == len(norms) + len(mlps) + len(ropes)
        assert {id(m) for m in taken} == {id(m) for m in norms + mlps + ropes}
        assert len(norms) == (4 if family == "qwen3" else 2) * 3 + 1, family
        assert layer_kernel.modules(tiny_model(family, 512)) == []  # fp32
    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    gemma = gemma.to(torch.bfloat16)
    assert {id(m) for m, _ in layer_kernel.modules(gemma)} == {id(m) for m in rope_hooks(gemma)}
    model = tiny_model("llama", 512, hidden_act="gelu").to(torch.bfloat16)
    assert {type(m) for m, _ in layer_kernel.modules(model)} - {type(f) for f in rope_hooks(model)} == {LlamaRMSNorm}


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,cos_batch", [(2, 9, 3, 37, 64, 2), (1, 4, 4, 5, 128, 1),
                                                                         (3, 2, 1, 16, 32, 1)])
def test_rope_equals_transformers_bit_for_bit(monkeypatch, threads, batch, heads, kv_heads, length, dim, cos_batch):
    """transformers' apply_rotary_pos_emb on q and k laid out as the attention lays them out (a
    transposed view of the projection), with cos and sin of a rotary embedding per row or one row
    for the batch: the kernel gives the same bf16 values and the same strides."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(dim + length)
    q = (torch.randn(batch, length, heads * dim, generator=g) * 4).to(torch.bfloat16)
    k = (torch.randn(batch, length, kv_heads * dim, generator=g) * 4).to(torch.bfloat16)
    q = q.view(batch, length, heads, dim).transpose(1, 2)
    k = k.view(batch, length, kv_heads, dim).transpose(1, 2)
    angles = torch.randint(0, 8192, (cos_batch, length, 1), generator=g) / (10000 ** (torch.arange(dim) % (dim // 2)
                                                                                        * 2 / dim))
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = layer_kernel.rope(q, cos, sin), layer_kernel.rope(k, cos, sin)
    assert got_q.equal(want_q) and got_k.equal(want_k)
    assert got_q.stride() == q.stride() and got_k.stride() == k.stride()


@needs_kernel
def test_a_model_with_only_the_rotary_kernel_gives_its_own_logits_bit_for_bit(family):
    """With head sizes the rotary kernel takes (32), a bf16 model whose attention modules' rotary
    hooks alone are on the kernel gives exactly its own logits, and the kernel ran in every layer."""
    model = tiny_model(family, 512, head_dim=32).to(torch.bfloat16)
    hooks = rope_hooks(model)
    if not hooks:
        pytest.skip(f"transformers {transformers.__version__} calls apply_rotary_pos_emb through no per-module hook "
                    "(the `kernels` package's `_kernel_funcs`, which 5.24 has and 5.21 lacks), so RoPE runs in "
                    "torch there and there is no kernel to compare")
    found = [(m, f) for m, f in layer_kernel.modules(model) if m in hooks]
    assert len(found) == len(hooks)  # a hook that exists but is not taken is a failure, not a skip
    ids = torch.randint(512, (2, 40), generator=torch.Generator().manual_seed(2))
    calls = []
    real = layer_kernel.rope
    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(layer_kernel, "rope", lambda *a: calls.append(a[0].shape) or real(*a))
        before = model(ids).logits
        with layer_kernel.fused(found):
            inside = model(ids).logits
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert inside.equal(before)


@needs_kernel
def test_a_model_inside_the_block_equals_it_outside_to_a_rounding_and_is_restored(family):
    """Logits of a bf16 tiny model with its layers on the kernels agree with its own forward to
    bf16 rounding; after the block (and after an exception in it) no module keeps the kernels'
    forward, and the model's output is bit for bit what it was."""
    model = tiny_model(family, 512).to(torch.bfloat16)
    ids = torch.randint(512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids).logits
        found = layer_kernel.modules(model)
        with layer_kernel.fused(found):
            assert all("forward" in vars(m) for m, _ in found)
            inside = model(ids).logits
        with pytest.raises(KeyError), layer_kernel.fused(found):
            raise KeyError("out of the block")
        after = model(ids).logits
    assert not any("forward" in vars(m) for m in model.modules())
    assert after.equal(before)
    assert (inside.float() - before.float()).abs().max() <= 0.05 * before.float().abs().max()


@needs_kernel
def test_inputs_the_kernels_do_not_take_go_to_the_modules_own_forward():
    """fp32 rows, a strided view, or rows whose length is not the weight's: the module's own forward
    runs (and raises its own error where it would), never the kernel on memory it does not own."""
    model = tiny_model("llama", 512).to(torch.bfloat16)
    found = dict((type(m).__name__, (m, f)) for m, f in layer_kernel.modules(model))
    norm, forward = found["LlamaRMSNorm"]
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.inference_mode():
        assert forward(norm, x.float()).equal(type(norm).forward(norm, x.float()))
        strided = torch.randn(64, 3).to(torch.bfloat16).t()
        assert forward(norm, strided).equal(type(norm).forward(norm, strided))
        with pytest.raises(RuntimeError, match="size of tensor"):
            forward(norm, torch.randn(3, 65).to(torch.bfloat16))


@needs_kernel
def test_a_forward_set_by_someone_else_or_an_enclosing_block_is_kept():
    """A module whose instance already has a forward (a hook library's, such as accelerate's) keeps
    it inside the block and after; a nested block leaves the enclosing block's forwards in place."""
    model = tiny_model("llama", 512).to(torch.bfloat16)
    found = layer_kernel.modules(model)
    (theirs, _), (other, _) = found[0], found[1]
    hooked = theirs.forward = lambda x: x
    with layer_kernel.fused(found):
        assert theirs.forward is hooked and "forward" in vars(other)
        with layer_kernel.fused(found):
            pass
        assert "forward" in vars(other)
    assert theirs.forward is hooked and "forward" not in vars(other)


@needs_kernel
def test_the_engine_on_the_kernels_keeps_what_it_keeps_on_torch(tokenizer, monkeypatch, tmp_path):
    """A bf16 run with layer_kernel "auto" against "torch": the same kept chunks and scores to
    bf16 rounding; the kernels ran (both of them, in phase 1, phase 2 and decoding); the stats
    say which ran; KV made on the kernels is stored under its own identity, so the "torch" engine
    does not reuse it from the disk tier they share, and a second "auto" engine does."""
    calls = []
    for name in ("rms_norm", "silu_mul"):
        real = getattr(layer_kernel, name)
        monkeypatch.setattr(layer_kernel, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    model = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [text(10 + i, n) for i, n in enumerate([30, 12, 25, 33, 18])]
    outs, ran = {}, {}
    for choice in ("auto", "torch", "auto again"):
        calls.clear()
        config = ParallelCompConfig(keep_chunks=2, chunk_tokens=36, layer_kernel=choice.split()[0],
                                    decode_kernel="torch", kv_store_dir=tmp_path)
        outs[choice] = ParallelComp(model, tokenizer, config).generate("Where is the copper garden?", documents=docs,
                                                                       max_new_tokens=4)
        ran[choice] = {name: calls.count(name) for name in ("rms_norm", "silu_mul")}
    layers = model.config.num_hidden_layers
    assert ran["auto"]["rms_norm"] >= 2 * layers + 1 and ran["auto"]["silu_mul"] >= layers
    assert ran["torch"] == {"rms_norm": 0, "silu_mul": 0}
    assert outs["auto again"].stats.reused_chunks == len(docs) and outs["torch"].stats.reused_chunks == 0
    assert outs["auto again"].token_ids == outs["auto"].token_ids
    assert outs["auto"].stats.layer_kernel == layer_kernel.NAME and outs["torch"].stats.layer_kernel == "torch"
    assert [c.kept for c in outs["auto"].chunks] == [c.kept for c in outs["torch"].chunks]
    assert [c.score for c in outs["auto"].chunks] == pytest.approx([c.score for c in outs["torch"].chunks], abs=0.05)


@needs_kernel
def test_kv_made_by_another_version_of_a_kernel_is_recomputed(tokenizer, monkeypatch, tmp_path):
    """Stored chunk KV names each C kernel that made it with its source's digest: after the kernel
    changes (its rounding may), a disk tier written before misses instead of serving old KV."""
    model = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [text(10 + i, n) for i, n in enumerate([30, 12, 25])]
    config = ParallelCompConfig(keep_chunks=1, chunk_tokens=36, kv_store_dir=tmp_path)
    first = ParallelComp(model, tokenizer, config)
    assert first._model_identity()[0]["layers"] == f"{layer_kernel.NAME}@{native.source_digest(layer_kernel.SOURCE)}"
    first.generate("Where?", documents=docs, max_new_tokens=1)
    assert ParallelComp(model, tokenizer, config).generate("Where?", documents=docs,
                                                           max_new_tokens=1).stats.reused_chunks == len(docs)
    monkeypatch.setattr(native, "source_digest", lambda source: "0123456789ab")
    assert ParallelComp(model, tokenizer, config).generate("Where?", documents=docs,
                                                           max_new_tokens=1).stats.reused_chunks == 0


def test_an_fp32_model_keeps_its_own_modules(tokenizer):
    pc = ParallelComp(tiny_model("llama", len(tokenizer)), tokenizer, ParallelCompConfig())
    assert pc.layer_kernel == "torch"
    out = pc.generate("Where?", documents=[text(1, 20)], max_new_tokens=2)
    assert out.stats.layer_kernel == "torch"
    assert not any("forward" in vars(m) for m in pc.model.modules())
