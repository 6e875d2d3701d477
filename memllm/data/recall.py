"""Recall: key→value facts hidden in book text, one key asked after the whole context.

The first rung of the recall ladder: does a memory carry a fact from an earlier segment to the
question at all? Each story states ``K`` facts (``num_facts``: 1, 2, 4, 8), such as "The locker
of Anna is number 47.", about ``K`` different people, and asks one person's number. The keys are
first names; the values come from a closed label set (``num_values`` two-digit numbers, each
drawn uniformly), so a model that does not know the fact is right with probability
:attr:`RecallTask.chance` ``= 1 / num_values``.

``overwrites: N`` restates N of the keys later with a new value (a different number); the
question then asks about one of them and the latest value counts — the binding bAbI ``qa1``
needs ("If a person was in different locations, use the latest").

The facts are scattered in order through distractor text exactly as BabiLong's are
(:func:`memllm.data.haystack.build_context`: Austen or the King James Bible from
:mod:`memllm.data.distractors`, test text from the last ``distractor_test_fraction`` of each
book), to a length in tokens of ``tokenizer``: ``0k`` is the facts alone, ``1k`` … ``128k`` (or
a token count) the whole prompt, of which ``prompt_reserve`` tokens are left for the question.
With the question inline (``question_segment: inline``), every fact is followed by at least
``segment_length`` tokens of distractor text, so it lies before the last segment of a model
reading segments of that length (``meta["facts_before_last_segment"]`` says whether the text
was long enough for that; at ``0k`` it never is). With ``question_segment: own``, the question
takes the last segment alone (:mod:`memllm.data.layout`) and facts may lie anywhere in the
context.

Examples carry ``meta["facts"]`` (the fact sentences in context order), ``meta["supporting"]``
(the index of the fact that answers: the latest statement of the asked key) and
``meta["fact_spans"]``, as offline BabiLong examples do, so
:func:`memllm.data.babilong.supporting_facts_in_window` splits them by where the answer lies.

Splits never share a key/value assignment: the names are partitioned between train, validation
and test (seeded by ``seed``), so no (name, number) pair of a test story is ever seen in
training, and a check refuses splits that would share one. Every story is seeded by
``(seed, split, K, index)`` — the same facts at every length, so lengths compare paired — and
its distractor text by ``(seed, split, K, length, index)``.

``questions_per_story: all`` makes each train story one example per key (the K questions share
one context, ``meta["context_id"]``); validation and test keep one question per story.

Scoring: the first line of the output, closed-set match — right when the gold number is the
only label it names (:func:`recall_correct`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from memllm.core.config import check
from memllm.data.babilong import (
    FACT_SUBSETS,
    context_budget,
    facts_window_labels,
    parse_length,
)
from memllm.data.base import (
    SPLITS,
    Breakdown,
    Example,
    Reading,
    Task,
    answer_target,
    check_disjoint_splits,
    check_lengths,
    check_split,
    rng_for,
    tokenizer_for,
)
from memllm.data.haystack import SentencePool, TokenCounter, build_context, cached_pool
from memllm.errors import DataError

log = logging.getLogger(__name__)

FACT = "The locker of {key} is number {value}."
QUESTION = "What is the locker number of {key}?"
MAX_VALUES = 90  # the two-digit numbers 10 … 99

# Common first names, split between train, validation and test by the seed (SPLIT_SHARES), so
# that no key is shared between splits.
_NAMES = (
    "Aaron Abigail Adam Adrian Alan Albert Alex Alice Amanda Amber Amy Andrea Andrew Angela "
    "Anna Anne Anthony Arthur Ashley Austin Barbara Benjamin Betty Beverly Billy Bobby Brandon "
    "Brenda Brian Bruce Bryan Carl Carol Caroline Catherine Charles Charlotte Cheryl Chloe "
    "Christian Christina Christine Christopher Cynthia Daniel Danielle David Deborah Debra "
    "Denise Dennis Diana Diane Donald Donna Doris Dorothy Douglas Dylan Edward Elizabeth Ella "
    "Emily Emma Eric Ethan Eugene Evelyn Frances Frank Gabriel Gary George Gerald Gloria Grace "
    "Gregory Hannah Harold Harry Heather Helen Henry Isabella Jack Jacob Jacqueline James Janet "
    "Janice Jason Jean Jeffrey Jennifer Jeremy Jerry Jesse Jessica Joan Joe John Johnny Jonathan "
    "Jordan Jose Joseph Joshua Joyce Juan Judith Judy Julia Julie Justin Karen Katherine Kathleen "
    "Kathryn Kayla Keith Kelly Kenneth Kevin Kimberly Kyle Laura Lauren Lawrence Linda Lisa "
    "Logan Lori Louis Madison Margaret Maria Marie Marilyn Mark Martha Mary Matthew Megan "
    "Melissa Michael Michelle Nancy Natalie Nathan Nicholas Nicole Noah Olivia Pamela Patricia "
    "Patrick Paul Peter Philip Rachel Ralph Randy Raymond Rebecca Richard Robert Roger Ronald "
    "Rose Roy Russell Ruth Ryan Samantha Samuel Sandra Sara Sarah Scott Sean Sharon Shirley "
    "Sophia Stephanie Stephen Steven Susan Teresa Terry Theresa Thomas Timothy Tyler Victoria "
    "Vincent Virginia Walter Wayne William Zachary"
)
NAMES = tuple(_NAMES.split())
SPLIT_SHARES = {"train": 0.7, "validation": 0.1, "test": 0.2}


@dataclass
class RecallOptions:
    """Options of ``task: recall`` (see the module docstring)."""

    num_facts: list[int] = field(
        default_factory=lambda: [1], metadata={"help": "facts per story, e.g. [1, 2, 4, 8]"}
    )
    lengths: list[str | int] = field(
        default_factory=lambda: ["0k"], metadata={"help": "0k, 1k, 4k, …, 128k or tokens"}
    )
    overwrites: int = field(
        default=0, metadata={"help": "keys restated later with a new value (the latest counts)"}
    )
    num_values: int = field(
        default=20, metadata={"help": "size of the closed label set (chance = 1 / num_values)"}
    )
    num_train: int = field(default=1000, metadata={"help": "stories per K and length"})
    num_validation: int = field(default=100, metadata={"help": "per K and length"})
    num_test: int = field(default=100, metadata={"help": "per K and length"})
    segment_length: int = field(
        default=512,
        metadata={
            "help": "inline: every fact lies at least this many tokens before the question "
            "(before the last segment of a model reading segments this long); 0 = anywhere"
        },
    )
    question_segment: Literal["inline", "own"] = field(
        default="inline",
        metadata={"help": "own: the question part alone in the last segment"},
    )
    questions_per_story: Literal["one", "all"] = field(
        default="one", metadata={"help": "all: one train example per key, sharing one context"}
    )
    instruction: str = field(
        default="", metadata={"help": "text before the question (travels with it)"}
    )
    answer_prefix: str = "\nAnswer:"
    distractor: str = field(
        default="austen", metadata={"help": "austen | kjv | a text file/folder | hf:NAME"}
    )
    distractor_test_fraction: float = 0.2
    min_sentence_tokens: int = 10
    prompt_reserve: int = field(
        default=32, metadata={"help": "tokens of a length left for the question"}
    )
    seed: int = 42
    tokenizer: str = field(default="smollm2-135m", metadata={"help": "counts length tokens"})

    def __post_init__(self) -> None:
        if isinstance(self.num_facts, int):
            self.num_facts = [self.num_facts]
        check(bool(self.num_facts), "num_facts", "give at least one K (e.g. [1, 2, 4, 8])")
        smallest_split = int(len(NAMES) * min(SPLIT_SHARES.values()))
        for i, k in enumerate(self.num_facts):
            check(
                1 <= k <= smallest_split,
                f"num_facts[{i}]",
                f"must be in 1 … {smallest_split} (the names of one split), got {k}",
            )
        check(bool(self.lengths), "lengths", "give at least one length (e.g. 0k, 4k)")
        self.lengths = [str(length).strip() for length in self.lengths]
        for i, length in enumerate(self.lengths):
            try:
                parse_length(length)
            except DataError:
                check(False, f"lengths[{i}]", f"expected e.g. 0k, 1k, 4k or tokens, got {length!r}")
        check(
            0 <= self.overwrites <= min(self.num_facts),
            "overwrites",
            f"must be in 0 … {min(self.num_facts)} (the smallest num_facts)",
        )
        check(
            2 <= self.num_values <= MAX_VALUES,
            "num_values",
            f"must be in 2 … {MAX_VALUES}, got {self.num_values}",
        )
        for key in (
            "num_train",
            "num_validation",
            "num_test",
            "segment_length",
            "min_sentence_tokens",
            "prompt_reserve",
        ):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(
            0.0 <= self.distractor_test_fraction < 1.0,
            "distractor_test_fraction",
            "must be in [0, 1)",
        )


@dataclass(frozen=True)
class Story:
    """The facts of one recall story and the question asked about it.

    Attributes:
        statements: ``(key, value)`` in the order stated; an overwritten key appears twice.
        asked: the key the (single) question asks about.
    """

    statements: tuple[tuple[str, str], ...]
    asked: str

    @property
    def facts(self) -> list[str]:
        return [FACT.format(key=k, value=v) for k, v in self.statements]

    def answer(self, key: str) -> tuple[str, int]:
        """The latest value of ``key`` and the index of the statement that gave it."""
        index = max(i for i, (k, _) in enumerate(self.statements) if k == key)
        return self.statements[index][1], index

    def keys(self) -> list[str]:
        """Every key, in order of first statement."""
        return list(dict.fromkeys(k for k, _ in self.statements))


def value_labels(num_values: int) -> tuple[str, ...]:
    """The closed label set: the first ``num_values`` two-digit numbers."""
    return tuple(str(10 + i) for i in range(num_values))


def split_names(seed: int) -> dict[str, tuple[str, ...]]:
    """The names of each split: a seeded partition of :data:`NAMES` (no name in two splits)."""
    names = rng_for(seed, "recall-names").sample(NAMES, len(NAMES))
    out, start = {}, 0
    for i, split in enumerate(SPLITS):
        end = len(names) if i == len(SPLITS) - 1 else start + int(len(names) * SPLIT_SHARES[split])
        out[split] = tuple(names[start:end])
        start = end
    return out


def make_story(names: tuple[str, ...], labels: tuple[str, ...], k: int, overwrites: int, rng):
    """One story: ``k`` distinct keys with uniform values, then ``overwrites`` of them restated
    with a different value; the question asks about an overwritten key when there is one."""
    keys = rng.sample(names, k)
    statements = [(key, rng.choice(labels)) for key in keys]
    current = dict(statements)
    changed = rng.sample(keys, overwrites)
    for key in changed:
        value = rng.choice([v for v in labels if v != current[key]])
        statements.append((key, value))
        current[key] = value
    asked = rng.choice(changed) if changed else rng.choice(keys)
    return Story(tuple(statements), asked)


_WORD = re.compile(r"\w+")


def recall_correct(answer: str, output: str, labels: tuple[str, ...] | set[str]) -> bool:
    """Closed-set match on the first line of ``output``: the gold ``answer`` is the one and only
    label among its words (so "47", "Number 47." and "Anna's locker is 47" are right; "47 or
    12", "4" and "147" are not)."""
    line = output.strip().split("\n", 1)[0]
    named = {w for w in _WORD.findall(line) if w in labels}
    return named == {answer}


class RecallTask(Task):
    """``task: recall``: K facts per story, one key asked; closed-set exact match."""

    name = "recall"
    max_new_tokens = 8  # a number, perhaps a period: the first line is all that is scored
    breakdown_subsets = FACT_SUBSETS  # what breakdown() labels (an experiment's select.subset)
    # what a report prints beside the numbers (metric → definition); chance is ``self.chance``
    metric_definitions: ClassVar[dict[str, str]] = {
        "accuracy": "closed-set match: the first line of the output names the gold number and "
        "no other label of the set (chance = 1 / num_values)",
    }

    def __init__(self, options: RecallOptions):
        self.options = options
        self._cache: dict[tuple[str, int, str], list[Example]] = {}
        self._pools: dict[str, SentencePool] = {}
        self._counter: TokenCounter | None = None
        self._checked = False

    @property
    def labels(self) -> tuple[str, ...]:
        """The closed set every answer comes from."""
        return value_labels(self.options.num_values)

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess from :attr:`labels` (values are drawn uniformly)."""
        return 1.0 / self.options.num_values

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = TokenCounter(tokenizer_for(self.options.tokenizer))
        return self._counter

    # -- stories -------------------------------------------------------------------------------
    def stories(self, split: str, k: int) -> list[Story]:
        """The stories of ``split`` with ``k`` facts (the same at every length)."""
        o = self.options
        count = {"train": o.num_train, "validation": o.num_validation, "test": o.num_test}[split]
        names = split_names(o.seed)[split]
        labels = self.labels
        return [
            make_story(names, labels, k, o.overwrites, rng_for(o.seed, "recall", split, k, i))
            for i in range(count)
        ]

    def check_splits(self) -> None:
        """Refuse splits that share a key/value assignment (a DataError naming both splits)."""
        if self._checked:
            return
        for k in self.options.num_facts:
            check_disjoint_splits(
                {s: [pair for st in self.stories(s, k) for pair in st.statements] for s in SPLITS},
                "the key/value assignment",
                lambda pair: f"{pair[0]} → {pair[1]}",
                task=f"recall K={k}",
            )
        self._checked = True

    def pool(self, split: str) -> SentencePool:
        return cached_pool(self._pools, self.options, self.counter, split)

    # -- examples ------------------------------------------------------------------------------
    def examples(self, split: str) -> list[Example]:
        check_split(split)
        self.check_splits()
        out: list[Example] = []
        for k in self.options.num_facts:
            for length in self.options.lengths:
                key = (split, k, length)
                if key not in self._cache:
                    self._cache[key] = self._build(split, k, length)
                out.extend(self._cache[key])
        return out

    def _build(self, split: str, k: int, length: str) -> list[Example]:
        o = self.options
        budget = context_budget(length, o.prompt_reserve)
        pool = self.pool(split) if budget > 0 else None
        inline = o.question_segment == "inline"
        tail = o.segment_length if inline else 0
        dense = split == "train" and o.questions_per_story == "all"
        examples, short = [], 0
        for i, story in enumerate(self.stories(split, k)):
            rng = rng_for(o.seed, "recall-context", split, k, length, i)
            built = build_context(story.facts, budget, pool, self.counter, rng, tail_tokens=tail)
            short += not built.tail_kept
            context_id = f"recall/k{k}/{length}/{split}/{i}"
            shared = {
                "task": "recall",
                "num_facts": k,
                "length": length,
                "group": f"k{k}/{length}",
                "facts": story.facts,
                "fact_spans": built.fact_spans,
                "target_context_tokens": budget,
                "context_tokens": built.tokens,
                "facts_before_last_segment": built.tail_kept if inline else True,
                "context_id": context_id,
            }
            asked = story.keys() if dense else [story.asked]
            for j, key in enumerate(asked):
                value, index = story.answer(key)
                meta = {
                    **shared,
                    "key": key,
                    "overwritten": sum(k_ == key for k_, _ in story.statements) > 1,
                    "question": QUESTION.format(key=key),
                    "answer": value,
                    "supporting": [index],
                }
                example_id = f"{context_id}/q{j}" if dense else context_id
                examples.append(self._example(example_id, built.context, meta))
        if short and tail:
            log.info(
                "recall K=%d %s %s: in %d of %d stories the context is too short to keep the "
                "facts %d tokens before the question (meta facts_before_last_segment)",
                k,
                length,
                split,
                short,
                len(examples),
                tail,
            )
        return examples

    def _example(self, id_: str, context: str, meta: dict) -> Example:
        o = self.options
        question_part = f"{o.instruction}\n\n" if o.instruction else ""
        question_part += f"Question: {meta['question']}{o.answer_prefix}"
        prompt = f"{context}\n\n{question_part}"
        example = Example(id_, prompt, answer_target(prompt, meta["answer"]), meta)
        if o.question_segment == "own":
            example.context_part, example.question_part = context, question_part
        return example

    # -- scoring -------------------------------------------------------------------------------
    def answer_candidates(self, example: Example) -> tuple[str, ...]:
        """Every answer is one of :attr:`labels` (``eval.closed_set`` scores each)."""
        return self.labels

    def score(self, examples: list[Example], outputs: list[str]) -> dict[str, list[float]]:
        """Per-example ``accuracy`` (1.0/0.0): :func:`recall_correct` on the closed label set."""
        check_lengths(examples, outputs, self.name)
        labels = set(self.labels)
        return {
            "accuracy": [
                float(recall_correct(ex.meta["answer"], out, labels))
                for ex, out in zip(examples, outputs, strict=True)
            ]
        }

    def breakdown(self, examples: list[Example], tokenizer, reading: Reading) -> Breakdown | None:
        """The questions split by where the answering fact is: in the arms' last segment, or
        earlier (every one of them, by construction, unless the context was too short)."""
        window = reading.segment_length
        labels = facts_window_labels(examples, tokenizer, reading)
        if labels is None:
            return None
        return Breakdown(
            "where the supporting facts are",
            labels,
            f"recall questions split by whether the answering fact lies in the last {window} "
            f"tokens of the prompt or earlier (only a memory, or base's whole window, can bring "
            f"it to the answer); chance is 1/{self.options.num_values}.",
            order=("facts in window", "facts earlier"),
        )
