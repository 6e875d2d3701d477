"""Haystacks: facts scattered in order through distractor sentences, to a length in tokens.

Shared by the tasks that hide facts in book text (BabiLong, recall): :class:`TokenCounter`
counts and cuts text in tokens of one tokenizer, :class:`SentencePool` holds the distractor
sentences of a split's part of the books (counted on demand), and :func:`build_context` takes a
contiguous run of them from a random point and inserts the facts at random sentence boundaries —
the way BabiLong builds its samples (see :mod:`memllm.data.babilong`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from memllm.data.distractors import Document, load_documents, split_sentences
from memllm.errors import DataError

log = logging.getLogger(__name__)


class TokenCounter:
    """Counts and cuts text in tokens of one tokenizer (no special tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def count(self, text: str) -> int:
        return len(self.ids(text))

    def count_many(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        out = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [len(x) for x in out]

    def head(self, text: str, n: int) -> str:
        """The first ``n`` tokens of ``text``, decoded."""
        return self.tokenizer.decode(self.ids(text)[:n])


class SentencePool:
    """Distractor sentences of one split region, their token counts computed on demand.

    Each sentence is counted as it appears in a context: preceded by a space.
    """

    CHUNK = 256

    def __init__(
        self,
        documents: list[Document],
        counter: TokenCounter,
        *,
        min_tokens: int = 10,
        part: tuple[float, float] = (0.0, 1.0),
    ):
        self.counter = counter
        self.min_tokens = min_tokens
        self.sentences: list[str] = []
        for doc in documents:
            sents = [s for p in doc.paragraphs for s in split_sentences(p)]
            lo, hi = int(len(sents) * part[0]), int(len(sents) * part[1])
            self.sentences.extend(sents[lo:hi])
        if not self.sentences:
            raise DataError("the distractor source has no sentences for this split")
        self._counts: list[int] = [-1] * len(self.sentences)
        self._warned = False

    def count(self, i: int) -> int:
        if self._counts[i] < 0:
            lo = (i // self.CHUNK) * self.CHUNK
            hi = min(lo + self.CHUNK, len(self.sentences))
            counts = self.counter.count_many([" " + s for s in self.sentences[lo:hi]])
            self._counts[lo:hi] = counts
        return self._counts[i]

    def take(self, budget: int, rng) -> list[str]:
        """Consecutive sentences from a random point, ``budget`` tokens in all (the last cut)."""
        return self.take_counted(budget, rng)[0]

    def take_counted(self, budget: int, rng) -> tuple[list[str], int]:
        """:meth:`take` and the sentences' token count (each counted after a space)."""
        if budget <= 0:
            return [], 0
        n = len(self.sentences)
        i = rng.randrange(n)
        out: list[str] = []
        total = visited = 0
        while total < budget:
            c = self.count(i)
            if c >= self.min_tokens:
                text = self.sentences[i]
                if total + c > budget:  # cut the last sentence to land on the budget
                    text = self.counter.head(" " + text, budget - total).strip()
                    if text:
                        out.append(text)
                        total += self.counter.count(" " + text)
                    break
                out.append(text)
                total += c
            i = (i + 1) % n
            visited += 1
            if visited == n:
                if total == 0:
                    raise DataError(
                        f"no distractor sentence has at least {self.min_tokens} tokens "
                        "(lower min_sentence_tokens or use another distractor source)"
                    )
                if not self._warned:
                    log.warning("the distractor text is shorter than one context: it repeats")
                    self._warned = True
        return out, total


def distractor_pool(
    distractor: str, counter: TokenCounter, kind: str, *, test_fraction: float, min_tokens: int
) -> SentencePool:
    """The sentences a ``kind`` ("train" or "test") context draws its distractor text from.

    Offline books are cut so test contexts read only the last ``test_fraction`` of each book and
    train/validation contexts the rest (0 shares the whole book); a hub corpus (``hf:...``) has
    its own splits.
    """
    if distractor.startswith("hf:"):
        docs, part = load_documents(distractor, split=kind), (0.0, 1.0)
    else:
        docs = load_documents(distractor)
        cut = 1.0 - test_fraction
        part = (cut, 1.0) if kind == "test" else (0.0, cut)
        if test_fraction == 0:
            part = (0.0, 1.0)
    return SentencePool(docs, counter, min_tokens=min_tokens, part=part)


def cached_pool(pools: dict[str, SentencePool], options, counter: TokenCounter, split: str):
    """The split's distractor pool from ``pools`` (built once per train/test kind) for a task
    whose ``options`` have ``distractor``, ``distractor_test_fraction``, ``min_sentence_tokens``."""
    kind = "test" if split == "test" else "train"
    if kind not in pools:
        pools[kind] = distractor_pool(
            options.distractor,
            counter,
            kind,
            test_fraction=options.distractor_test_fraction,
            min_tokens=options.min_sentence_tokens,
        )
    return pools[kind]


@dataclass
class BuiltContext:
    context: str
    fact_spans: list[tuple[int, int]]  # character spans of the facts in the context
    distractor_sentences: int
    tokens: int  # the pieces' token counts summed, each counted as placed (exact for byte BPE)
    tail_kept: bool = True  # every fact is followed by at least ``tail_tokens`` of distractor


def build_context(
    facts: list[str],
    budget: int,
    pool: SentencePool | None,
    counter: TokenCounter,
    rng,
    *,
    tail_tokens: int = 0,
) -> BuiltContext:
    """Scatter ``facts`` in order through distractor text so the context has ``budget`` tokens.

    With ``budget == 0`` (``0k``) or when the facts alone exceed the budget, the context is the
    facts alone. With ``tail_tokens``, facts go only at sentence boundaries followed by at least
    that many tokens of distractor text (so that they lie before a last segment of that length);
    when the distractor text is too short for it, they go first and ``tail_kept`` is False.
    """
    background: list[str] = []
    fact_tokens = sum(counter.count_many([" " + f for f in facts]))
    background_tokens = 0
    if budget > 0 and pool is not None:
        if fact_tokens < budget:
            background, background_tokens = pool.take_counted(budget - fact_tokens, rng)
        else:
            log.warning("the facts alone (%d tokens) exceed the budget of %d", fact_tokens, budget)
    last_slot, tail_kept = len(background), True
    if tail_tokens > 0:
        counts = counter.count_many([" " + b for b in background])
        after = 0
        while last_slot > 0 and after < tail_tokens:
            last_slot -= 1
            after += counts[last_slot]
        tail_kept = after >= tail_tokens
    positions = sorted(rng.choices(range(last_slot + 1), k=len(facts)))
    pieces: list[tuple[str, bool]] = []
    fi = 0
    for slot in range(len(background) + 1):
        while fi < len(facts) and positions[fi] == slot:
            pieces.append((facts[fi], True))
            fi += 1
        if slot < len(background):
            pieces.append((background[slot], False))
    parts, spans, pos = [], [], 0
    for text, is_fact in pieces:
        if parts:
            pos += 1  # the joining space
        if is_fact:
            spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)
    context = " ".join(parts)
    tokens = fact_tokens + background_tokens
    if parts:  # the first piece was counted after a space but has none
        tokens += counter.count(parts[0]) - counter.count(" " + parts[0])
    return BuiltContext(context, spans, len(background), tokens, tail_kept)
