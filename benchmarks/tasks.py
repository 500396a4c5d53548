"""Benchmark samples generated at a requested length in tokens of the model's tokenizer.

* `ppl`: a fixed target window (512 tokens) of the essays, preceded by the tokens before it so
  that target and context together are `length` tokens.
* `niah`, `passkey`, `kv_retrieval`: RULER-style needles (niah_single_2: a word key and a
  7-digit value in the essays; the classic passkey in repeated filler; niah_multikey_3: UUID
  key-value lines only). Generators written here from the RULER protocol.
* `qa`: the gold paragraph of a SQuAD v2 question among distractor SQuAD paragraphs.
* `hotpotqa`: the supporting paragraphs (usually two) of a HotpotQA question among distractor
  HotpotQA paragraphs: both must be kept to answer (multi-hop).

`length` counts the tokens of the context (documents) only; template and question come on top.
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import asdict, dataclass, field

from . import data

TASKS = ("ppl", "niah", "passkey", "kv_retrieval", "qa", "hotpotqa")
QA_SOURCES = {"qa": "squad", "hotpotqa": "hotpotqa"}
PPL_TARGET_TOKENS = 512
PPL_END_CHAR = 2_000_000  # ppl targets end here (about 480K tokens in), leaving room for 128K+
DEPTHS = [round(i * 100 / 39) for i in range(40)]  # RULER: linspace(0, 100, 40)

NIAH_INSTRUCTION = ("Some special magic {kind} are hidden within the following text. Make sure to "
                    "memorize it. I will quiz you about the {kind} afterwards.")
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = "What is the special magic {one} for {key} mentioned in the provided text?"
PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it "
                       "and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again. ")
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key. "
QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and "
                  "do not output any other words.")


@dataclass
class Sample:
    task: str
    id: str
    instruction: str = ""
    question: str = ""
    documents: list[str] | None = None
    context: str | None = None
    references: list[str] = field(default_factory=list)
    gold: list[tuple[int, int, int]] = field(default_factory=list)
    """(document, start, end) character spans that must be kept; document 0 for `context`."""
    target: str = ""
    """ppl only: the text whose NLL is measured after `context`."""

    def texts(self) -> list[str]:
        return self.documents if self.documents is not None else [self.context]

    def gold_texts(self) -> list[str]:
        docs = self.texts()
        return [docs[d][s:e] for d, s, e in self.gold]

    def to_dict(self) -> dict:
        return asdict(self)


def make_samples(task: str, tokenizer, length: int, n: int, seed: int = 0,
                 ppl_target: int = PPL_TARGET_TOKENS) -> list[Sample]:
    """`n` samples of `task` whose context is about `length` tokens long."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    out = []
    for i in range(n):
        rng = random.Random(f"{task}-{length}-{seed}-{i}")
        sid = f"{task}-{length}-{i}"
        if task == "ppl":
            out.append(_ppl(tokenizer, length, ppl_target, i, sid))
        elif task in QA_SOURCES:
            out.append(_qa(task, tokenizer, length, rng, sid, data.qa_pool(QA_SOURCES[task])))
        else:
            out.append(_NEEDLE_TASKS[task](tokenizer, length, rng, sid))
    return out


def _last_tokens(tokenizer, end_char: int, n: int) -> int:
    """Character offset where the last `n` tokens of `essays()[:end_char]` begin."""
    text, chars = data.essays(), 8 * n + 64
    while True:
        begin = max(0, end_char - chars)
        offsets = tokenizer(text[begin:end_char], add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > n or begin == 0:  # one spare token: the first may be cut by the slice
            if len(offsets) < n:
                raise ValueError(f"the essays hold fewer than {n} tokens before {end_char}")
            return begin + offsets[-n][0]
        chars *= 2


def _first_tokens(tokenizer, n: int) -> str:
    """The essays' text covering their first `n` tokens."""
    text, chars = data.essays(), 8 * n + 64
    offsets = tokenizer(text[:chars], add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) < n:
        raise ValueError(f"the essays hold fewer than {n} tokens")
    return text[:offsets[n - 1][1]]


def _ppl(tokenizer, length: int, target_tokens: int, i: int, sid: str) -> Sample:
    """The target ends at a fixed character (per sample), so every length scores the same text."""
    if not 0 < target_tokens < length:
        raise ValueError(f"ppl needs 0 < target ({target_tokens}) < length ({length})")
    end = PPL_END_CHAR + i * 40_000
    target_start = _last_tokens(tokenizer, end, target_tokens)
    context_start = _last_tokens(tokenizer, target_start, length - target_tokens)
    text = data.essays()
    return Sample("ppl", sid, context=text[context_start:target_start],
                  target=text[target_start:end])


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _insert(sentences: list[str], needle: str, depth: int, sep: str) -> tuple[str, tuple[int, int]]:
    """Join `sentences` with `needle` inserted at `depth` percent; return text and needle span."""
    k = round(len(sentences) * depth / 100)
    head = sep.join(sentences[:k])
    start = len(head) + (len(sep) if k else 0)
    text = sep.join(sentences[:k] + [needle] + sentences[k:])
    return text, (start, start + len(needle))


def _niah(tokenizer, length: int, rng: random.Random, sid: str) -> Sample:
    words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{6,}", data.essays()[:200_000])})
    key = f"{rng.choice(words)}-{rng.choice(words)}"
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = NIAH_NEEDLE.format(kind="numbers", key=key, value=value)
    haystack = _first_tokens(tokenizer, max(1, length - _count(tokenizer, needle)))
    sentences = re.split(r"(?<=[.!?])\s+", haystack)
    context, span = _insert(sentences, needle, rng.choice(DEPTHS), " ")
    return Sample("niah", sid, NIAH_INSTRUCTION.format(kind="numbers"),
                  NIAH_QUESTION.format(one="number", key=key), context=context,
                  references=[value], gold=[(0, *span)])


def _passkey(tokenizer, length: int, rng: random.Random, sid: str) -> Sample:
    value = str(rng.randint(10_000, 99_999))
    needle = PASSKEY_NEEDLE.format(value=value)
    n = max(1, (length - _count(tokenizer, needle)) // _count(tokenizer, PASSKEY_FILLER))
    context, span = _insert([PASSKEY_FILLER] * n, needle, rng.choice(DEPTHS), "")
    return Sample("passkey", sid, PASSKEY_INSTRUCTION, "What is the pass key?",
                  context=context, references=[value], gold=[(0, *span)])


def _kv_retrieval(tokenizer, length: int, rng: random.Random, sid: str) -> Sample:
    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    line = NIAH_NEEDLE.format(kind="uuids", key=uid(), value=uid())
    n = max(2, length // _count(tokenizer, line + "\n"))
    pairs = [(uid(), uid()) for _ in range(n)]
    lines = [NIAH_NEEDLE.format(kind="uuids", key=k, value=v) for k, v in pairs]
    q = rng.randrange(n)
    context = "\n".join(lines)
    start = sum(len(s) + 1 for s in lines[:q])
    return Sample("kv_retrieval", sid, NIAH_INSTRUCTION.format(kind="uuids"),
                  NIAH_QUESTION.format(one="uuid", key=pairs[q][0]), context=context,
                  references=[pairs[q][1]], gold=[(0, start, start + len(lines[q]))])


def _qa(task: str, tokenizer, length: int, rng: random.Random, sid: str, pool: list[dict]) -> Sample:
    item = rng.choice(pool)
    gold = list(item["gold"])
    budget = length - sum(_count(tokenizer, g) for g in gold)
    distractors: list[str] = []
    seen = set(gold)
    while budget > 0:
        para = rng.choice(rng.choice(pool)["gold"])
        if para in seen:
            continue
        seen.add(para)
        distractors.append(para)
        budget -= _count(tokenizer, para) + 4
    docs = distractors[:]
    for g in gold:
        docs.insert(rng.randint(0, len(docs)), g)
    labelled = [f"Document {i + 1}:\n{d}" for i, d in enumerate(docs)]
    spans = [(docs.index(g), 0, len(labelled[docs.index(g)])) for g in gold]
    return Sample(task, sid, QA_INSTRUCTION, item["question"], documents=labelled,
                  references=item["answers"], gold=spans)


_NEEDLE_TASKS = {"niah": _niah, "passkey": _passkey, "kv_retrieval": _kv_retrieval}
