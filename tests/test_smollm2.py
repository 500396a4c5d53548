"""End to end with the embedded SmolLM2-135M-Instruct (8K window) on a multi-document input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallelcomp import ParallelComp, ParallelCompConfig
from parallelcomp.prompts import build_prompt

LICENSES = Path("/usr/share/common-licenses")  # on every Debian machine
GOLD = (
    "Harbour log, spring season. The lighthouse keeper on Gull Island is Marta Okafor. "
    "Every evening she writes the tide table into the log and checks the lamp. "
    "The secret code that opens the lamp room door is 4721. Visitors are not allowed in the lamp room."
)
QUESTION = "What is the secret code that opens the lamp room door?"


def distractors(n: int, tokens_each: int, tokenizer) -> list[str]:
    texts = [p.read_text() for p in sorted(LICENSES.glob("*")) if p.is_file()]
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens_each]
        out.append(tokenizer.decode(ids))
        if len(out) == n:
            return out
    pytest.fail(f"need {n} licence texts in {LICENSES}")


@pytest.fixture(scope="module")
def smol(smol_dir):
    return ParallelComp.from_pretrained(smol_dir, config=ParallelCompConfig(keep_chunks=1, chunk_tokens=768))


def test_smollm2_one_chunk_equals_model_generate(smol):
    doc = GOLD + " " + " ".join(["The harbour is quiet at night."] * 20)
    out = smol.generate(QUESTION, documents=[doc], max_new_tokens=24)
    parts = build_prompt(smol.tokenizer, smol.config.instruction, QUESTION, True)
    prompt = parts.prefix_ids + smol.tokenizer(doc, add_special_tokens=False)["input_ids"] + parts.question_ids
    ref = smol.model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=sorted(smol.eos_ids), pad_token_id=2
    )[0, len(prompt) :].tolist()
    ref = ref[: next((i for i, t in enumerate(ref) if t in smol.eos_ids), len(ref))]
    assert out.token_ids == ref
    assert "4721" in out.text


def test_smollm2_finds_the_gold_document_among_distractors(smol):
    docs = distractors(5, 700, smol.tokenizer)
    docs.insert(3, GOLD)
    out = smol.generate(QUESTION, documents=docs, max_new_tokens=24)
    assert out.stats.tokens_in > 3000 and out.stats.n_chunks >= 5
    kept = [c for c in out.chunks if c.kept]
    assert len(kept) == 1 and 3 in kept[0].documents
    assert "4721" in out.text
    assert out.stats.evicted_documents and 3 not in out.stats.evicted_documents


@pytest.mark.slow
def test_smollm2_chunk_scores_from_the_head_in_slices_equal_the_whole_logits(smol, monkeypatch):
    """SmolLM2's real 49,152-token vocabulary in its loaded dtype (bf16 where the CPU has it: the C
    log-sum-exp): phase 2's NLL with the head in slices (nll.py) equals the NLL of the model's own
    whole logits over the same decoder outputs (the second call reuses the first's chunk KV)."""
    from parallelcomp import prefill

    docs = distractors(5, 700, smol.tokenizer)
    docs.insert(3, GOLD)
    sliced = smol.generate(QUESTION, documents=docs, max_new_tokens=1)
    monkeypatch.setattr(prefill, "plain_head", lambda model: None)
    whole = smol.generate(QUESTION, documents=docs, max_new_tokens=1)
    assert whole.stats.reused_chunks == whole.stats.n_chunks >= 5
    torch.testing.assert_close([c.score for c in sliced.chunks], [c.score for c in whole.chunks], atol=2e-5, rtol=1e-5)
    assert [c.kept for c in sliced.chunks] == [c.kept for c in whole.chunks]
    assert 3 in next(c for c in sliced.chunks if c.kept).documents
