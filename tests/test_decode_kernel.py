"""The C decode kernels (decode_kernel.py) against float64 attention and products, their limits,
and their build cache (checksummed, rebuilt when damaged; absent without a compiler). The whole
decode path on them equals transformers' own: tests/test_decode.py."""

from __future__ import annotations

import pytest
import torch

from parallelcomp import decode_kernel, native

from .conftest import tiny_model

# The kernels need an x86-64 CPU with AVX2 and FMA and a C compiler; elsewhere decoding runs torch's
# kernels (tests/test_decode.py covers that path everywhere). tests/test_decode.py::
# test_the_kernels_build_wherever_they_can never skips, so a machine that has both cannot skip these silently.
pytestmark = pytest.mark.skipif(not decode_kernel.available(),
                                reason=f"C decode kernels unavailable: {decode_kernel.unavailable_reason()}")


def _reference(query, key, value, scale):
    scores = torch.einsum("bhgd,bhtd->bhgt", query.double(), key.double()) * scale
    return torch.einsum("bhgt,bhtd->bhgd", scores.softmax(-1), value.double())


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,kv_heads,groups,keys,head_dim,value_dim", [
    (1, 3, 3, 1, 64, 64),       # one key: the output is its value
    (1, 3, 3, 64, 64, 64),      # exactly one block
    (1, 3, 3, 65, 64, 64),      # one key into the second block
    (2, 2, 7, 1000, 128, 128),  # Qwen2.5-0.5B's heads, two batch entries
    (1, 1, 16, 333, 8, 24),     # the limits: 16 rows, 8-wide keys; values narrower than 64
    (1, 4, 1, 5003, 96, 72),    # head sizes that are not a multiple of 16 or 64
])
def test_kernel_equals_float64_attention(monkeypatch, threads, kv_dtype, batch, kv_heads, groups, keys, head_dim,
                                         value_dim):
    """fp32 queries over fp32 or bf16 KV held as views with gaps between heads (as the preallocated
    decode cache holds them) and between rows, split among 1-3 threads; a sharp softmax (scale 1.5
    on unit normals) makes the running max change across blocks and threads."""
    torch.manual_seed(keys)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    query = torch.randn(batch, kv_heads, groups, head_dim)
    key = torch.randn(batch, kv_heads, keys + 9, head_dim + 8).to(kv_dtype)[:, :, 5:keys + 5, 3:head_dim + 3]
    value = (3 * torch.randn(batch, kv_heads + 1, keys, value_dim + 16)).to(kv_dtype)[:, 1:, :, :value_dim]
    assert decode_kernel.supports(query, key, value) and not key.is_contiguous() and not value.is_contiguous()
    out = decode_kernel.attend(query, key, value, scale=1.5)
    assert out.dtype == torch.float32 and out.shape == (batch, kv_heads, groups, value_dim)
    torch.testing.assert_close(out.double(), _reference(query, key, value, 1.5), atol=2e-5, rtol=2e-5)


def test_kernel_output_takes_the_query_dtype_and_default_scale():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 3, 3, 64).bfloat16(), torch.randn(1, 3, 200, 64).bfloat16(), torch.randn(
        1, 3, 200, 64).bfloat16()
    out = decode_kernel.attend(query, key, value)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(query, key, value, 64 ** -0.5).bfloat16().double(),
                               atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", ["float16", "strided rows", "17 groups", "head dim 4", "head dim 260", "cuda-like"])
def test_tensors_outside_the_limits_are_declined(case):
    query, key, value = torch.randn(1, 2, 3, 64), torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    if case == "float16":
        key, value = key.half(), value.half()
    elif case == "strided rows":
        key = torch.randn(1, 2, 10, 128)[..., ::2]
    elif case == "17 groups":
        query = torch.randn(1, 2, 17, 64)
    elif case == "head dim 4":
        query, key, value = query[..., :4], key[..., :4], value[..., :4]
    elif case == "head dim 260":
        query, key, value = (torch.randn(1, 2, n, 260) for n in (3, 10, 10))
    else:
        key = torch.empty(1, 2, 10, 64, device="meta")
    assert not decode_kernel.supports(query, key, value)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows,width", [(1, 8), (3, 576), (130, 576), (1000, 1544)])
def test_linear_equals_float64_product(monkeypatch, threads, bias, rows, width):
    """One row against weight views with gaps between rows (stride > width), row counts that are
    not multiples of the kernel's 4-row groups, large enough to be split among threads."""
    torch.manual_seed(rows)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    weight = torch.randn(rows, width + 8)[:, 8:]
    b = torch.randn(rows) if bias else None
    x = torch.randn(1, 1, width)
    assert decode_kernel.takes_linear(x, weight) and weight.stride(0) == width + 8
    out = decode_kernel.linear(x, weight, b)
    ref = x.double().reshape(-1) @ weight.double().T + (b.double() if bias else 0)
    assert out.shape == (1, 1, rows) and out.dtype == torch.float32
    # fp32 sums of up to 1,544 products of unit normals (~40 in size): torch's own GEMV errs as much
    torch.testing.assert_close(out.double().reshape(-1), ref, atol=5e-5, rtol=1e-5)


def test_linear_in_bf16_rounds_once():
    """bf16 weights and row: fp32 accumulation, one rounding to bf16 at the end."""
    torch.manual_seed(0)
    weight, x = torch.randn(300, 576).bfloat16(), torch.randn(1, 576).bfloat16()
    out = decode_kernel.linear(x, weight)
    ref = (x.double() @ weight.double().T).reshape(-1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().reshape(-1), ref.bfloat16().double(), atol=1e-4, rtol=2 ** -7)


@pytest.mark.parametrize("case", ["two rows", "float16", "mixed dtypes", "width 12", "strided columns"])
def test_products_outside_the_limits_are_declined(case):
    x, weight = torch.randn(1, 64), torch.randn(32, 64)
    if case == "two rows":
        x = torch.randn(2, 64)
    elif case == "float16":
        x, weight = x.half(), weight.half()
    elif case == "mixed dtypes":
        weight = weight.bfloat16()
    elif case == "width 12":
        x, weight = x[:, :12], weight[:, :12].contiguous()
    else:
        weight = torch.randn(32, 128)[:, ::2]
    assert not decode_kernel.takes_linear(x, weight)


def test_one_row_linears_route_only_one_row_inputs_and_restore_the_modules(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 16, bias=False))
    calls, linear = [], decode_kernel.linear
    monkeypatch.setattr(decode_kernel, "linear", lambda *a: calls.append(a[1].shape) or linear(*a))
    one, many = torch.randn(1, 1, 64), torch.randn(3, 64)
    with torch.inference_mode():
        ref_one, ref_many = model(one), model(many)
        with decode_kernel.one_row_linears(model):
            got_one, got_many = model(one), model(many)
    assert calls == [(40, 64), (16, 40)]  # the one-row input only, through both layers
    torch.testing.assert_close(got_one, ref_one, atol=1e-6, rtol=1e-5)
    assert torch.equal(got_many, ref_many)  # torch's own product, untouched
    assert all("forward" not in m.__dict__ for m in model)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache directory and no library loaded yet in this process."""
    monkeypatch.setenv("PARALLELCOMP_CACHE", str(tmp_path))
    decode_kernel._library.cache_clear()
    yield tmp_path
    decode_kernel._library.cache_clear()


def test_a_damaged_library_is_rebuilt_never_loaded(fresh_build):
    path = native.build(decode_kernel.SOURCE, decode_kernel.FLAGS)
    digest = path.with_suffix(".sha256").read_text()
    assert path.parent == fresh_build / "kernels" and digest == native._sha256(path)
    path.write_bytes(path.read_bytes()[:1000])  # truncated: its checksum no longer matches
    assert native.build(decode_kernel.SOURCE, decode_kernel.FLAGS) == path and native._sha256(path) == digest
    assert decode_kernel.available()


def test_without_a_compiler_decoding_keeps_torch(fresh_build, monkeypatch, tokenizer, make_engine):
    monkeypatch.setenv("CC", "no-such-compiler")
    assert not decode_kernel.available()
    assert not decode_kernel.supports(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64))
    engine = make_engine(model=tiny_model("llama", len(tokenizer)), chunk_tokens=100)
    out = engine.generate("What is the capital of France?", documents=["Paris is the capital of France. " * 5],
                          max_new_tokens=3)
    assert out.stats.decode_kernel == "torch"


def _decode(model, whole: bool, steps: int = 8, prompt: int = 40):
    """Prefill a random prompt, then feed `steps` fixed tokens one at a time, through the model's
    modules on the C kernels or whole (DecodeStep); returns each step's logits and the cache."""
    from transformers import DynamicCache

    from parallelcomp import kv as kvops
    from parallelcomp.compat import forward
    from parallelcomp.decode import one_token_steps

    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt + steps))
    with torch.inference_mode(), one_token_steps(model, True):
        prefilled = DynamicCache()
        forward(model, ids[:, :prompt], prefilled, torch.arange(prompt)[None])
        cache = kvops.decode_cache([kvops.from_cache(prefilled)], steps)
        step = decode_kernel.DecodeStep.for_model(model, cache) if whole else None
        assert (step is not None) == whole
        logits = []
        for i in range(prompt, prompt + steps):
            if whole:
                assert step.takes_step()
                logits.append(step(int(ids[0, i]), i))
            else:
                logits.append(forward(model, ids[:, i : i + 1], cache, torch.tensor([[i]])))
        assert not whole or (step.steps == steps and not step.takes_step())  # full: the next token would not fit
    return torch.cat(logits), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family,options", [("llama", {}), ("llama", dict(attention_bias=True, mlp_bias=True)),
                                            ("mistral", {}), ("qwen2", {}), ("qwen3", {})])
def test_whole_step_equals_the_modules(tokenizer, family, options, dtype):
    """The one-call step computes what the model's modules compute: fp32 up to summation order; in
    bf16 with transformers' roundings, so that nearly every logit and every cached key and value is
    the same bf16 number. (The engine-level comparison with transformers' own sdpa path is
    tests/test_decode.py.)"""
    model = tiny_model(family, len(tokenizer), **options)
    with torch.no_grad():  # initialised to 0 and 1, where a bias or norm weight left out would go unseen
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.normal_(1.0, 0.3)
    model = model.to(dtype)
    (got, got_cache), (ref, ref_cache) = _decode(model, True), _decode(model, False)
    assert got.dtype == ref.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    else:
        # bit for bit here for llama, mistral and qwen3; qwen2 differs in one of its 8 steps, by one
        # bf16 step at the logits' scale (an fp32 sum in another order, rounded the other way)
        assert (got == ref).float().mean() > 0.95, "bf16 roundings differ from the modules'"
        torch.testing.assert_close(got, ref, atol=float(ref.abs().max()) * 2 ** -7, rtol=0)
    for a, b in zip(got_cache.layers, ref_cache.layers):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=2 ** -7)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=2 ** -7)


def test_whole_step_declines_what_it_does_not_compute(tokenizer):
    from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM

    from parallelcomp import kv as kvops

    llama = tiny_model("llama", len(tokenizer))
    cache = kvops.decode_cache([[(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))] * 3], 4)
    assert decode_kernel.DecodeStep.for_model(llama, cache) is not None
    assert decode_kernel.DecodeStep.for_model(llama, DynamicCache()) is None  # not preallocated
    gelu = tiny_model("llama", len(tokenizer), hidden_act="gelu")
    assert decode_kernel.DecodeStep.for_model(gelu, cache) is None
    hooked = tiny_model("llama", len(tokenizer))
    hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert decode_kernel.DecodeStep.for_model(hooked, cache) is None
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, intermediate_size=128))
    neox.config._attn_implementation = "sdpa"
    assert decode_kernel.DecodeStep.for_model(neox, cache) is None
    # a sliding window shorter than the cache: that step runs through the modules, which mask
    windowed = tiny_model("mistral", len(tokenizer), sliding_window=5)
    step = decode_kernel.DecodeStep.for_model(windowed, cache)
    assert step is not None and not step.takes_step()
    assert decode_kernel.DecodeStep.for_model(tiny_model("mistral", len(tokenizer), sliding_window=6), cache).takes_step()
