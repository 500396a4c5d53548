"""Process memory against the chunk store's memory-tier budget (docs/store.md, "Tiers").

    python -m benchmarks.store_rss --kv-store DIR [--tier-mb 500] [--lengths 16384 32768] [--samples 15] [--passes 2]

Asks the bench's qa questions (SmolLM2, bf16, `retrieval`) one after another through one engine
whose memory tier holds `--tier-mb`, with a disk tier in DIR (a second run reads every chunk from
it), and prints per question the KV the tier holds, the live CPU tensors (weights included) and
the process's anonymous and file-backed RSS. Run it under allocator or oneDNN settings to see
what they change, e.g. `ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 python -m benchmarks.store_rss ...`.
"""

from __future__ import annotations

import argparse
import gc
import os

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
    args = parser.parse_args()

    from parallelcomp.default_model import embedded_model_dir

    from . import worker
    from .tasks import make_samples

    model, tokenizer = worker.load(str(embedded_model_dir()), "bfloat16")
    samples = [s for length in args.lengths for s in make_samples("qa", tokenizer, length, args.samples)]
    preset = f"retrieval,kv_store_bytes={args.tier_mb * 2**20}"
    print("| pass | question | reused / chunks | tier MB | live tensors MB | RssAnon MB | RssFile MB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in range(args.passes):
        for s in samples:
            engine = worker.engine(model, tokenizer, preset, s.instruction, args.kv_store)
            out = engine.generate(s.question, documents=s.documents, max_new_tokens=1)
            rss = _rss_mb()
            print(f"| {n + 1} | {s.id} | {out.stats.reused_chunks} / {out.stats.n_chunks} "
                  f"| {engine.store.bytes_held / 2**20:.0f} | {_live_tensor_mb():.0f} "
                  f"| {rss['RssAnon']:.0f} | {rss['RssFile']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
