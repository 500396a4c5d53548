"""Small SmolLM2 measurements behind the method-fidelity choices (docs/method-fidelity.md).

    python -m benchmarks.fidelity whitespace     # chunk scores with/without trailing blank lines
    python -m benchmarks.fidelity scoring        # gold-chunk rank: question vs suffix tokens, restated instruction
    python -m benchmarks.fidelity snapkv         # needle KV retention and answers: question vs last-8 rows

Each run takes well under five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from parallelcomp import ParallelComp, ParallelCompConfig

LICENSES = Path("/usr/share/common-licenses")
CASES = [  # (gold document, question, answer)
    (
        "Harbour log, spring season. The lighthouse keeper on Gull Island is Marta Okafor. "
        "The secret code that opens the lamp room door is 4721. Visitors are not allowed in the lamp room.",
        "What is the secret code that opens the lamp room door?",
        "4721",
    ),
    (
        "Minutes of the orchard committee. The committee agreed that the new pear variety will be called "
        "Silver Dawn. Planting starts in the second week of March, led by Tomas Brandt.",
        "What will the new pear variety be called?",
        "Silver Dawn",
    ),
    (
        "Travel note. The night ferry to Kessel Harbour leaves from pier number 17 at a quarter past nine.",
        "From which pier does the night ferry to Kessel Harbour leave?",
        "17",
    ),
    (
        "Lab notebook, week 12. The sample that reacted was stored in the blue cabinet under the label K-88.",
        "Under which label was the sample that reacted stored?",
        "K-88",
    ),
]


def distractors(tokenizer, n: int, tokens_each: int) -> list[str]:
    texts = [p.read_text() for p in sorted(LICENSES.glob("*")) if p.is_file()]
    return [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:tokens_each]).strip()
            for t in texts[:n]]


def whitespace(engine: ParallelComp) -> None:
    """Same documents, once as given and once each followed by a blank line."""
    others = distractors(engine.tokenizer, 3, 300)
    worst = 0.0
    for gold, question, _ in CASES:
        docs = others[:2] + [gold] + others[2:]
        rows = {}
        variants = {
            "clean": docs,
            "+\\n\\n": [d + "\n\n" for d in docs],
            "+\\n": [d + "\n" for d in docs],
            "mixed": [d + "\n\n" * (i % 2) for i, d in enumerate(docs)],  # every other document
        }
        for name, variant in variants.items():
            out = engine.generate(question, documents=variant, max_new_tokens=1)
            scores = [c.score for c in out.chunks]
            rows[name] = scores
            rank = sorted(range(len(scores)), key=lambda i: scores[i])
            print(f"{question[:40]!r:44} {name:6} scores {[round(s, 3) for s in scores]} ranking {rank}")
        for name in rows:
            worst = max(worst, max(abs(a - b) for a, b in zip(rows[name], rows["clean"])))
    print(f"largest score change from trailing whitespace: {worst:.3f} nats")
    gold, question, _ = CASES[0]
    paragraphs = [p.strip() for t in distractors(engine.tokenizer, 3, 700) for p in t.split("\n\n") if p.strip()]
    doc = "\n\n".join(paragraphs[:8] + [gold] + paragraphs[8:])
    out = engine.generate(question, documents=[doc], max_new_tokens=1)
    for c in out.chunks:
        span = c.spans[0]
        tail = repr(doc[max(span.start, span.end - 3) : span.end])
        print(f"split document: chunk {c.index} ends {tail:10} score {c.score:.3f} kept {c.kept}")


def haystack(engine: ParallelComp, needle: str, tokens: int, skip: int) -> str:
    """`tokens` tokens of licence text with the needle sentence in the middle."""
    filler = distractors(engine.tokenizer, 8 + skip, 2 * tokens)[8 + skip - 1]
    ids = engine.tokenizer(filler, add_special_tokens=False)["input_ids"]
    half = engine.tokenizer.decode(ids[: tokens // 2]).strip(), engine.tokenizer.decode(ids[tokens // 2 : tokens]).strip()
    return f"{half[0]} {needle} {half[1]}"


def scoring(engine: ParallelComp) -> None:
    """Rank of the gold chunk among 5 licence chunks under both scoring spans, with and without the
    instruction restated after the documents. One phase-1/phase-2 pass gives both spans."""
    import torch

    from parallelcomp.chunking import make_chunks
    from parallelcomp.prefill import encode_chunks, encode_prefix, question_nll
    from parallelcomp.prompts import build_prompt

    others = distractors(engine.tokenizer, 5, 300)
    totals: dict[str, list] = {}
    for k, (gold, question, _) in enumerate(CASES):
        docs = others[:k] + [gold] + others[k:]
        for restate in (False, True):
            parts = build_prompt(engine.tokenizer, engine.config.instruction, question, True, True,
                                 restate_instruction=restate)
            chunks = make_chunks(engine.tokenizer, docs, 400, "\n\n")
            gold_chunk = next(c.index for c in chunks if any(s.document == k for s in c.spans))
            prefix = encode_prefix(engine.model, parts.prefix_ids)
            every = slice(0, len(parts.question_ids))
            nll = torch.cat([question_nll(engine.model, prefix, encode_chunks(engine.model, parts.prefix_ids, [c]),
                                          parts.question_ids, every) for c in chunks])
            for which in ("question", "suffix"):
                scores = nll[:, parts.scored(which)].mean(dim=1).tolist()
                rank = sorted(scores).index(scores[gold_chunk])
                margin = min(s for i, s in enumerate(scores) if i != gold_chunk) - scores[gold_chunk]
                key = f"{which:8} restate={restate!s:5}"
                totals.setdefault(key, []).append((rank, margin))
                print(f"case {k} {key} gold rank {rank} margin {margin:+.3f} scores {[round(x, 2) for x in scores]}")
    for key, rows in totals.items():
        print(f"{key}: gold first in {sum(r == 0 for r, _ in rows)}/{len(rows)}, "
              f"mean margin {sum(m for _, m in rows) / len(rows):+.3f} nats")


def snapkv(_: ParallelComp) -> None:  # builds its own engines, one per setting
    """Needle in a 400-token haystack chunk, compressed to 20%: how many (layer, KV head) pairs
    keep every needle-answer token, and whether the answer over that one chunk still holds it."""
    import torch

    from parallelcomp.chunking import make_chunks
    from parallelcomp.compression import BatchCompressor, keep_topk
    from parallelcomp.prefill import encode_chunks, encode_prefix, question_nll
    from parallelcomp.prompts import build_prompt

    for observation in ("question", "last"):
        engine = ParallelComp.from_pretrained(None, config=ParallelCompConfig(
            keep_chunks=1, chunk_tokens=450, kv_budget_ratio=0.2, snap_observation=observation))
        tok, kept_all, answers = engine.tokenizer, [], 0
        for k, (gold, question, answer) in enumerate(CASES):
            doc = haystack(engine, gold, 400, k)
            parts = build_prompt(tok, engine.config.instruction, question, True)
            [chunk] = make_chunks(tok, [doc], 450, "\n\n")
            enc = tok(doc, add_special_tokens=False, return_offsets_mapping=True)
            a = doc.index(answer)
            needle = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < a + len(answer) and e > a]
            encoded = encode_chunks(engine.model, parts.prefix_ids, [chunk])
            comp = BatchCompressor.for_batch(engine.config, len(parts.prefix_ids), encoded,
                                             len(parts.question_ids), parts.question_span)
            question_nll(engine.model, encode_prefix(engine.model, parts.prefix_ids), encoded, parts.question_ids,
                         parts.scored(engine.config.score_tokens), comp.observe)
            budget = engine.config.kv_budget_for(len(chunk.token_ids))
            keep = torch.stack([keep_topk(s, budget)[0] for s in comp.scores[0].values()])  # (layers, H_kv, B)
            has = torch.stack([(keep == j).any(-1) for j in needle]).all(0)  # (layers, H_kv)
            kept_all.append(float(has.float().mean()))
            out = engine.generate(question, documents=[doc], max_new_tokens=12)
            answers += answer in out.text
            print(f"{observation:8} case {k}: needle kept by {kept_all[-1]:.0%} of (layer, KV head); "
                  f"answer {out.text.strip()[:40]!r}")
        print(f"{observation:8}: needle kept by {sum(kept_all) / len(kept_all):.0%} on average; "
              f"answers {answers}/{len(CASES)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["whitespace", "scoring", "snapkv"])
    parser.add_argument("--cases", type=int, default=len(CASES), help="use the first N needle cases")
    args = parser.parse_args()
    del CASES[args.cases :]
    engine = ParallelComp.from_pretrained(None, config=ParallelCompConfig(keep_chunks=1, chunk_tokens=400))
    {"whitespace": whitespace, "scoring": scoring, "snapkv": snapkv}[args.what](engine)


if __name__ == "__main__":
    main()
