"""The AMX attention kernel (attention_kernel.py) against float64 attention, phase 1 and phase 2
on it against the fp32 model, the question step on it, and how `attention_kernel` is chosen or
refused."""

from __future__ import annotations

import collections
import os
import platform
import shutil
import threading

import pytest
import torch

from safetensors import safe_open

from parallelcomp import ParallelComp, ParallelCompConfig, attention, attention_kernel, decode, hardware
from parallelcomp import engine as engine_module
from parallelcomp import kv as kvops
from parallelcomp.chunking import Chunk
from parallelcomp.errors import ConfigError
from parallelcomp.prefill import encode_chunks, encode_prefix, question_nll
from parallelcomp.prompts import build_prompt

from .conftest import tiny_model
from .test_core import ids_of, text, two_phase_nll

# The kernel needs an x86-64 CPU with AVX-512 BF16 and DQ (Intel Xeon since Cooper Lake, AMD since Zen 4) and a C
# compiler, its "amx" build (and `linear`) AMX too (Intel Xeon since Sapphire Rapids); elsewhere phases 1 and 2
# attend on torch's kernels, which the rest of the suite covers. test_the_kernel_builds_wherever_it_can never
# skips, so such a machine cannot skip these silently.
needs_kernel = pytest.mark.skipif(
    not attention_kernel.available(),
    reason="the attention kernel needs an x86-64 CPU with AVX-512 BF16 and DQ and a C compiler; here: "
           f"{attention_kernel.unavailable_reason()}")
needs_amx = pytest.mark.skipif(
    not attention_kernel.linear_available(),
    reason="the AMX linear needs an x86-64 CPU with AMX, a C compiler and Linux's permission for the tile state; "
           f"here: {attention_kernel.unavailable_reason('amx')}")


def test_the_kernel_builds_wherever_it_can():
    """On an x86-64 CPU with the AVX-512 flags and a C compiler on PATH it must build and load, and
    where the CPU has AMX too, its "amx" build, with Linux's permission to use the tiles."""
    flags = hardware.cpu_flags()
    builds = platform.machine() in ("x86_64", "AMD64") and shutil.which(os.environ.get("CC", "cc")) is not None
    assert attention_kernel.available() == (builds and attention_kernel.BUILDS["avx512"][1] <= flags), \
        attention_kernel.unavailable_reason()
    amx = builds and attention_kernel.BUILDS["amx"][1] <= flags
    assert attention_kernel.name() == ("amx" if amx else "avx512" if attention_kernel.available() else "")
    assert attention_kernel.linear_available() == amx


def _reference(query, key, value, scale, causal):
    """float64 softmax attention, key head h // G for query head h, and the log-sum-exps."""
    g = query.shape[1] // key.shape[1]
    k, v = (t.double().repeat_interleave(g, dim=1) for t in (key, value))
    scores = query.double() @ k.transpose(-1, -2) * scale
    if causal:
        m, t = scores.shape[-2:]
        scores.masked_fill_(torch.ones(m, t, dtype=torch.bool).tril(t - m).logical_not(), float("-inf"))
    return scores.softmax(-1) @ v, scores.logsumexp(-1)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch,heads,kv_heads,rows,keys,head_dim,value_dim,causal", [
    (1, 3, 3, 60, 2048, 64, 64, False),    # phase 2: SmolLM2's packed question rows over one chunk
    (1, 3, 3, 60, 2111, 64, 64, False),    # keys past the last full block
    (2, 9, 3, 300, 300, 64, 64, True),     # phase 1: SmolLM2's heads, causal, two rows
    (1, 4, 2, 77, 130, 128, 128, True),    # fewer queries than keys: the mask aligned bottom-right
    (1, 2, 1, 5, 3, 32, 64, False),        # fewer keys than a block, head sizes at their minimum
    (1, 14, 2, 40, 40, 64, 64, True),      # Qwen2.5-0.5B's 7 query heads per KV head
    (1, 2, 2, 17, 700, 256, 256, False),   # the largest heads it takes; one row past a query block
])
def test_kernel_equals_float64_attention(monkeypatch, threads, batch, heads, kv_heads, rows, keys, head_dim,
                                         value_dim, causal):
    """bf16 queries, keys and values, the keys and values as views of transformers' (B, T, H, D)
    layout; a sharp softmax (scale 1.5 on unit normals) moves the running maximum across blocks.
    The kernel rounds its probabilities and output to bf16 as torch's fused kernel does, so its
    error may be at most torch's plus a bf16 rounding of the output."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    query = torch.randn(batch, rows, heads, head_dim).to(torch.bfloat16).transpose(1, 2)
    key = torch.randn(batch, keys, kv_heads, head_dim).to(torch.bfloat16).transpose(1, 2)
    value = torch.randn(batch, keys, kv_heads, value_dim).to(torch.bfloat16).transpose(1, 2)
    scale = 1.5 / head_dim**0.5
    assert attention_kernel.takes(query, key, value)
    out, lse = attention_kernel.attend(query, key, value, scale, causal=causal)
    ref, ref_lse = _reference(query, key, value, scale, causal)
    mask = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows) if causal else None
    torch_out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                                 enable_gqa=True)
    error, torch_error = ((o.double() - ref).abs().max().item() for o in (out, torch_out))
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert error <= torch_error + 2**-8 * ref.abs().max().item(), (error, torch_error)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous()  # transformers' layout


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads,kv_heads,rows,keys,head_dim,value_dim", [
    (3, 3, 300, 300, 64, 64),     # 19 query blocks a head, so one is left unpaired
    (2, 2, 77, 130, 128, 128),    # fewer queries than keys; a partial last query block
    (1, 1, 40, 40, 64, 256),      # the widest values: eight pairs of value tiles per block pair
    (9, 3, 300, 300, 64, 64),     # SmolLM2's heads: pairs across the query heads of a KV head
])
def test_causal_query_blocks_in_pairs_keep_each_blocks_bits(monkeypatch, threads, heads, kv_heads, rows, keys,
                                                            head_dim, value_dim):
    """Phase 1 attends two query blocks at a time, each key and value tile loaded once for both
    (pair_scores, pair_values); each block's sums are the same, in the same order, as alone. So a
    causal call over all rows equals, bit for bit, one call per block of 16 query rows over the keys
    that block sees, output and log-sum-exps (checked to fail when the pairs add the value tiles in
    another order). With one query head per KV head such a call is a single block, attended alone;
    with three, the blocks of its heads pair with each other instead."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(rows)
    query = torch.randn(1, rows, heads, head_dim).to(torch.bfloat16).transpose(1, 2)
    key = torch.randn(1, keys, kv_heads, head_dim).to(torch.bfloat16).transpose(1, 2)
    value = torch.randn(1, keys, kv_heads, value_dim).to(torch.bfloat16).transpose(1, 2)
    scale = 1.5 / head_dim**0.5
    out, lse = attention_kernel.attend(query, key, value, scale, causal=True)
    for m0 in range(0, rows, 16):
        m1, seen = min(m0 + 16, rows), keys - rows + min(m0 + 16, rows)
        alone, alone_lse = attention_kernel.attend(query[:, :, m0:m1], key[:, :, :seen], value[:, :, :seen], scale,
                                                   causal=True)
        assert torch.equal(out[:, :, m0:m1], alone), m0
        assert torch.equal(lse[:, :, m0:m1], alone_lse), m0


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("copies", [1, 3], ids=["rows-shared", "whole-rows-per-thread"])
@pytest.mark.parametrize("heads,queries", [(3, 60), (9, 17), (9, 60)], ids=["4-blocks", "6-blocks", "12-blocks"])
def test_rows_with_keys_of_their_own_equal_one_call_per_row(monkeypatch, threads, copies, heads, queries):
    """Phase 2's call: each row of the query attends over its own chunk (2,111, 700 and 64 keys,
    separate tensors in the store's layout, one a view with gaps between heads), bit for bit as one
    call per row would, and as float64 would to torch's rounding. With 9 rows each thread takes
    whole rows (attention_kernel.c, `by_rows`), and a KV head's query blocks share each key block
    four at a time (4, 6 or 12 blocks of 16 query rows per KV head: one group, a whole group and a
    part, three groups); with 3 the threads share each row's work, one query block at a time."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(2)
    query = torch.randn(3 * copies, heads, queries, 64).to(torch.bfloat16)
    rows = [(torch.randn(1, 3, n, 64).to(torch.bfloat16), torch.randn(1, 3, n, 64).to(torch.bfloat16))
            for n in (2111, 700)]
    wide = torch.randn(1, 3, 100, 64).to(torch.bfloat16)
    rows.append((wide[:, :, :64], torch.randn(1, 3, 64, 64).to(torch.bfloat16)))
    rows *= copies
    out, lse = attention_kernel.attend_rows(query, rows, 0.2)
    for b, (key, value) in enumerate(rows):
        one, one_lse = attention_kernel.attend(query[b : b + 1], key, value, 0.2)
        assert torch.equal(out[b : b + 1], one) and torch.equal(lse[b : b + 1], one_lse)
        ref, ref_lse = _reference(query[b : b + 1], key, value, 0.2, False)
        torch.testing.assert_close(out[b : b + 1].double(), ref, atol=2**-7 * ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(lse[b : b + 1].double(), ref_lse, atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("copies", [1, 3], ids=["rows-shared", "whole-rows-per-thread"])
@pytest.mark.parametrize("extra", [7, 40, 100])
def test_rows_with_a_tail_equal_float64_attention_over_chunk_and_tail(monkeypatch, threads, copies, extra):
    """Phase 2's call since the question's short keys joined it: each row attends over its chunk,
    then its tail under the question's causal mask for packed rows (G=3 heads of a q=7-token
    question: row m is token m mod 7 and sees the tail's first n - 7 + m mod 7 + 1 keys), in one
    softmax: as float64 would to torch's rounding. Tails of exactly 7 keys (the question alone),
    40 (a 33-key prefix) and 100 (past a block), their keys a view with gaps between rows."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(4)
    q, g, b = 7, 3, 3 * copies
    query = torch.randn(b, 3, g * q, 64).to(torch.bfloat16)
    rows = [tuple(torch.randn(1, 3, n, 64).to(torch.bfloat16) for _ in range(2)) for n in (2111, 700, 64)] * copies
    tail = (torch.randn(b, 3, extra + 9, 64).to(torch.bfloat16)[:, :, :extra], torch.randn(b, 3, extra, 64).to(torch.bfloat16))
    out, lse = attention_kernel.attend_rows(query, rows, 0.2, tails=tail, period=q)
    for i in range(b):
        key, value = (torch.cat([rows[i][j], tail[j][i : i + 1]], dim=2).double() for j in (0, 1))
        t = key.shape[2]
        scores = query[i : i + 1].double() @ key.transpose(-1, -2) * 0.2
        token = torch.arange(g * q) % q
        hidden = torch.arange(t)[None] > (t - q + token)[:, None]  # the chunk's keys are all visible
        scores.masked_fill_(hidden, float("-inf"))
        ref = scores.softmax(-1) @ value
        torch.testing.assert_close(out[i : i + 1].double(), ref, atol=2**-7 * ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(lse[i : i + 1].double(), scores.logsumexp(-1), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="declined"):  # a tail is not for causal calls
        attention_kernel.attend_rows(query, rows, 0.2, causal=True, tails=tail, period=q)


def _tiled_reference(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles' layout from its definition, in torch: keys padded to whole blocks of 64, then per
    16 keys their D/2 pairs of dimensions × 16 keys; values per 32 keys and 16 columns, 16 pairs of
    keys × 16 columns × the pair."""
    _, h, t, d = key.shape
    dv, padded = value.shape[-1], -(-t // 64) * 64
    key, value = (torch.nn.functional.pad(x, (0, 0, 0, padded - t)) for x in (key, value))
    keys = key.reshape(h, padded // 16, 16, d // 2, 2).permute(0, 1, 3, 2, 4)
    values = value.reshape(h, padded // 32, 16, 2, dv // 16, 16).permute(0, 1, 4, 2, 5, 3)
    return keys.reshape(1, h, padded, d), values.reshape(1, h, padded, dv)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 2111])
@pytest.mark.parametrize("dims", [(64, 64), (128, 64), (32, 128)])
def test_tile_is_the_layout_it_documents_and_untile_inverts_it(tokens, dims):
    """`tile` (the kernel's own packing, in C) equals the layout written out in torch, zeros past
    the last key included, for keys and values that are views with gaps between heads; `untile`
    gives them back bit for bit."""
    torch.manual_seed(tokens)
    key = torch.randn(1, 5, tokens + 3, dims[0]).to(torch.bfloat16)[:, 1:4, 3:]
    value = torch.randn(1, 3, tokens, dims[1]).to(torch.bfloat16)
    tiled = attention_kernel.tile(key, value)
    reference = _tiled_reference(key, value)
    assert torch.equal(tiled[0], reference[0]) and torch.equal(tiled[1], reference[1])
    assert tiled[0].shape[2] == attention_kernel.tiled_tokens(tokens) and all(t.is_contiguous() for t in tiled)
    back = attention_kernel.untile(*tiled, tokens)
    assert torch.equal(back[0], key) and torch.equal(back[1], value)
    # into a span of longer buffers (the decode cache's): only the span is written
    spans = [torch.full((1, 3, tokens + 9, d), 7.0, dtype=torch.bfloat16) for d in dims]
    attention_kernel.untile(*tiled, tokens, out=(spans[0][:, :, 4 : 4 + tokens], spans[1][:, :, 4 : 4 + tokens]))
    for span, original in zip(spans, (key, value)):
        assert torch.equal(span[:, :, 4 : 4 + tokens], original)
        assert (span[:, :, :4] == 7).all() and (span[:, :, 4 + tokens :] == 7).all()


@needs_kernel
def test_decode_cache_untiles_kept_chunks_straight_into_place():
    """A kept chunk the store holds `Tiled` lands in the decode cache as its plain KV would, bit for
    bit, at the same place, with the same room after it; `concat` (the score path) untiles it too."""
    torch.manual_seed(0)
    prefix = tuple(torch.randn(2, 1, 3, 5, 64).to(torch.bfloat16).unbind(0))
    chunks = [tuple(torch.randn(2, 1, 3, n, 64).to(torch.bfloat16).unbind(0)) for n in (70, 130)]
    plain_parts = [[prefix] * 2] + [[c] * 2 for c in chunks]
    tiled_parts = [[prefix] * 2] + [[kvops.tiled(*chunks[0])] * 2, [chunks[1]] * 2]  # one of each
    expected, cache = (kvops.decode_cache(parts, extra_tokens=4) for parts in (plain_parts, tiled_parts))
    for ours, theirs in zip(cache.layers, expected.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours._keys.shape == theirs._keys.shape == (1, 3, 5 + 70 + 130 + 4, 64)
    for (k, v), (k2, v2) in zip(kvops.concat(tiled_parts), kvops.concat(plain_parts)):
        assert torch.equal(k, k2) and torch.equal(v, v2)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("copies", [1, 3], ids=["rows-shared", "whole-rows-per-thread"])
@pytest.mark.parametrize("extra", [0, 7, 100])
def test_tiled_rows_equal_rows_packed_in_the_call(monkeypatch, threads, copies, extra):
    """Phase 2 over chunks the store keeps `tile`d: the kernel reads them as they are (and requests
    each head's from memory while it attends the one before), bit for bit what it computes from
    the same chunks in the store's own layout, with or without a tail, in whole rows per thread or
    shared, for chunks of 2,111, 700 and 64 keys."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(5)
    q, b = 7, 3 * copies
    query = torch.randn(b, 3, 3 * q, 64).to(torch.bfloat16)
    rows = [tuple(torch.randn(1, 3, n, 64).to(torch.bfloat16) for _ in range(2)) for n in (2111, 700, 64)] * copies
    tail = tuple(torch.randn(b, 3, extra, 64).to(torch.bfloat16) for _ in range(2)) if extra else None
    expected = attention_kernel.attend_rows(query, rows, 0.2, tails=tail, period=q if extra else 0)
    tiled = [attention_kernel.tile(k, v) for k, v in rows]
    got = attention_kernel.attend_rows(query, tiled, 0.2, tails=tail, period=q if extra else 0,
                                       tokens=[k.shape[2] for k, _ in rows])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_kernel
def test_takes_rows_checks_every_row():
    """`attend_rows` is offered phase 2's rows only where every row's key and value suit the
    kernel; one odd row (another dtype, a strided last dimension, no keys, other heads, keys and
    values of different lengths, no batch dimension, another value size) refuses."""
    query = torch.randn(3, 3, 60, 64).to(torch.bfloat16)
    good = [tuple(torch.randn(1, 3, n, 64).to(torch.bfloat16) for _ in range(2)) for n in (100, 30, 64)]
    assert attention_kernel.takes_rows(query, good)
    k, v = good[1]
    for odd in [(k.float(), v), (k, v.float()), (torch.randn(1, 3, 30, 128).to(torch.bfloat16)[..., ::2], v),
                (k[:, :, :0], v[:, :, :0]), (k[:, :2], v[:, :2]), (k, v[:, :, :20]), (k[0], v[0]),
                (k, torch.randn(1, 3, 30, 128).to(torch.bfloat16))]:
        assert not attention_kernel.takes_rows(query, [good[0], odd, good[2]])


_GUARDED = r"""
import ctypes, mmap, sys, torch
sys.path.insert(0, sys.argv[1])
from parallelcomp import attention_kernel
page = mmap.PAGESIZE
for keys in (70, 1, 17, 64, 129):  # 70: the padded block holds three key groups past the last key
    buf = mmap.mmap(-1, 2 * page * 64)
    end = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + len(buf) - page
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(end), page, 0) == 0  # the page after the keys: no access
    n = 3 * keys * 64
    key = torch.frombuffer(buf, dtype=torch.bfloat16, count=n, offset=len(buf) - page - 2 * n).view(1, 3, keys, 64)
    key.copy_(torch.randn(key.shape))
    value = torch.randn(1, 3, keys, 64).to(torch.bfloat16)
    out, _ = attention_kernel.attend(torch.randn(1, 3, 5, 64).to(torch.bfloat16), key, value)
    assert torch.isfinite(out.float()).all()
    del key, out
print("read nothing past the keys")
"""


@needs_kernel
def test_packing_reads_no_key_past_the_last_one():
    """Keys whose storage ends right before a page the process may not read: packing must stop at the
    last key, also in the key groups that only pad the count to a whole block (it once read 16 rows
    there, which crashed a test run whenever a chunk's keys ended at the end of a mapping). In a
    subprocess, so that a fault fails this test instead of ending the run."""
    import subprocess
    import sys

    core = os.path.dirname(os.path.dirname(attention_kernel.__file__))
    run = subprocess.run([sys.executable, "-c", _GUARDED, core], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "read nothing past the keys" in run.stdout, (run.returncode, run.stderr[-2000:])


@needs_kernel
def test_a_maximum_that_keeps_rising_and_one_that_comes_first():
    """The lazy maximum: scores that rise by ~40 (log2 units) from block to block rescale the output
    at every block; a top score in the first block never rescales it. Both equal float64."""
    torch.manual_seed(1)
    keys, d = 640, 64
    query = torch.ones(1, 1, 16, d, dtype=torch.bfloat16)
    ramp = torch.linspace(0, 6, keys)[:, None].expand(keys, d)  # score of key t ∝ t
    value = torch.randn(1, 1, keys, d).to(torch.bfloat16)
    for key in (ramp, ramp.flip(0)):
        key = key.to(torch.bfloat16)[None, None]
        out, lse = attention_kernel.attend(query, key, value, 1.0)
        ref, ref_lse = _reference(query, key, value, 1.0, False)
        torch.testing.assert_close(out.double(), ref, atol=2**-7 * ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
def test_whole_blocks_and_masked_ones_agree_for_either_sign_of_the_scale(causal):
    """A block every row sees whole takes the maximum of the raw scores before scaling, which holds
    only for a positive scale; a negative one must take the other path (taken anyway, the minimum
    would pass for the maximum and, with scores this far apart, the probabilities overflow fp32).
    Both signs, causal and not (the causal mask gives whole and partial blocks in one call),
    equal float64."""
    torch.manual_seed(2)
    query = (16 * torch.randn(1, 2, 150, 64)).to(torch.bfloat16)  # scores a few hundred apart (log2 units)
    key, value = (torch.randn(1, 2, 300, 64).to(torch.bfloat16) for _ in range(2))
    for scale in (0.5, -0.5):
        out, lse = attention_kernel.attend(query, key, value, scale, causal=causal)
        ref, ref_lse = _reference(query, key, value, scale, causal)
        torch.testing.assert_close(out.double(), ref, atol=2**-7 * ref.abs().max().item(), rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


def _wide_heads(family: str, vocab: int):
    """A tiny model with head size 64, the smallest the kernel takes."""
    return tiny_model(family, vocab, head_dim=64)


@needs_kernel
def test_phases_1_and_2_on_tiles_are_as_close_to_fp32_as_the_fused_kernel(tokenizer, monkeypatch):
    """Question NLL per chunk over ~300-token chunks of two families in bf16, on the AMX kernel and
    on torch's fused one, against the fp32 model's: the AMX kernel's error is no larger than the
    fused kernel's (as test_core's matmul test; measured mean error 0.087 and 0.053 nats on the
    tiles, 0.091 and 0.050 fused, of NLLs near 12). Both phases ran on the kernel: phase 1 in every
    layer of the prefix and of each chunk, phase 2 once per layer for all rows."""
    parts = build_prompt(tokenizer, "Read.", "What is seven?", True)
    chunks = [Chunk(i, ids_of(tokenizer, text(i, n)), ()) for i, n in enumerate([300, 130, 270])]
    calls = []
    real = attention_kernel.attend_rows
    monkeypatch.setattr(attention_kernel, "attend_rows", lambda q, rows, *a, **kw: calls.append(kw.get("causal", False))
                        or real(q, rows, *a, **kw))

    for family in ("llama", "qwen2"):
        ref = two_phase_nll(_wide_heads(family, len(tokenizer)), parts, chunks, "sdpa")
        bf16 = _wide_heads(family, len(tokenizer)).to(torch.bfloat16)
        calls.clear()
        fused, amx = (two_phase_nll(bf16, parts, chunks, k) - ref for k in ("sdpa", attention_kernel.name()))
        layers = bf16.config.num_hidden_layers
        # phase 1: the prefix, then one forward per chunk; phase 2: one call per layer for all rows
        assert calls == [True] * (1 + len(chunks)) * layers + [False] * layers, family
        assert 0 < amx.abs().mean() <= 1.5 * fused.abs().mean() + 0.01, family
        assert amx.abs().max() <= 1.5 * fused.abs().max() + 0.05, (family, amx.abs().max(), fused.abs().max())


@needs_kernel
def test_engine_on_tiles_keeps_the_chunks_the_fused_kernel_keeps(tokenizer):
    """The whole run on "amx" ("auto" picks it for this bf16 model) against "fused": the same kept
    chunks and scores to bf16 rounding; the stats say which kernel ran, and a question over the
    stored chunks is answered from them."""
    model = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [text(10 + i, n) for i, n in enumerate([30, 12, 25, 33, 18])]
    outs = {}
    for choice in ("auto", "fused"):
        pc = ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=2, chunk_tokens=36,
                                                               attention_kernel=choice))
        outs[choice] = pc.generate("Where is the copper garden?", documents=docs, max_new_tokens=4)
        again = pc.generate("Where is the copper garden?", documents=docs, max_new_tokens=4)
        assert again.stats.reused_chunks == len(docs) and again.token_ids == outs[choice].token_ids
    assert outs["auto"].stats.attention_kernel == attention_kernel.name() and outs["fused"].stats.attention_kernel == "sdpa"
    assert [c.kept for c in outs["auto"].chunks] == [c.kept for c in outs["fused"].chunks]
    assert [c.score for c in outs["auto"].chunks] == pytest.approx([c.score for c in outs["fused"].chunks], abs=0.05)


@needs_kernel
def test_chunks_kept_tiled_answer_as_chunks_kept_in_the_models_layout(tokenizer, monkeypatch, tmp_path):
    """On the AMX kernel the store keeps each chunk `Tiled` and phase 2 reads it as it is
    (engine._keeps_tiles; docs/store.md): the answer, every chunk's score and the kept set equal,
    bit for bit, those of an engine that keeps the model's layout, cold and reused; so do a fresh
    engine's, which reads the tiled chunks back from the disk tier (files of whole blocks of 64
    keys, under an identity that names the layout). Compression, which phase 2 runs in torch,
    keeps the model's layout."""
    model = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [text(10 + i, n) for i, n in enumerate([30, 12, 25, 33, 18])]
    question, config = "Where is the copper garden?", dict(keep_chunks=2, chunk_tokens=36)
    tiled = ParallelComp(model, tokenizer, ParallelCompConfig(**config, kv_store_dir=str(tmp_path)))
    first = tiled.generate(question, documents=docs, max_new_tokens=4)
    again = tiled.generate(question, documents=docs, max_new_tokens=4)
    assert tiled.tiles and again.stats.reused_chunks == len(docs)
    assert all(isinstance(layer, kvops.Tiled) for entry in tiled.store._lru.values() for layer in entry.kv)
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "_keeps_tiles", lambda *args: False)
        rows = ParallelComp(model, tokenizer, ParallelCompConfig(**config))
        plain = [rows.generate(question, documents=docs, max_new_tokens=4) for _ in range(2)]
    assert not rows.tiles
    assert not any(isinstance(layer, kvops.Tiled) for entry in rows.store._lru.values() for layer in entry.kv)
    fresh = ParallelComp(model, tokenizer, ParallelCompConfig(**config, kv_store_dir=str(tmp_path)))
    from_disk = fresh.generate(question, documents=docs, max_new_tokens=4)
    assert from_disk.stats.store_disk_hits == len(docs)
    for out in (again, *plain, from_disk):
        assert out.token_ids == first.token_ids
        assert (out.stats.kv_bytes, out.stats.kv_bytes_uncompressed) == (first.stats.kv_bytes,
                                                                          first.stats.kv_bytes_uncompressed)
        assert [(c.score, c.kept) for c in out.chunks] == [(c.score, c.kept) for c in first.chunks]
    files = sorted((tmp_path / "v1").rglob("*.safetensors"))
    assert len(files) == len(docs)
    for f in files:
        with safe_open(str(f), "pt") as stored:
            assert '"kv_layout": "amx-tiles"' in stored.metadata()["identity"]
            assert stored.get_slice("k.0").get_shape()[2] % 64 == 0
    assert not ParallelComp(model, tokenizer, ParallelCompConfig(**config, kv_budget_ratio=0.5)).tiles


@needs_kernel
def test_tiled_chunks_under_compression_set_later_answer_as_an_engine_built_with_it(tokenizer):
    """An engine that keeps tiles and is then given compression (as a Ray worker takes the driver's
    settings per call) runs phase 2 on torch over its tiled chunks, untiled, and compresses them:
    the same answer and scores as an engine built with compression, which keeps the model's layout."""
    model = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [text(10 + i, n) for i, n in enumerate([30, 12, 25, 33, 18])]
    question, config = "Where is the copper garden?", dict(keep_chunks=2, chunk_tokens=36)
    later = ParallelComp(model, tokenizer, ParallelCompConfig(**config))
    later.generate(question, documents=docs, max_new_tokens=4)
    later.config = ParallelCompConfig(**config, kv_budget_ratio=0.5)
    out = later.generate(question, documents=docs, max_new_tokens=4)
    built = ParallelComp(model, tokenizer, ParallelCompConfig(**config, kv_budget_ratio=0.5))
    expected = built.generate(question, documents=docs, max_new_tokens=4)
    assert later.tiles and not built.tiles and out.stats.reused_chunks == len(docs)
    assert out.token_ids == expected.token_ids and out.stats.kv_bytes == expected.stats.kv_bytes
    assert [(c.score, c.kept) for c in out.chunks] == [(c.score, c.kept) for c in expected.chunks]


@needs_kernel
def test_phase_2_outside_the_kernel_reads_a_tiled_chunk_untiled(tokenizer):
    """A tiled chunk that reaches phase 2's torch path (another kernel, or a call the AMX kernel
    declines) is untiled there: the same NLL as from the chunk kept in the model's layout."""
    model = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    parts = build_prompt(tokenizer, "Read.", "What is seven?", True)
    chunks = [Chunk(i, ids_of(tokenizer, text(i, n)), ()) for i, n in enumerate([100, 70])]
    prefix = encode_prefix(model, parts.prefix_ids, "sdpa")
    nll = {}
    for tiles in (False, True):
        encoded = encode_chunks(model, parts.prefix_ids, chunks, "sdpa", tiles)
        assert all(isinstance(layer, kvops.Tiled) == tiles for e in encoded for layer in e.kv)
        nll[tiles] = question_nll(model, prefix, encoded, parts.question_ids, slice(0, len(parts.question_ids)),
                                  kernel="sdpa")
    assert torch.equal(nll[True], nll[False])


def _question_step(heads=9, kv_heads=3, q=28, context=300, dtype=torch.bfloat16):
    """The question step's attention call: q tokens after `context` cached ones over a preallocated
    cache's views (gaps between heads), and the bool mask transformers builds for it, which hides
    from each question token only the later ones."""
    torch.manual_seed(6)
    t = context + q
    query = torch.randn(1, heads, q, 64).to(dtype)
    key, value = (torch.randn(1, kv_heads, t + 20, 64).to(dtype)[:, :, :t] for _ in range(2))
    mask = torch.ones(q, t, dtype=torch.bool).tril(t - q)[None, None]
    return query, key, value, mask


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,q", [(9, 3, 28), (14, 2, 5), (4, 4, 17)])
def test_the_question_step_on_tiles_is_as_close_to_float64_as_torchs_kernel(monkeypatch, heads, kv_heads, q):
    """With `amx` (the engine attends on "amx") the question step's causal attention over the merged
    KV runs on the kernel, GQA or not: no farther from float64 than the path it replaces
    (packed_queries, torch's fused kernel) plus a bf16 rounding of the output."""
    query, key, value, mask = _question_step(heads, kv_heads, q)
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    calls = []
    real = attention_kernel.attend
    monkeypatch.setattr(attention_kernel, "attend", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    out, _ = attention._through(None, "sdpa", module, query, key, value, mask, causal=attention_kernel.name(), scaling=0.2, dropout=0.0)
    assert calls == [{"causal": True}]
    ref, _ = _reference(query, key, value, 0.2, causal=True)
    if heads != kv_heads:
        torch_out, _ = attention.packed_queries(module, query, key, value, mask, scaling=0.2)
    else:
        torch_out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                                                     scale=0.2).transpose(1, 2)
    error, torch_error = ((o.transpose(1, 2).double() - ref).abs().max().item() for o in (out, torch_out))
    assert out.shape == (1, q, heads, 64) and out.is_contiguous()
    assert error <= torch_error + 2**-8 * ref.abs().max().item(), (error, torch_error)


@needs_kernel
def test_the_question_step_leaves_the_tiles_for_any_other_mask():
    """The kernel's causal mask is the only one it computes: a mask that also hides a context key,
    one aligned to the first key, an additive or per-head mask, one query token, soft-capping,
    dropout or fp32 tensors keep torch's path."""
    query, key, value, mask = _question_step()
    q, t = mask.shape[-2:]
    kernel = attention_kernel.name()
    assert attention._causal_step(query, key, value, mask, {}, kernel)
    holed = mask.clone()
    holed[..., 5] = False  # calibration evicts by slicing the keys, not by masking, but a caller might
    additive = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, float("-inf"))
    refused = [(query, key, value, holed, {}), (query, key, value, torch.ones(q, t, dtype=torch.bool).tril()[None, None], {}),
               (query, key, value, additive, {}), (query, key, value, mask.expand(1, 9, q, t), {}),
               (query, key, value, None, {}), (query[:, :, -1:], key, value, mask[..., -1:, :], {}),
               (query, key, value, mask, {"softcap": 30.0}), (query, key, value, mask, {"dropout": 0.1}),
               (query.float(), key.float(), value.float(), mask, {})]
    for args in refused:
        assert not attention._causal_step(*args, kernel)


def test_a_question_step_mask_is_checked_once_per_tensor(monkeypatch):
    """Each layer of a forward gets the same mask tensor, so the answer is kept for that tensor;
    another tensor, even of the same shape, is checked afresh, and the kept answer does not keep
    the tensor alive."""
    q, t = 6, 20
    good = torch.ones(1, 1, q, t, dtype=torch.bool)
    good[..., t - q :] = torch.ones(q, q, dtype=torch.bool).tril()
    holed = good.clone()
    holed[..., 3] = False
    checks = []
    monkeypatch.setattr(attention, "_causal", lambda n, device: checks.append(n) or torch.ones(n, n, dtype=torch.bool).tril())
    answers = [attention._hides_only_future(m, q, t) for m in (good, good, holed, holed, good)]
    assert answers == [True, True, False, False, True] and len(checks) == 2  # the holed mask fails before `_causal`
    ref = attention._last_mask[0]
    del good
    assert ref() is None


@needs_kernel
def test_an_engine_on_tiles_runs_its_question_step_on_them(tokenizer, monkeypatch):
    """An engine that attends on "amx" runs the question step's attention on the kernel in every
    layer, and nowhere else in decoding; its logits are those of torch's path (the same engine with
    the step refused) to a few bf16 roundings through the model, and so are its tokens."""
    model = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    pc = ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=2, chunk_tokens=36))
    docs = [text(20 + i, n) for i, n in enumerate([30, 12, 25])]
    question = "Where is the copper garden?"
    forward, attend = decode.forward, attention_kernel.attend
    runs = {}
    for tiles in (True, False):
        steps, calls = [], []  # each decoding forward's last logits; the kernel's calls in each

        def spy_forward(model, ids, *args, **kwargs):
            calls.append(0)
            steps.append(forward(model, ids, *args, **kwargs))
            return steps[-1]

        def spy_attend(*args, **kwargs):
            if calls:  # phases 1 and 2 attend on the kernel before decoding starts
                calls[-1] += 1
            return attend(*args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(decode, "forward", spy_forward)
            m.setattr(attention_kernel, "attend", spy_attend)
            if not tiles:
                m.setattr(attention, "_causal_step", lambda *args: False)
            out = pc.generate(question, documents=docs, max_new_tokens=6)
        runs[tiles] = out, steps, calls
    (amx, amx_steps, amx_calls), (fused, fused_steps, fused_calls) = runs[True], runs[False]
    layers = model.config.num_hidden_layers
    assert amx_calls[0] == layers and fused_calls[0] == 0 and not any(amx_calls[1:] + fused_calls[1:])
    logits, difference = fused_steps[0].float(), (amx_steps[0].float() - fused_steps[0].float()).abs()
    ulp = 2.0 ** (logits.abs().max().log2().floor().item() - 7)  # bf16's spacing at the largest logit
    assert difference.max() <= 4 * ulp and difference.mean() <= ulp  # measured: 2.75 and 0.5 ulp
    assert amx.token_ids == fused.token_ids and len(amx.token_ids) == 6


@needs_amx
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 15, 17, 28, 64, 65, 100, 128, 1105])  # 65 on: the weight packed
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (48, 64), (80, 96), (192, 576)])
def test_linear_is_as_close_to_float64_as_one_bf16_rounding(monkeypatch, threads, rows, out_features, in_features):
    """The AMX linear of few rows (x as a strided 3-D view, with and without a bias) against the
    float64 product: each output is the fp32 sum (bias included) rounded once to bf16, so it is
    within one bf16 spacing of the exact value plus the fp32 sum's own error, the bound torch's bf16
    GEMM meets without a bias. Rows past a 16-row block, odd numbers of 32-column blocks, 1-3 threads."""
    torch.manual_seed(rows * out_features + threads)
    x = torch.randn(2, rows, 2 * in_features, dtype=torch.bfloat16)[:, :, ::2][1:]  # (1, rows, K), strided
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) / in_features ** 0.5
    bias = torch.randn(out_features, dtype=torch.bfloat16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for b in (None, bias):
        assert attention_kernel.takes_linear(x, weight, b) == (rows <= attention_kernel.LINEAR_ROWS)
        ours = attention_kernel.linear(x, weight, b)  # the kernel takes any rows; the engine up to LINEAR_ROWS
        exact = x.double() @ weight.double().T + (0 if b is None else b.double())
        spacing = 2.0 ** (exact.abs().clamp(min=2.0 ** -126).log2().floor() - 7)  # bf16's at each value
        slack = in_features * 2.0 ** -24 * (x.double().abs() @ weight.double().abs().T + 1)
        assert ours.shape == (1, rows, out_features) and ours.dtype == torch.bfloat16
        assert ((ours.double() - exact).abs() <= spacing + slack).all()
        if b is None:  # torch's rounds once too (with a bias, for one row, it rounds the product first)
            torch_error = (torch.nn.functional.linear(x, weight).double() - exact).abs()
            assert (torch_error <= spacing + slack).all()


@needs_amx
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("out_features,in_features", [(16, 32), (48, 64), (80, 96), (576, 1536)])
def test_linear_gives_the_same_bits_whichever_operand_it_packs(monkeypatch, threads, out_features, in_features):
    """Up to 64 rows the kernel packs x and reads the weight as it lies; with more rows and a small
    weight (`packs_weight`) it packs the weight and rounds each block of outputs while the next
    block's products run. Both add K's 32-element blocks into fp32 in the same order, so a call of
    65-300 rows (whole and partial 32-row blocks, with and without a bias) gives the bits of the same
    rows sent 40 at a time, whichever layout it took."""
    torch.manual_seed(out_features + threads)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) / in_features ** 0.5
    bias = torch.randn(out_features, dtype=torch.bfloat16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    packed = []
    for rows in (65, 96, 209, 300):
        packed.append(attention_kernel.packs_weight(rows, out_features, in_features))
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        for b in (None, bias):
            pieces = torch.cat([attention_kernel.linear(x[i:i + 40], weight, b) for i in range(0, rows, 40)])
            assert torch.equal(attention_kernel.linear(x, weight, b), pieces)
    assert any(packed) and not attention_kernel.packs_weight(40, out_features, in_features)


def test_linear_packs_the_weight_only_where_that_pays():
    """Above 64 rows, a weight of at most PACKED_WEIGHT_BYTES, once the rows cover n·k / 4,096
    (SmolLM2's 576 × 576 from 81 rows, its MLP's 1,536 × 576 from 216); never a larger weight."""
    assert not attention_kernel.packs_weight(64, 16, 32) and attention_kernel.packs_weight(65, 16, 32)
    assert not attention_kernel.packs_weight(80, 576, 576) and attention_kernel.packs_weight(81, 576, 576)
    assert not attention_kernel.packs_weight(215, 1536, 576) and attention_kernel.packs_weight(216, 1536, 576)
    assert attention_kernel.PACKED_WEIGHT_BYTES < 4864 * 896 * 2  # Qwen2.5-0.5B's MLP
    assert not attention_kernel.packs_weight(3072, 4864, 896)


@needs_amx
def test_linear_leaves_to_torch_what_it_does_not_take():
    """fp32, a K that is not a multiple of 32 or an N not of 16, more rows than LINEAR_ROWS, a
    transposed weight, an fp32 bias, and a product autograd must record: `takes_linear` refuses,
    and the modules' forward then is F.linear's, bit for bit."""
    weight, x = torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(5, 64, dtype=torch.bfloat16)
    assert attention_kernel.takes_linear(x, weight, None)
    refused = [
        (x.float(), weight.float(), None),
        (x[:, :48], weight[:, :48].contiguous(), None),
        (x, weight[:24].contiguous(), None),
        (torch.randn(attention_kernel.LINEAR_ROWS + 1, 64, dtype=torch.bfloat16), weight, None),
        (x, weight.T, None),
        (x, weight, torch.zeros(64)),
        (x.clone().requires_grad_(), weight, None),
    ]
    module = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    for inputs, w, bias in refused:
        assert not attention_kernel.takes_linear(inputs, w, bias)
        module.weight.data, module.bias = w, None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        if w.shape[1] == inputs.shape[-1] and w.dtype == inputs.dtype and (bias is None or bias.dtype == w.dtype):
            ours = attention_kernel._linear_forward(module, inputs)
            assert torch.equal(ours, torch.nn.functional.linear(inputs, w, module.bias))


@needs_amx
def test_wider_linear_takes_more_rows_up_to_its_bounds_on_its_own_thread():
    """Outside `wider_linear` a call of more than LINEAR_ROWS rows goes to torch; inside it the
    kernel takes it while x is at most WIDER_BYTES, or with a weight of at most PACKED_WEIGHT_BYTES
    up to WIDER_ROWS rows (its accuracy there: test_linear_is_as_close_to_float64_as_one_bf16_rounding);
    the block is undone on leaving, nested too, and another thread never sees it."""
    torch.manual_seed(0)
    weight = torch.randn(64, 576, dtype=torch.bfloat16) / 24
    big = torch.zeros((attention_kernel.PACKED_WEIGHT_BYTES // (2 * 576 * 16) + 1) * 16, 576, dtype=torch.bfloat16)
    rows, fit = attention_kernel.WIDER_ROWS, attention_kernel.WIDER_BYTES // (2 * 576)
    small, large = torch.randn(rows, 576, dtype=torch.bfloat16), torch.randn(rows + 1, 576, dtype=torch.bfloat16)
    seen = []
    assert rows > fit > attention_kernel.LINEAR_ROWS and not attention_kernel.takes_linear(small, weight, None)
    with attention_kernel.wider_linear():
        with attention_kernel.wider_linear():
            assert attention_kernel.takes_linear(small, weight, None)
        assert attention_kernel.takes_linear(small, weight, None)
        assert not attention_kernel.takes_linear(large, weight, None)
        assert attention_kernel.takes_linear(small[:fit], big, None)
        assert not attention_kernel.takes_linear(small[:fit + 1], big, None)
        other = threading.Thread(target=lambda: seen.append(attention_kernel.takes_linear(small, weight, None)))
        other.start()
        other.join()
    assert seen == [False] and not attention_kernel.takes_linear(small, weight, None)


@needs_amx
def test_phase_2_runs_its_wider_linears_on_the_tiles_and_nothing_else_does(tokenizer, monkeypatch):
    """With more chunks than fit LINEAR_ROWS (6 chunks x 9 question tokens), phase 2's projections
    run on the kernel; the prompt prefix (42 rows) and phase 1 (a micro-batch of hundreds) keep
    torch's GEMM, whose KV the answer reads. The chunk scores stay within a few bf16 roundings of
    the engine's on torch's GEMMs, and so does the ranking."""
    model = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [text(40 + i, 28) for i in range(6)]
    question = "Where is the copper garden?"
    linear = attention_kernel.linear
    runs = {}
    for tiles in (True, False):
        rows = []

        def spy_linear(x, *args):
            rows.append(x.numel() // x.shape[-1])
            return linear(x, *args)

        with monkeypatch.context() as m:
            m.setattr(attention_kernel, "linear", spy_linear)
            if not tiles:
                m.setattr(attention_kernel, "linear_modules", lambda model: [])
            pc = ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=2, chunk_tokens=36))
            runs[tiles] = pc.generate(question, documents=docs, max_new_tokens=4), collections.Counter(rows)
    (amx, counts), (torchs, torch_counts) = runs[True], runs[False]
    layers, n_chunks = model.config.num_hidden_layers, len(amx.chunks)
    phase_2 = [n for n, times in counts.items() if n > attention_kernel.LINEAR_ROWS]
    assert not torch_counts and n_chunks >= 6 and phase_2 and all(n % n_chunks == 0 for n in phase_2)
    assert all(counts[n] == 7 * layers for n in phase_2)  # every projection of every layer, once
    assert max(phase_2) <= attention_kernel.WIDER_ROWS and max(phase_2) * model.config.hidden_size * 2 <= attention_kernel.WIDER_BYTES
    # here the scores came out equal; with wider inputs (SmolLM2's 576 at 33-767 rows) a few
    # projections' last bits differ from torch's, and the scores by rounding
    scores = torch.tensor([c.score for c in amx.chunks]), torch.tensor([c.score for c in torchs.chunks])
    assert torch.allclose(*scores, rtol=0, atol=2.0**-6)
    assert [c.kept for c in amx.chunks] == [c.kept for c in torchs.chunks]


@needs_amx
def test_an_engine_on_tiles_runs_its_few_row_linears_on_them(tokenizer, monkeypatch):
    """An engine on "amx" runs the model's linear layers on the kernel during a run wherever they
    have at most LINEAR_ROWS (phase 2 over three chunks, the question step), hands the modules
    their own forward back after it, and answers as the same engine on torch's GEMMs does: the same tokens,
    its first logits within a few bf16 roundings through the model."""
    model = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    docs = [text(20 + i, n) for i, n in enumerate([30, 12, 25])]
    question = "Where is the copper garden?"
    forward, linear = decode.forward, attention_kernel.linear
    runs = {}
    for tiles in (True, False):
        steps, rows, widths = [], [], []

        def spy_forward(model, ids, *args, **kwargs):
            widths.append(ids.shape[1])
            steps.append(forward(model, ids, *args, **kwargs))
            return steps[-1]

        def spy_linear(x, *args):
            rows.append(x.numel() // x.shape[-1])
            return linear(x, *args)

        with monkeypatch.context() as m:
            m.setattr(decode, "forward", spy_forward)
            m.setattr(attention_kernel, "linear", spy_linear)
            if not tiles:
                m.setattr(attention_kernel, "linear_modules", lambda model: [])
            pc = ParallelComp(model, tokenizer, ParallelCompConfig(keep_chunks=2, chunk_tokens=36))
            out = pc.generate(question, documents=docs, max_new_tokens=6)
        runs[tiles] = out, steps, rows
        assert not any("forward" in vars(module) for module in model.modules())
    (amx, amx_steps, amx_rows), (torchs, torch_steps, torch_rows) = runs[True], runs[False]
    counts, layers = collections.Counter(amx_rows), model.config.num_hidden_layers
    assert not torch_rows and counts[widths[0]] >= 7 * layers  # the question step's projections, every layer
    assert sum(n == 7 * layers for n in counts.values()) >= 2  # and phase 2's (3 chunks x 9 tokens)
    assert max(counts) <= attention_kernel.LINEAR_ROWS  # the prefix (42 rows) and phase 1 (219) keep torch's
    logits, difference = torch_steps[0].float(), (amx_steps[0].float() - torch_steps[0].float()).abs()
    ulp = 2.0 ** (logits.abs().max().log2().floor().item() - 7)
    assert difference.max() <= 4 * ulp
    assert amx.token_ids == torchs.token_ids and len(amx.token_ids) == 6


def test_amx_is_refused_where_it_cannot_run_and_auto_passes_it_by(tokenizer, monkeypatch):
    """Asked for explicitly, "amx" on an fp32 model, on a head size it does not take, or on a CPU
    without the kernel is a ConfigError that says why; "auto" then picks another kernel."""
    fp32 = _wide_heads("llama", len(tokenizer))
    with pytest.raises(ConfigError, match="bf16 models on CPU"):
        ParallelComp(fp32, tokenizer, ParallelCompConfig(attention_kernel="amx"))
    narrow = tiny_model("llama", len(tokenizer)).to(torch.bfloat16)  # head size 16
    with pytest.raises(ConfigError, match="head size 16"):
        ParallelComp(narrow, tokenizer, ParallelCompConfig(attention_kernel="amx"))
    assert ParallelComp(narrow, tokenizer, ParallelCompConfig()).attention_kernel in ("sdpa", "matmul")
    if attention_kernel.available():  # the build this CPU does not run
        other = next(b for b in attention_kernel.KERNELS if b != attention_kernel.name())
        with pytest.raises(ConfigError, match=f'"{other}" cannot run here'):
            ParallelComp(_wide_heads("llama", len(tokenizer)).to(torch.bfloat16), tokenizer,
                         ParallelCompConfig(attention_kernel=other))
    monkeypatch.setattr(attention_kernel, "_library", lambda: (
        None, {"amx": "the CPU (x86_64) lacks amx_tile", "avx512": "the CPU (x86_64) lacks avx512_bf16"}, ""))
    bf16 = _wide_heads("llama", len(tokenizer)).to(torch.bfloat16)
    with pytest.raises(ConfigError, match="lacks amx_tile"):
        ParallelComp(bf16, tokenizer, ParallelCompConfig(attention_kernel="amx"))
    assert ParallelComp(bf16, tokenizer, ParallelCompConfig()).attention_kernel in ("sdpa", "matmul")
    assert not attention_kernel.takes(*(torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16),) * 3)


def test_the_kernel_rates_include_the_tiles_where_they_run():
    """`hardware.measure_attention` (the profile's "Kernel rates") times the AMX kernel where it runs."""
    rates = hardware.measure_attention((1, 2, 1, 128, 64), torch.bfloat16, repeats=1)
    assert (attention_kernel.name() in rates) == attention_kernel.available() and all(r > 0 for r in rates.values())
