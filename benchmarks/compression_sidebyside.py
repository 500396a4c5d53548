"""Per-chunk KV compression side by side: "paper" vs "paper-compression" on one ~32K-token input.

Runs the embedded SmolLM2-135M (8K window) over license texts from /usr/share/common-licenses
(one document per file, ~32K tokens in all) with one multi-document question, once without and
once with per-chunk SnapKV compression (keep half of each chunk), in the same process on the same
loaded model, and prints kept-KV bytes, prefill/decode time and whether the answer changed.

    python benchmarks/compression_sidebyside.py [--tokens 32000] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from parallelcomp import ParallelComp, ParallelCompConfig

LICENSES = Path("/usr/share/common-licenses")
QUESTION = (
    "Which of these licenses grant an explicit patent license, and what happens to that patent "
    "license if the licensee starts patent litigation?"
)


def corpus(engine: ParallelComp, target_tokens: int) -> tuple[list[str], list[str], int]:
    """Whole license files (largest first, symlinks skipped) until about `target_tokens` tokens."""
    files = sorted((p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()),
                   key=lambda p: (-p.stat().st_size, p.name))
    names, docs, total = [], [], 0
    for path in files:
        text = path.read_text(errors="replace")
        n = engine.count_tokens(text)
        if total + n > target_tokens * 1.05:
            continue
        names.append(path.name)
        docs.append(text)
        total += n
        if total >= target_tokens * 0.95:
            break
    return names, docs, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32_000)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = ParallelComp.from_pretrained(None, config=ParallelCompConfig.preset("paper"))
    names, docs, total = corpus(base, args.tokens)
    print(f"model: {base.model_name} ({base.model.config._attn_implementation}, {base.model.dtype}), "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"corpus: {len(docs)} documents, {total:,} tokens: {', '.join(names)}")
    print(f"question: {QUESTION}\n")

    rows = []
    for preset in ("paper", "paper-compression"):
        engine = ParallelComp(base.model, base.tokenizer, ParallelCompConfig.preset(preset))
        out = engine.generate(QUESTION, documents=docs, max_new_tokens=args.max_new_tokens)
        rows.append((preset, out))

    header = (f"{'preset':<20} {'chunks':>6} {'kept':>4} {'kv tokens':>9} {'KV MiB':>8} {'uncompr. MiB':>12} "
              f"{'prefill s':>9} {'decode s':>8} {'new tok':>7}")
    print(header)
    print("-" * len(header))
    mib = 1 / 2**20
    for preset, out in rows:
        s = out.stats
        print(f"{preset:<20} {s.n_chunks:>6} {s.n_kept:>4} {s.kv_tokens:>9,} {s.kv_bytes * mib:>8.1f} "
              f"{s.kv_bytes_uncompressed * mib:>12.1f} {s.prefill_seconds:>9.1f} {s.decode_seconds:>8.1f} "
              f"{s.new_tokens:>7}")
    (_, a), (_, b) = rows
    print(f"\nKV bytes kept: {b.stats.kv_bytes / a.stats.kv_bytes:.1%} of the uncompressed run")
    print(f"kept chunks: paper {[c.index for c in a.kept_chunks]}, "
          f"compression {[(c.index, c.kv_tokens) for c in b.kept_chunks]} (index, kv tokens)")
    for preset, out in rows:
        print(f"answer [{preset}]: {out.text!r}")
    print(f"answer changed: {'yes' if a.text != b.text else 'no'}")


if __name__ == "__main__":
    main()
