"""The shapes every task shares: :class:`Example`, the :class:`Task` protocol with its evaluation
hooks (:class:`Reading`, :class:`ModelScores`, :class:`Breakdown`), small helpers."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from memllm.errors import DataError

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    """One model input with its gold answer.

    Attributes:
        id: unique within a task (e.g. ``babilong/qa1/4k/test/7``).
        prompt: everything the model reads, formatted, ending where the answer begins.
        target: the gold text the model should generate after ``prompt`` (with a leading space
            when the prompt ends with a cue such as ``Answer:``); empty for the corpus.
        meta: task-specific details (the bare answer, question, supporting facts, ...);
            examples that share one context (``data.questions_per_story: all``) share
            ``meta["context_id"]``.
        context_part, question_part: set only under ``data.question_segment: own``: the prompt
            split into the context (read in the earlier segments) and the rest — instruction or
            few-shot prefix, question, answer cue — which :mod:`memllm.data.layout` puts alone
            in the last segment. ``prompt`` stays the inline whole (what ``base`` reads).
    """

    id: str
    prompt: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict)
    context_part: str | None = None
    question_part: str | None = None


@dataclass
class Reading:
    """How an evaluated arm reads the examples, and what it brings beside its model: what a
    task's hooks (:meth:`Task.model_scores`, :meth:`Task.breakdown`) know about the arm.

    Attributes:
        segment_length: tokens per segment. A model with memory writes the earlier segments
            into it and reads the last one; a model without memory sees only the last
            ``segment_length`` tokens (the base arm: its whole window).
        chat: prompts go through the tokenizer's chat template
            (:func:`memllm.data.prompting.format_example`).
        batch_size: examples per forward call.
        arm: the arm's name (for notes).
        outputs: the arm's generation for each example.
        heads: auxiliary heads trained with the arm or saved in its checkpoint, by name
            (:meth:`Task.checkpoint_heads`).
        reference_model: returns the bare backbone (loaded on first call), for scores that
            compare with it.
        train_task: the task the arm was trained on (a probe trains on its examples).
        seed: the experiment's seed.
        output_dir: the arm's folder, for official prediction files (None: write none).
    """

    segment_length: int
    chat: bool = False
    batch_size: int = 16
    arm: str = ""
    outputs: Sequence[str] = ()
    heads: Mapping[str, Any] = field(default_factory=dict)
    reference_model: Callable[[], Any] | None = None
    train_task: Any = None
    seed: int = 0
    output_dir: Path | None = None


@dataclass
class ModelScores:
    """A task's scores that need the model, beside those of its generations.

    Attributes:
        scores: metric → one value per example.
        notes: facts a reader of the report needs about how they were computed.
    """

    scores: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Breakdown:
    """A split of the evaluation examples into subsets that the report shows side by side.

    Attributes:
        key: what splits them (the report's heading is ``"<metric> by <key>"``).
        labels: example id → subset name.
        description: how the examples were split, for the report.
        order: subsets in the order shown (others after them).
    """

    key: str
    labels: dict[str, str]
    description: str
    order: Sequence[str] = ()


@runtime_checkable
class Task(Protocol):
    """One configured benchmark (or corpus).

    Task classes subclass it to inherit the defaults of the evaluation hooks
    (:meth:`model_scores`, :meth:`breakdown`, :meth:`checkpoint_heads`): a task overrides the
    ones it needs, so the experiment never asks which task it runs.
    """

    name: str
    max_new_tokens: int

    def examples(self, split: str) -> list[Example]: ...

    def score(self, examples: list[Example], outputs: list[str]) -> dict[str, list[float]]: ...

    def model_scores(
        self, model, tokenizer, examples: list[Example], reading: Reading
    ) -> ModelScores:
        """Scores that need the model itself (teacher forcing, a probe of its hidden states),
        per example, computed as the arm reads its inputs. Default: none."""
        return ModelScores()

    def breakdown(self, examples: list[Example], tokenizer, reading: Reading) -> Breakdown | None:
        """Subsets of the examples worth reporting apart. Default: none. A task that labels
        subsets names them in a class attribute ``breakdown_subsets`` (what an experiment's
        ``select.subset`` may choose on)."""
        return None

    def answer_candidates(self, example: Example) -> Sequence[str] | None:
        """The closed set ``example``'s answer comes from (recall's numbers, BabiLong qa1–qa5's
        labels), scored one by one by ``eval.closed_set``
        (:mod:`memllm.evaluation.closed_set`). Default: none (open answers)."""
        return None

    def checkpoint_heads(
        self, checkpoint: str | Path, model, train: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The auxiliary heads saved with a checkpoint's memory, by name, loaded before the arm
        generates (``train``: the arm's training settings, which say whether it must have
        them). Default: none."""
        return {}


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def check_disjoint_splits(
    units: dict[str, Iterable[Hashable]],
    what: str,
    describe: Callable[[Any], str] = repr,
    *,
    task: str = "",
) -> None:
    """Refuse splits that share a unit (a bAbI story, a recall key/value assignment).

    Args:
        units: split name → the units its examples are made of (repeats within a split are
            fine).
        what: what a unit is, for the message (e.g. ``"the story"``).
        describe: a unit as the message shows it.
        task: put before the message (e.g. ``"babilong qa1"``).

    Raises:
        DataError: naming both splits and the first shared unit.
    """
    owner: dict[Hashable, str] = {}
    for split, items in units.items():
        for item in items:
            other = owner.setdefault(item, split)
            if other != split:
                where = f"{task}: " if task else ""
                raise DataError(
                    f"{where}the {other} and {split} splits share {what} {describe(item)}"
                )


def answer_target(prompt: str, answer: str) -> str:
    """The target text after ``prompt``: the answer, preceded by a space unless the prompt
    already ends with whitespace."""
    answer = answer.strip()
    return answer if (not prompt or prompt[-1].isspace()) else " " + answer


def stable_seed(*parts: Any) -> int:
    """A seed derived from ``parts`` that is the same in every process and Python version."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rng_for(*parts: Any) -> random.Random:
    return random.Random(stable_seed(*parts))


def check_lengths(examples: Sequence[Example], outputs: Sequence[Any], task: str) -> None:
    if len(examples) != len(outputs):
        raise DataError(f"{task}: {len(examples)} examples but {len(outputs)} outputs")


def read_json_records(path: str | Path) -> list[Any]:
    """Records of a data file: a JSON list, a JSON object holding one list (e.g.
    ``{"data": [...]}``), JSON lines, or Parquet (``.parquet``, needs pyarrow)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataError(f"{path}: reading Parquet needs pyarrow") from err
        return pq.read_table(path).to_pylist()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (offset {err.start})") from None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
            data = None  # several JSON values: read it as JSON lines
        if data is not None:
            return _record_list(data, path)
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {i}: invalid JSON ({err.msg})") from None
    return records


def _record_list(data: Any, path: Path) -> list[Any]:
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
        raise DataError(f"{path}: expected a list of records")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records")
    return data


def tokenizer_for(name: str):
    """A tokenizer by name, loaded once per process (counting tokens needs no model)."""
    return _tokenizer(name)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(name: str):
    if name not in _TOKENIZERS:
        from memllm.core.backbone import load_tokenizer

        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]
