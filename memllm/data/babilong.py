"""BabiLong: bAbI facts hidden in long book text, answered after the whole context.

Sources of samples (option ``source``):

``offline`` (default)
    Built here the way the benchmark builds them: take a bAbI sample (test samples from the
    ``en`` test files; train and validation samples from the ``en-10k`` train files — ``qa3`` has
    no en-10k train file, so its ``en`` train file is used), take a contiguous run of distractor
    sentences from a random point of a book, and scatter the sample's facts, in order, at random
    sentence boundaries of it (several facts may share one), so that the context reaches the
    target length in tokens; the question comes at the end. The last distractor sentence is cut
    to land on the target. Distractor sentences shorter than ``min_sentence_tokens`` are skipped
    (as BabiLong does). Test contexts come from the last ``distractor_test_fraction`` of each
    book, train/validation contexts from the rest. Every sample is seeded by ``(seed, split,
    task, length, index)``, so it is reproducible on its own.
``hf``
    The published data: ``RMT-team/babilong`` for test (the config is the length, the split is
    the task; ``hf_test_dataset`` may name ``RMT-team/babilong-1k-samples``) and
    ``RMT-team/babilong-train-5k-samples`` for train/validation. Needs ``datasets`` and the hub.
a folder
    Local files in that layout: ``FOLDER/data/qaN/<length>.json`` (or ``FOLDER/qaN/<length>.json``
    or ``FOLDER/<length>/qaN.json``; a JSON list or JSON lines of ``{input, question, target}``).

Lengths (``0k``, ``1k``, ``2k``, ``4k`` … ``128k``, ``1M`` or any token count such as ``1536``)
are the total budget in tokens, of which ``prompt_reserve`` (300, as the benchmark leaves for
the prompt) is kept for instruction and question: the context of a ``4k`` sample has
4096 − 300 = 3796 tokens. ``0k`` is the facts alone. Tokens are counted with ``tokenizer``
(default the bundled SmolLM2 tokenizer; the benchmark counts GPT-2 tokens, unavailable offline —
the two differ by a few percent on English prose).

Prompts: ``official`` is the benchmark's formatted input (instruction, examples, post-prompt,
each switchable, see :mod:`memllm.data.babilong_prompts`) and ``plain`` is
``{context}\\n\\nQuestion: {question}``; both are followed by ``answer_prefix`` (default
``"\\nAnswer:"``, so the target is ``" " + answer``; set it to ``""`` for the benchmark's exact
input). Scoring is the benchmark's ``compare_answers`` (:mod:`memllm.evaluation.metrics`).
Validation always
comes from train files, held out from the train samples.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memllm.core.config import check
from memllm.data.babi import BabiSample, load_babi
from memllm.data.babilong_prompts import format_official
from memllm.data.base import (
    Example,
    answer_target,
    check_lengths,
    check_split,
    read_json_records,
    rng_for,
    tokenizer_for,
)
from memllm.data.distractors import Document, load_documents, split_sentences
from memllm.errors import DataError
from memllm.evaluation.metrics import babilong_compare_answers, babilong_labels

log = logging.getLogger(__name__)

LENGTH_NAMES = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k", "256k", "512k", "1M")
_LENGTH = re.compile(r"(\d+(?:\.\d+)?)([kKmM]?)")


def parse_length(name: str | int) -> int:
    """``"4k"`` → 4096, ``"1M"`` → 1048576, ``"1536"`` → 1536 (tokens)."""
    m = _LENGTH.fullmatch(str(name).strip())
    if not m:
        raise DataError(f"length {name!r}: expected e.g. 0k, 1k, 4k, 128k, 1M or a token count")
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    return round(float(m.group(1)) * scale)


def context_budget(length: str | int, prompt_reserve: int = 300) -> int:
    """Tokens of context for a length name: ``length − prompt_reserve`` (0 for ``0k``)."""
    total = parse_length(length)
    return max(total - prompt_reserve, 0) if total > 0 else 0


@dataclass
class BabiLongOptions:
    """Options of ``task: babilong`` (see the module docstring)."""

    tasks: list[str] = field(default_factory=lambda: ["qa1"], metadata={"help": "qa1 … qa20"})
    lengths: list[str | int] = field(
        default_factory=lambda: ["0k"], metadata={"help": "0k, 1k, 4k, …, 128k, 1M or tokens"}
    )
    num_train: int = field(default=1000, metadata={"help": "per task and length"})
    num_validation: int = field(default=100, metadata={"help": "per task and length"})
    num_test: int = field(default=100, metadata={"help": "per task and length"})
    source: str = field(default="offline", metadata={"help": "offline | hf | a folder"})
    train_source: str = field(
        default="auto", metadata={"help": "auto | offline | hf | a folder (train/validation)"}
    )
    hf_test_dataset: str = "RMT-team/babilong"
    hf_train_dataset: str = "RMT-team/babilong-train-5k-samples"
    babi_path: str | None = field(default=None, metadata={"help": "bAbI archive or folder"})
    distractor: str = field(
        default="austen", metadata={"help": "austen | kjv | a text file/folder | hf:NAME"}
    )
    distractor_test_fraction: float = 0.2
    min_sentence_tokens: int = 10
    prompt_reserve: int = 300
    prompt: Literal["official", "plain"] = "official"
    instruction: bool = True
    examples: bool = True
    post_prompt: bool = True
    answer_prefix: str = "\nAnswer:"
    seed: int = 42
    tokenizer: str = field(default="smollm2-135m", metadata={"help": "counts length tokens"})

    def __post_init__(self) -> None:
        check(bool(self.tasks), "tasks", "give at least one task (qa1 … qa20)")
        for i, t in enumerate(self.tasks):
            check(
                bool(re.fullmatch(r"qa([1-9]|1[0-9]|20)", t)),
                f"tasks[{i}]",
                f"unknown task {t!r} (choose from qa1 … qa20)",
            )
        check(bool(self.lengths), "lengths", "give at least one length (e.g. 0k, 4k)")
        self.lengths = [str(length).strip() for length in self.lengths]
        for i, length in enumerate(self.lengths):
            check(
                bool(_LENGTH.fullmatch(str(length).strip())),
                f"lengths[{i}]",
                f"expected e.g. 0k, 1k, 4k, 128k, 1M or a token count, got {length!r}",
            )
        for key in (
            "num_train",
            "num_validation",
            "num_test",
            "min_sentence_tokens",
            "prompt_reserve",
        ):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(
            0.0 <= self.distractor_test_fraction < 1.0,
            "distractor_test_fraction",
            "must be in [0, 1)",
        )


# --------------------------------------------------------------------------------------------
# building samples
# --------------------------------------------------------------------------------------------


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


@dataclass
class BuiltContext:
    context: str
    fact_spans: list[tuple[int, int]]  # character spans of the facts in the context
    distractor_sentences: int
    tokens: int  # the pieces' token counts summed, each counted as placed (exact for byte BPE)


def build_context(
    facts: list[str], budget: int, pool: SentencePool | None, counter: TokenCounter, rng
) -> BuiltContext:
    """Scatter ``facts`` in order through distractor text so the context has ``budget`` tokens.

    With ``budget == 0`` (``0k``) or when the facts alone exceed the budget, the context is the
    facts alone.
    """
    background: list[str] = []
    fact_tokens = sum(counter.count_many([" " + f for f in facts]))
    background_tokens = 0
    if budget > 0 and pool is not None:
        if fact_tokens < budget:
            background, background_tokens = pool.take_counted(budget - fact_tokens, rng)
        else:
            log.warning("the facts alone (%d tokens) exceed the budget of %d", fact_tokens, budget)
    positions = sorted(rng.choices(range(len(background) + 1), k=len(facts)))
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
    return BuiltContext(context, spans, len(background), tokens)


def format_prompt(task: str, context: str, question: str, options: BabiLongOptions) -> str:
    """The model input for one sample under ``options`` (prompt style and switches)."""
    if options.prompt == "official":
        text = format_official(
            task,
            context,
            question,
            instruction=options.instruction,
            examples=options.examples,
            post_prompt=options.post_prompt,
        )
    else:
        text = f"{context.strip()}\n\nQuestion: {question}"
    return text + options.answer_prefix


# --------------------------------------------------------------------------------------------
# published layouts (hub or local files)
# --------------------------------------------------------------------------------------------


def supporting_facts_in_window(text: str, example, tokenizer, window: int) -> bool | None:
    """Whether every supporting fact of ``example`` starts inside the last ``window`` tokens of
    ``text`` (its prompt as the model reads it, e.g. chat-formatted).

    Such a question can be answered from the window alone; the others need what earlier
    segments held. The facts are searched in story order, each after the previous one, so a
    sentence that occurs twice is placed right. ``None`` when the example carries no facts
    (BabiLong's own files do not) or a fact is not in ``text``.
    """
    facts, supporting = example.meta.get("facts"), example.meta.get("supporting")
    if not facts or not supporting:
        return None
    starts, at = [], 0
    for fact in facts:
        at = text.find(fact, at)
        if at < 0:
            return None
        starts.append(at)
        at += len(fact)
    first = min(starts[i] for i in supporting)
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    before = len(tokenizer(text[:first], add_special_tokens=False)["input_ids"])
    return before >= tokens - window


def find_layout_file(folder: Path, task: str, length: str) -> Path:
    """The file of one task and length in a folder laid out like the Hugging Face datasets."""
    candidates = []
    for ext in (".json", ".jsonl", ".parquet"):
        candidates += [
            folder / "data" / task / f"{length}{ext}",
            folder / task / f"{length}{ext}",
            folder / length / f"{task}{ext}",
        ]
    candidates += sorted((folder / length).glob(f"{task}-*.parquet"))  # the hub's shard names
    candidates += sorted((folder / "data" / length).glob(f"{task}-*.parquet"))
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"{folder}: no file for {task} at {length} (looked for data/{task}/{length}.json)"
    )


def validate_rows(rows: list[Any], where: str) -> list[dict[str, str]]:
    """Check ``{input, question, target}`` records; errors name the file and record."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: record {i}: expected an object, got {type(row).__name__}")
        for key in ("input", "question", "target"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: record {i}: missing or non-text field {key!r}")
        if not row["target"].strip():
            raise DataError(f"{where}: record {i}: empty target")
        out.append({"input": row["input"], "question": row["question"], "target": row["target"]})
    return out


def load_layout(folder: str | Path, task: str, length: str) -> list[dict[str, str]]:
    """Records of one task and length from local files in the published layout."""
    path = find_layout_file(Path(folder), task, length)
    return validate_rows(read_json_records(path), str(path))


def load_hub(dataset: str, task: str, length: str) -> list[dict[str, str]]:
    """Records of one task and length from a BabiLong dataset on the Hugging Face hub."""
    if length not in LENGTH_NAMES:
        raise DataError(f"{dataset} has only the lengths {', '.join(LENGTH_NAMES)}, not {length}")
    try:
        import datasets  # optional: only with source "hf"
    except ImportError as err:
        raise DataError(
            "source 'hf' needs the datasets package: pip install 'memllm[hub]'"
        ) from err
    rows = datasets.load_dataset(dataset, length, split=task)
    return validate_rows([dict(r) for r in rows], f"{dataset}/{length}/{task}")


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------


class BabiLongTask:
    """``task: babilong``: examples per task and length, scored by the official checker."""

    name = "babilong"
    max_new_tokens = 20  # the benchmark's generation length

    def __init__(self, options: BabiLongOptions):
        self.options = options
        self._cache: dict[tuple[str, str, str], list[Example]] = {}
        self._pools: dict[str, SentencePool] = {}
        self._counter: TokenCounter | None = None

    @property
    def counter(self) -> TokenCounter:
        if self._counter is None:
            self._counter = TokenCounter(tokenizer_for(self.options.tokenizer))
        return self._counter

    # -- selection of bAbI samples ---------------------------------------------------------
    def babi_samples(self, split: str, task: str) -> list[BabiSample]:
        """The bAbI samples behind ``split`` (test: ``en`` test file; else en-10k train)."""
        o = self.options
        if split == "test":
            pool = load_babi(task, "test", lang="en", path=o.babi_path)
            rng = rng_for(o.seed, "babi-test", task)
            return [pool[i] for i in rng.sample(range(len(pool)), min(o.num_test, len(pool)))]
        try:
            pool = load_babi(task, "train", lang="en-10k", path=o.babi_path)
        except DataError:
            log.info("%s: no en-10k train file; using the en train file", task)
            pool = load_babi(task, "train", lang="en", path=o.babi_path)
        order = rng_for(o.seed, "babi-train", task).sample(range(len(pool)), len(pool))
        n_val = min(o.num_validation, len(order))
        chosen = order[:n_val] if split == "validation" else order[n_val : n_val + o.num_train]
        if split == "train" and len(chosen) < o.num_train:
            log.warning("%s: only %d train samples after validation", task, len(chosen))
        return [pool[i] for i in chosen]

    def pool(self, split: str) -> SentencePool:
        kind = "test" if split == "test" else "train"
        if kind not in self._pools:
            o = self.options
            if o.distractor.startswith("hf:"):
                docs = load_documents(o.distractor, split=kind)
                part = (0.0, 1.0)
            else:
                docs = load_documents(o.distractor)
                cut = 1.0 - o.distractor_test_fraction
                part = (cut, 1.0) if kind == "test" else (0.0, cut)
                if o.distractor_test_fraction == 0:
                    part = (0.0, 1.0)
            self._pools[kind] = SentencePool(
                docs, self.counter, min_tokens=o.min_sentence_tokens, part=part
            )
        return self._pools[kind]

    # -- examples ----------------------------------------------------------------------------
    def examples(self, split: str) -> list[Example]:
        check_split(split)
        out: list[Example] = []
        for task in self.options.tasks:
            for length in self.options.lengths:
                key = (split, task, str(length))
                if key not in self._cache:
                    self._cache[key] = self._build(split, task, str(length))
                out.extend(self._cache[key])
        return out

    def _source_for(self, split: str) -> str:
        o = self.options
        if split == "test":
            return o.source
        if o.train_source != "auto":
            return o.train_source
        return o.source if o.source in ("offline", "hf") else "offline"

    def _build(self, split: str, task: str, length: str) -> list[Example]:
        source = self._source_for(split)
        if source == "offline":
            return self._build_offline(split, task, length)
        return self._from_records(split, task, length, source)

    def _build_offline(self, split: str, task: str, length: str) -> list[Example]:
        from tqdm.auto import tqdm

        o = self.options
        samples = self.babi_samples(split, task)
        budget = context_budget(length, o.prompt_reserve)
        pool = self.pool(split) if budget > 0 else None
        examples = []
        bar = tqdm(
            samples,
            desc=f"babilong {task} {length} {split}",
            disable=None if budget * len(samples) > 2_000_000 else True,
            leave=False,
        )
        for i, sample in enumerate(bar):
            rng = rng_for(o.seed, split, task, length, i)
            built = build_context(list(sample.facts), budget, pool, self.counter, rng)
            examples.append(
                self._example(
                    f"babilong/{task}/{length}/{split}/{i}",
                    task,
                    length,
                    built.context,
                    sample.question,
                    sample.answer,
                    {
                        "facts": list(sample.facts),
                        "supporting": list(sample.supporting),
                        "fact_spans": built.fact_spans,
                        "target_context_tokens": budget,
                        "context_tokens": built.tokens,
                        "babi_source": sample.source,
                    },
                )
            )
        return examples

    def _from_records(self, split: str, task: str, length: str, source: str) -> list[Example]:
        o = self.options
        if source == "hf":
            dataset = o.hf_test_dataset if split == "test" else o.hf_train_dataset
            rows = load_hub(dataset, task, length)
        elif Path(source).expanduser().is_dir():
            rows = load_layout(Path(source).expanduser(), task, length)
        else:
            raise DataError(f"source {source!r}: expected offline, hf or an existing folder")
        if split == "test":
            chosen = list(range(min(o.num_test, len(rows))))
        else:
            order = rng_for(o.seed, "records-train", task, length).sample(
                range(len(rows)), len(rows)
            )
            n_val = min(o.num_validation, len(order))
            chosen = order[:n_val] if split == "validation" else order[n_val : n_val + o.num_train]
        return [
            self._example(
                f"babilong/{task}/{length}/{split}/{i}",
                task,
                length,
                rows[j]["input"],
                rows[j]["question"],
                rows[j]["target"],
                {"record": j, "source": source},
            )
            for i, j in enumerate(chosen)
        ]

    def _example(self, id_, task, length, context, question, answer, extra) -> Example:
        question = question.strip()
        prompt = format_prompt(task, context, question, self.options)
        meta = {
            "task": task,
            "length": length,
            "group": f"{task}/{length}",
            "question": question,
            "answer": answer.strip(),
            **extra,
        }
        return Example(id_, prompt, answer_target(prompt, answer), meta)

    # -- scoring -------------------------------------------------------------------------------
    def score(self, examples: list[Example], outputs: list[str]) -> dict[str, list[float]]:
        """Per-example ``accuracy`` (1.0/0.0) under BabiLong's ``compare_answers``."""
        check_lengths(examples, outputs, self.name)
        return {
            "accuracy": [
                float(
                    babilong_compare_answers(
                        ex.meta["answer"],
                        out,
                        ex.meta["question"],
                        babilong_labels(ex.meta["task"]),
                    )
                )
                for ex, out in zip(examples, outputs, strict=True)
            ]
        }
