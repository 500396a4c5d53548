"""Process memory against the chunk store's memory-tier budget (docs/store.md, "Tiers").

    python -m benchmarks.store_rss --kv-store DIR [--tier-mb 500] [--lengths 16384 32768] [--samples 15]
                                   [--passes 2] [--dtype auto] [--keep-heap] [--out FILE]

Asks the bench's qa questions (SmolLM2, `retrieval`) one after another, each through an engine
whose memory tier holds `--tier-mb`, with a disk tier in DIR (a second pass reads every chunk from
it), and prints per question the KV the tier holds, the live CPU tensors (weights included) and
the process's anonymous and file-backed RSS; `--out` writes the table to a file too. Run it under
allocator or oneDNN settings to see what they change, e.g.
`ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 python -m benchmarks.store_rss ...`; `--keep-heap` skips the
engine's heap release after each run (hardware.release_free_heap), for an A/B.
"""

from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mb() -> dict[str, float]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile")}


def _live_tensor_mb() -> float:
    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-store", required=True, metavar="DIR")
    parser.add_argument("--tier-mb", type=int, default=500)
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768])
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: what the engine picks on this CPU (hardware.default_dtype)")
    parser.add_argument("--keep-heap", action="store_true", help="no heap release after each run (A/B)")
    parser.add_argument("--out", metavar="FILE", help="also write the table here")
    args = parser.parse_args()

    import torch

    from parallelcomp import hardware
    from parallelcomp.default_model import embedded_model_dir

    from . import worker
    from .tasks import make_samples

    if args.keep_heap:
        hardware.release_free_heap = lambda: None
    dtype = str(hardware.default_dtype(torch.device("cpu"))).removeprefix("torch.") if args.dtype == "auto" else args.dtype
    model, tokenizer = worker.load(str(embedded_model_dir()), dtype)
    samples = [s for length in args.lengths for s in make_samples("qa", tokenizer, length, args.samples)]
    preset = f"retrieval,kv_store_bytes={args.tier_mb * 2**20}"
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    emit(f"{dtype}, {args.tier_mb} MB tier, heap {'kept' if args.keep_heap else 'released after each run'}")
    emit("")
    emit("| pass | question | reused / chunks | tier MB | live tensors MB | RssAnon MB | RssFile MB |")
    emit("|---:|---|---:|---:|---:|---:|---:|")
    for n in range(args.passes):
        for s in samples:
            engine = worker.engine(model, tokenizer, preset, s.instruction, args.kv_store)
            out = engine.generate(s.question, documents=s.documents, max_new_tokens=1)
            rss = _rss_mb()
            emit(f"| {n + 1} | {s.id} | {out.stats.reused_chunks} / {out.stats.n_chunks} "
                 f"| {engine.store.bytes_held / 2**20:.0f} | {_live_tensor_mb():.0f} "
                 f"| {rss['RssAnon']:.0f} | {rss['RssFile']:.0f} |")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
