"""Scorers (RULER's rules) and the gold-kept check. Scores are in [0, 1]."""

from __future__ import annotations


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER niah/kv rule: the fraction of references found in the prediction (case-insensitive);
    1.0 only when every reference appears."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER qa rule: 1.0 when any reference answer appears in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


SCORERS = {"niah": string_match_all, "passkey": string_match_all,
           "kv_retrieval": string_match_all, "qa": string_match_part,
           "hotpotqa": string_match_part}


def score(task: str, prediction: str, references: list[str]) -> float:
    return SCORERS[task](prediction, references)


def spans_kept(gold: list[tuple[int, int, int]], kept: list[tuple[int, int, int]]) -> bool:
    """True when every gold (document, start, end) span overlaps a kept span of its document."""
    return all(any(d == kd and s < ke and ks < e for kd, ks, ke in kept) for d, s, e in gold)
