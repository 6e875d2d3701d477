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
a dataset source mapping
    Any local or hub dataset read through ``datasets``, with a field mapping
    (:class:`memllm.data.hf_source.DatasetSource`), e.g. ``{path: my.jsonl, fields: {context:
    story, question: q, answer: a}, split: test}``; ``{task}`` and ``{length}`` in its path,
    name and split are filled in.

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
input). Scoring is the benchmark's ``compare_answers`` (:mod:`memllm.data.babilong_metric`).
Validation always comes from train files, held out from the train samples.

``question_segment: own`` keeps the context apart from the rest of the prompt (instruction,
few-shot examples, post-prompt, question, answer cue), which the encoder puts alone in the last
segment (:mod:`memllm.data.layout`): memory arms then read the official instruction with the
question instead of losing it in the first segment, and ``window`` is at chance by
construction. ``base`` still reads the whole prompt inline.

Splits never share a story (built offline): validation is made of whole train-file stories held
out from train, and no train or validation story tells the same facts as a story of the test
file (``qa4``'s two-fact stories often do; ``qa17``'s sometimes). A check refuses to build
splits that share a story (:func:`memllm.data.base.check_disjoint_splits`).

``questions_per_story: all`` (``qa1`` only, train split only): each train story becomes one
example per person it moves ("Where is X?" after the whole story, answered with X's latest
place), all sharing one context (``meta["context_id"]``); ``num_train`` then counts stories.
Validation and test keep one question per context, so that their questions stay independent.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from memllm.core.config import check
from memllm.data.babi import BabiSample, group_stories, load_babi, story_text, where_questions
from memllm.data.babilong_metric import babilong_compare_answers, babilong_labels
from memllm.data.babilong_prompts import OFFICIAL_PROMPTS, TEMPLATE, format_official
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
    read_json_records,
    rng_for,
    tokenizer_for,
)
from memllm.data.haystack import SentencePool, TokenCounter, build_context, cached_pool
from memllm.data.hf_source import DatasetSource, load_records
from memllm.errors import DataError

log = logging.getLogger(__name__)

CLOSED_SET_TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
"""Tasks whose answer is one label of the task: ``eval.closed_set`` can score them."""

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
    source: str | DatasetSource = field(
        default="offline", metadata={"help": "offline | hf | a folder | a dataset source mapping"}
    )
    train_source: str | DatasetSource = field(
        default="auto",
        metadata={"help": "auto | offline | hf | a folder | a mapping (train/validation)"},
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
    question_segment: Literal["inline", "own"] = field(
        default="inline",
        metadata={
            "help": "own: the context fills the earlier segments, the last segment holds only "
            "instruction, examples, question and answer cue"
        },
    )
    questions_per_story: Literal["one", "all"] = field(
        default="one",
        metadata={"help": "all (qa1): one train example per person of a story, one context"},
    )

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
        check(
            self.questions_per_story == "one" or set(self.tasks) == {"qa1"},
            "questions_per_story",
            "all is defined for qa1 only (where every person's latest place is known)",
        )


# --------------------------------------------------------------------------------------------
# building samples (the haystack itself: memllm.data.haystack)
# --------------------------------------------------------------------------------------------


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


def format_parts(
    task: str, context: str, question: str, options: BabiLongOptions
) -> tuple[str, str]:
    """``(context part, question part)`` of one sample under ``question_segment: own``: the
    context block, and everything else of the prompt (instruction, examples, post-prompt,
    question, answer prefix) in the order the official template gives it."""
    if options.prompt == "official":
        parts = OFFICIAL_PROMPTS[task]
        rest = TEMPLATE.replace("<context>\n{context}\n</context>\n\n", "").format(
            instruction=parts["instruction"] if options.instruction else "",
            examples=parts["examples"] if options.examples else "",
            post_prompt=parts["post_prompt"] if options.post_prompt else "",
            question=question,
        )
        return f"<context>\n{context.strip()}\n</context>", rest.strip() + options.answer_prefix
    return context.strip(), f"Question: {question}{options.answer_prefix}"


# --------------------------------------------------------------------------------------------
# published layouts (hub or local files)
# --------------------------------------------------------------------------------------------


FACT_SUBSETS = ("facts in window", "facts earlier")
"""The subsets :func:`facts_window_labels` labels (a task's ``breakdown_subsets``)."""


def facts_window_labels(
    examples: list[Example], tokenizer, reading: Reading
) -> dict[str, str] | None:
    """Example id → "facts in window" / "facts earlier" for an arm reading ``reading``'s last
    segment (the breakdown of every task whose examples carry fact positions); None when an
    example's facts cannot be located."""
    from memllm.data.prompting import format_example

    labels = {}
    for ex in examples:
        text = format_example(tokenizer, ex.prompt, ex.target, reading.chat)[0]
        inside = supporting_facts_in_window(text, ex, tokenizer, reading.segment_length)
        if inside is None:
            return None
        labels[ex.id] = "facts in window" if inside else "facts earlier"
    return labels


def supporting_facts_in_window(text: str, example, tokenizer, window: int) -> bool | None:
    """Whether every supporting fact of ``example`` starts inside the last ``window`` tokens of
    ``text`` (its prompt as the model reads it, e.g. chat-formatted).

    Such a question can be answered from the window alone; the others need what earlier
    segments held. The facts are searched in story order, each after the previous one, so a
    sentence that occurs twice is placed right. ``None`` when the example carries no facts
    (BabiLong's own files do not) or a fact is not in ``text``.

    An example laid out with its question in its own segment (``example.question_part`` set)
    has every fact before the last segment whatever ``window`` is (False), as long as its facts
    are in its context part.
    """
    facts, supporting = example.meta.get("facts"), example.meta.get("supporting")
    if not facts or not supporting:
        return None
    if getattr(example, "question_part", None) is not None:
        context = example.context_part or ""
        return False if all(f in context for f in facts) else None
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


class BabiLongTask(Task):
    """``task: babilong``: examples per task and length, scored by the official checker."""

    name = "babilong"
    max_new_tokens = 20  # the benchmark's generation length
    breakdown_subsets = FACT_SUBSETS  # what breakdown() labels (an experiment's select.subset)

    def __init__(self, options: BabiLongOptions):
        self.options = options
        self._cache: dict[tuple[str, str, str], list[Example]] = {}
        self._pools: dict[str, SentencePool] = {}
        self._counter: TokenCounter | None = None
        self._train_split: dict[str, tuple[list[BabiSample], list[list[BabiSample]]]] = {}
        self._checked: set[str] = set()

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
        validation, train_stories = self._held_out(task)
        if split == "validation":
            return validation
        if o.questions_per_story == "all":  # one sample (the whole story) per train story
            chosen = [max(g, key=lambda x: len(x.facts)) for g in train_stories[: o.num_train]]
        else:
            candidates = [sample for group in train_stories for sample in group]
            rng = rng_for(o.seed, "babi-train", task)
            chosen = rng.sample(candidates, min(o.num_train, len(candidates)))
        if len(chosen) < o.num_train:
            log.warning("%s: only %d train samples after validation", task, len(chosen))
        return chosen

    def _held_out(self, task: str) -> tuple[list[BabiSample], list[list[BabiSample]]]:
        """Validation samples (whole held-out stories) and the train stories (shuffled), from
        the train file, without the stories that the test file also tells."""
        if task in self._train_split:
            return self._train_split[task]
        o = self.options
        try:
            pool = load_babi(task, "train", lang="en-10k", path=o.babi_path)
        except DataError:
            log.info("%s: no en-10k train file; using the en train file", task)
            pool = load_babi(task, "train", lang="en", path=o.babi_path)
        test = load_babi(task, "test", lang="en", path=o.babi_path)
        in_test = {story_text(g) for g in group_stories(test).values()}
        by_text: dict[str, list[BabiSample]] = {}  # one story may be told twice in a file
        for group in group_stories(pool).values():
            by_text.setdefault(story_text(group), []).extend(group)
        texts = [t for t in by_text if t not in in_test]
        if len(texts) < len(by_text):
            log.info(
                "%s: %d train stories are also test stories; left out",
                task,
                len(by_text) - len(texts),
            )
        texts = rng_for(o.seed, "babi-train-stories", task).sample(texts, len(texts))
        validation: list[BabiSample] = []
        used = 0
        while len(validation) < o.num_validation and used < len(texts):
            validation.extend(by_text[texts[used]])
            used += 1
        # the rest of the last validation story is used by neither split
        result = validation[: o.num_validation], [by_text[t] for t in texts[used:]]
        self._train_split[task] = result
        return result

    def check_splits(self, task: str) -> None:
        """Refuse to build offline splits of ``task`` that share a story (a DataError naming
        both splits and the story)."""
        if task in self._checked:
            return
        texts: dict[str, str] = {}
        for lang, file_split in (("en", "test"), ("en-10k", "train"), ("en", "train")):
            try:
                pool = load_babi(task, file_split, lang=lang, path=self.options.babi_path)
            except DataError:
                continue
            for group in group_stories(pool).values():
                texts.setdefault(group[0].story or group[0].source, story_text(group))
        check_disjoint_splits(
            {
                split: [
                    texts.get(x.story or x.source, x.story) for x in self.babi_samples(split, task)
                ]
                for split in SPLITS
            },
            "the story",
            lambda text: repr(text if len(text) <= 80 else text[:77] + "..."),
            task=f"babilong {task}",
        )
        self._checked.add(task)

    def pool(self, split: str) -> SentencePool:
        return cached_pool(self._pools, self.options, self.counter, split)

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
            if all(self._source_for(s) == "offline" for s in SPLITS):
                self.check_splits(task)
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
        dense = split == "train" and o.questions_per_story == "all"
        for i, sample in enumerate(bar):
            rng = rng_for(o.seed, split, task, length, i)
            built = build_context(list(sample.facts), budget, pool, self.counter, rng)
            context_id = f"babilong/{task}/{length}/{split}/{i}"
            shared = {
                "facts": list(sample.facts),
                "fact_spans": built.fact_spans,
                "target_context_tokens": budget,
                "context_tokens": built.tokens,
                "babi_source": sample.source,
                "context_id": context_id,
            }
            if dense:
                questions = where_questions(sample.facts)
            else:
                questions = [(sample.question, sample.answer, *sample.supporting)]
            for j, (question, answer, *supporting) in enumerate(questions):
                examples.append(
                    self._example(
                        f"{context_id}/q{j}" if dense else context_id,
                        task,
                        length,
                        built.context,
                        question,
                        answer,
                        {**shared, "supporting": list(supporting)},
                    )
                )
        return examples

    def _from_records(self, split: str, task: str, length: str, source: str) -> list[Example]:
        o = self.options
        if isinstance(source, DatasetSource):
            # context/question/answer of any dataset, mapped to the published fields
            filled = source.filled(task=task, length=length)
            where = "source" if split == "test" else "train_source"
            records = load_records(filled, ("context", "question", "answer"), where)
            rows = validate_rows(
                [
                    {"input": r["context"], "question": r["question"], "target": r["answer"]}
                    for r in records
                ],
                f"{filled.path} ({task}/{length})",
            )
            source = filled.path
        elif source == "hf":
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
        example = Example(id_, prompt, answer_target(prompt, answer), meta)
        if self.options.question_segment == "own":
            example.context_part, example.question_part = format_parts(
                task, context, question, self.options
            )
        return example

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

    def answer_candidates(self, example: Example) -> tuple[str, ...] | None:
        """``qa1``–``qa5`` answer with one label of the task (``eval.closed_set`` scores
        each); the other tasks' answers (lists, counts, yes/no/maybe with reasoning) are not
        scored that way here."""
        task = example.meta.get("task")
        return babilong_labels(task) if task in CLOSED_SET_TASKS else None

    def breakdown(self, examples: list[Example], tokenizer, reading: Reading) -> Breakdown | None:
        """The questions split by where their supporting facts are: all in the arms' last
        segment, or starting earlier. None for BabiLong files, which do not say where their
        facts are."""
        if not all(ex.meta.get("facts") for ex in examples):
            return None
        window = reading.segment_length
        labels = facts_window_labels(examples, tokenizer, reading)
        if labels is None:
            return None
        return Breakdown(
            "where the supporting facts are",
            labels,
            f"BabiLong questions split by whether every supporting fact lies in the last {window} "
            "tokens of the prompt (the window and memory arms' last segment: answerable without a "
            "memory) or starts earlier (only a memory, or base's whole window, can bring it to "
            "the answer).",
            order=("facts in window", "facts earlier"),
        )
