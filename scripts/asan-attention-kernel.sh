#!/usr/bin/env bash
# attention_kernel.c under AddressSanitizer: builds it with -fsanitize=address and runs N (default
# 300) random shapes through attention_kernel.attend (causal, transformers' strided layout) and
# attend_rows (rows with keys of their own, views with an offset, half of them with a tail under its
# periodic causal mask), 1-3 threads, each against torch's SDPA; and, since 2026-12-05, a quarter of
# the cases through attention_kernel.linear (1-256 rows, which the kernel takes whatever the
# engine's LINEAR_ROWS, with and without a bias) against float64. Builds the best build the CPU runs
# (attention_kernel.BUILDS: "amx" with AMX, else "avx512", which has no linear) and needs gcc's
# libasan (docs/hardware.md, "The AMX attention kernel").
#   scripts/asan-attention-kernel.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
export ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$(gcc -print-file-name=libasan.so)" PYTHONPATH="core${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-.venv/bin/python}" - "${1:-300}" <<'PY'
import ctypes, random, subprocess, sys, tempfile

import torch

from parallelcomp import attention_kernel as ak

so = tempfile.mkdtemp() + "/attention_kernel_asan.so"
build = ak.name()
assert build, ak.unavailable_reason()
flags = [f for f in ak.BUILDS[build][0] if f != "-O3"] + ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
subprocess.run(["gcc", *flags, "-o", so, str(ak.SOURCE), "-lm"], check=True)
lib = ak._declare(ctypes.CDLL(so), build)
assert lib.pc_amx_init() == 0, "Linux refused the AMX tile state"
ak._library = lambda: (lib, {}, build)
print(f"the {build} build under AddressSanitizer")
sdpa = torch.nn.functional.scaled_dot_product_attention
rng = random.Random(0)
for case in range(int(sys.argv[1])):
    d = rng.choice([32, 64, 128])
    dv = 64 if d == 32 else rng.choice([64, 128])
    h_kv, g = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 7])
    torch.set_num_threads(rng.choice([1, 2, 3]))
    if rng.random() < 0.25 and ak.linear_available():  # a linear of few rows: x a view that starts one row into its storage
        m, k, n = rng.randint(1, 8 * ak.LINEAR_ROWS), 32 * rng.randint(1, 48), 16 * rng.randint(1, 64)
        x, w = torch.randn(m + 1, k).to(torch.bfloat16)[1:], (torch.randn(n, k) / k**0.5).to(torch.bfloat16)
        bias = torch.randn(n).to(torch.bfloat16) if rng.random() < 0.5 else None
        out, ref = ak.linear(x, w, bias), x.double() @ w.double().T + (0 if bias is None else bias.double())
        assert (out.double() - ref).abs().max().item() < 0.05, (case, m, k, n)
        continue
    if rng.random() < 0.5:  # phase 1: causal, (B, T, H, D) memory seen as (B, H, T, D)
        b, t = rng.choice([1, 2, 3]), rng.randint(1, 700)
        q, k, v = (torch.randn(b, t, n, w).to(torch.bfloat16).transpose(1, 2)
                   for n, w in ((h_kv * g, d), (h_kv, d), (h_kv, dv)))
        out, _ = ak.attend(q, k, v, causal=True)
        ref = sdpa(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    else:  # phase 2: each row over keys of its own, views that start 5 keys into their storage
        b, m = rng.randint(1, 12), rng.randint(1, 70)
        q = torch.randn(b, h_kv * g, m, d).to(torch.bfloat16)
        rows = [(torch.randn(1, h_kv, t + 5, d).to(torch.bfloat16)[:, :, 5:], torch.randn(1, h_kv, t, dv).to(torch.bfloat16))
                for t in (rng.randint(1, 2200) for _ in range(b))]
        period = rng.randint(1, m)
        n = rng.randint(period, period + 150)  # a tail of n keys per row, the keys a view with gaps
        tails = (torch.randn(b, h_kv, n + 3, d).to(torch.bfloat16)[:, :, 3:], torch.randn(b, h_kv, n, dv).to(torch.bfloat16)) \
            if rng.random() < 0.5 else None
        out, _ = ak.attend_rows(q, rows, tails=tails, period=period if tails else 0)
        ref = []
        for i, (k, v) in enumerate(rows):
            mask = None
            if tails:
                k, v = torch.cat([k, tails[0][i : i + 1]], dim=2), torch.cat([v, tails[1][i : i + 1]], dim=2)
                s = torch.arange(k.shape[2]) - (k.shape[2] - n)  # index in the tail (negative: the chunk)
                mask = s[None] <= (n - period + torch.arange(m) % period)[:, None]
            ref.append(sdpa(q[i : i + 1].float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True))
        ref = torch.cat(ref)
    error = (out.float() - ref).abs().max().item()
    assert error < 0.05, (case, error)
print(f"{case + 1} shapes, no AddressSanitizer report, max error under 0.05")
PY
