"""Chunking packs whole documents, splits only what does not fit, at natural boundaries, losing nothing."""

from __future__ import annotations

from parallelcomp.chunking import make_chunks


def ids_of(tokenizer, s):
    return tokenizer(s, add_special_tokens=False)["input_ids"]


def test_documents_are_packed_in_order_without_splitting(tokenizer):
    docs = ["First document about rivers.", "Second one, on stones.", "Third: clouds.", "Fourth and last."]
    chunks = make_chunks(tokenizer, docs, budget=16, separator="\n\n")
    sep = ids_of(tokenizer, "\n\n")
    assert all(len(c.token_ids) <= 16 for c in chunks)
    assert [s.document for c in chunks for s in c.spans] == [0, 1, 2, 3]
    assert all(s.complete for c in chunks for s in c.spans)
    rebuilt = []
    for c in chunks:
        pieces = [ids_of(tokenizer, docs[s.document]) for s in c.spans]
        joined = pieces[0]
        for p in pieces[1:]:
            joined = joined + sep + p
        rebuilt.append(joined)
    assert rebuilt == [c.token_ids for c in chunks]
    assert len(chunks) < len(docs)  # something was packed together


def test_long_document_is_split_at_paragraph_boundaries_and_nothing_is_lost(tokenizer):
    paragraphs = [f"Paragraph number {i} talks about the copper garden by the river." for i in range(30)]
    doc = "\n\n".join(paragraphs)
    chunks = make_chunks(tokenizer, [doc], budget=60, separator="\n\n")
    assert len(chunks) > 1 and all(len(c.token_ids) <= 60 for c in chunks)
    assert sum((c.token_ids for c in chunks), []) == ids_of(tokenizer, doc)
    spans = [c.spans[0] for c in chunks]
    assert spans[0].start == 0 and spans[-1].end == len(doc)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    for span in spans[1:]:  # every cut is at a paragraph break
        assert doc[span.start - 2 : span.start] == "\n\n" or doc[span.start : span.start + 2] == "\n\n"


def test_sentence_boundary_when_there_is_no_paragraph(tokenizer):
    doc = " ".join(f"Sentence {i} is here and it is fine." for i in range(40))
    chunks = make_chunks(tokenizer, [doc], budget=50, separator="\n\n")
    for c in chunks[:-1]:
        assert doc[: c.spans[0].end].rstrip().endswith(".")


def test_split_pieces_pack_with_following_documents(tokenizer):
    long_doc = "\n\n".join(f"Part {i} of the long story." for i in range(20))
    chunks = make_chunks(tokenizer, [long_doc, "tail doc"], budget=40, separator="\n\n")
    assert chunks[-1].spans[-1].document == 1
    assert any(len(c.spans) == 2 for c in chunks)
