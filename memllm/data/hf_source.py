"""Data that users bring, read through 🤗 ``datasets``: local files or folders, saved datasets,
hub datasets (streamed for large corpora), with a field mapping.

A source in a config (``data.source`` of ``task: qa``; BabiLong's ``source`` also takes one)::

    source:
      path: data/my_qa.jsonl        # a file, a folder, a save_to_disk folder or a hub id
      format: json                  # auto | json | parquet | csv | disk | hub
      fields: {context: input, question: question, answer: target}   # memllm name: column
      split: test
      streaming: false              # true: read rows as they come (hub corpora)
      limit: 500                    # at most this many rows

``path``, ``name`` and ``split`` may hold ``{task}`` and ``{length}`` (BabiLong fills them in:
``{path: RMT-team/babilong, name: "{length}", split: "{task}"}`` is the published layout).

:func:`export_examples` writes a task's examples as a ``datasets`` folder
(``memllm data export ... --format hf``) and :func:`examples_from_dataset` reads one back.
Needs ``pip install 'memllm[hub]'`` (``datasets``).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from memllm.core.config import check
from memllm.data.base import Example, Task, answer_target, check_lengths, check_split, rng_for
from memllm.errors import DataError

FORMATS = ("auto", "json", "parquet", "csv", "disk", "hub")
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DatasetSource:
    """Where a task's records come from (see the module docstring)."""

    path: str
    format: Literal["auto", "json", "parquet", "csv", "disk", "hub"] = "auto"
    fields: dict[str, str] = field(
        default_factory=dict, metadata={"help": "memllm field name -> dataset column"}
    )
    split: str = "train"
    name: str | None = field(default=None, metadata={"help": "the hub dataset's config"})
    streaming: bool = False
    limit: int | None = None

    def __post_init__(self) -> None:
        check(bool(self.path.strip()), "path", "must name a file, folder or hub dataset")
        check(self.limit is None or self.limit > 0, "limit", "must be > 0")

    def filled(self, **values: str) -> DatasetSource:
        """A copy with ``{task}``/``{length}`` placeholders in path, name and split filled."""

        def fill(text: str | None) -> str | None:
            return text.format(**values) if text else text

        return DatasetSource(
            fill(self.path),
            self.format,
            dict(self.fields),
            fill(self.split),
            fill(self.name),
            self.streaming,
            self.limit,
        )


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "reading a dataset source needs datasets: pip install 'memllm[hub]'"
        ) from err
    return datasets


def _open(source: DatasetSource):
    """The rows of ``source`` as a ``datasets`` Dataset or IterableDataset."""
    datasets = _datasets()
    path = Path(source.path).expanduser()
    fmt = source.format
    saved = path.is_dir() and any(
        (path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")
    )
    if fmt == "disk" or (fmt == "auto" and saved):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if source.split not in data:
                raise DataError(f"{path}: no split {source.split!r} (it has {', '.join(data)})")
            data = data[source.split]
        return data.to_iterable_dataset() if source.streaming else data
    local = fmt != "hub" and (path.exists() or any(ch in source.path for ch in "*?["))
    if local:
        builder = fmt if fmt != "auto" else _BUILDERS.get(path.suffix)
        if path.is_dir() and builder is None:
            # a folder of data files: datasets picks the builder from their extensions
            return datasets.load_dataset(str(path), split=source.split, streaming=source.streaming)
        if builder is None:
            raise DataError(
                f"{path}: cannot tell the format from the name; set format (json, parquet, csv)"
            )
        return datasets.load_dataset(
            builder,
            data_files={source.split: str(path)},
            split=source.split,
            streaming=source.streaming,
        )
    if fmt not in ("auto", "hub"):
        raise DataError(f"{path}: file or folder not found")
    return datasets.load_dataset(
        source.path, source.name, split=source.split, streaming=source.streaming
    )


def load_records(source: DatasetSource, wanted: Sequence[str], where: str = "source") -> list[dict]:
    """The rows of ``source`` with the columns ``wanted`` under their memllm names.

    Args:
        source: where to read.
        wanted: memllm field names; each is read from the column ``source.fields`` maps it to
            (by default the column of the same name).
        where: how the config reaches the source, named in errors (e.g. ``data.source``).

    Raises:
        DataError: ``datasets`` is missing, the data cannot be read, or a column is missing.
    """
    try:
        rows = _open(source)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{where}: {source.path}: {err}") from None
    unknown = sorted(set(source.fields) - set(wanted))
    if unknown:
        raise DataError(
            f"{where}.fields: unknown field {unknown[0]!r} (fields: {', '.join(wanted)})"
        )
    columns = {name: source.fields.get(name, name) for name in wanted}
    out = []
    for i, row in enumerate(rows):
        if source.limit is not None and i >= source.limit:
            break
        missing = [c for c in columns.values() if c not in row]
        if missing:
            raise DataError(
                f"{where}: {source.path}: row {i} has no column {missing[0]!r} "
                f"(columns: {', '.join(row)}; map it in {where}.fields)"
            )
        out.append({name: row[column] for name, column in columns.items()})
    return out


# --------------------------------------------------------------------------------------------
# task: qa — question answering over the user's own records
# --------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass
class QAOptions:
    """Options of ``task: qa``: records with a context, a question and an answer."""

    source: DatasetSource | None = field(
        default=None, metadata={"help": "the test records (a dataset source mapping)"}
    )
    train_source: DatasetSource | None = field(
        default=None, metadata={"help": "train and validation records (none: no training data)"}
    )
    template: str = field(
        default="{context}\n\nQuestion: {question}",
        metadata={"help": "the prompt, from {context} and {question}"},
    )
    answer_prefix: str = "\nAnswer:"
    max_new_tokens: int = 32
    num_train: int | None = None
    num_validation: int = 100
    num_test: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.max_new_tokens > 0, "max_new_tokens", "must be > 0")
        check(self.num_validation >= 0, "num_validation", "must be >= 0")
        for key in ("{context}", "{question}"):
            check(key in self.template, "template", f"must contain {key}")


class QATask(Task):
    """``task: qa``: the user's question-answering records, scored by SQuAD-style exact match,
    F1 and whether the answer appears in the output."""

    name = "qa"
    FIELDS = ("context", "question", "answer")

    def __init__(self, options: QAOptions):
        self.options = options
        self.max_new_tokens = options.max_new_tokens
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if split not in self._cache:
            self._cache[split] = self._build(split)
        return self._cache[split]

    def _build(self, split: str) -> list[Example]:
        o = self.options
        if split == "test":
            if o.source is None:
                raise DataError("qa: no test records: set source (a mapping with a path)")
            rows = load_records(o.source, self.FIELDS, "source")
            chosen = list(range(len(rows)))[: o.num_test]
        else:
            if o.train_source is None:
                raise DataError(f"qa: no {split} records (set train_source)")
            rows = load_records(o.train_source, self.FIELDS, "train_source")
            order = rng_for(o.seed, "qa-train").sample(range(len(rows)), len(rows))
            n_val = min(o.num_validation, len(order))
            chosen = order[:n_val] if split == "validation" else order[n_val:]
            chosen = chosen[: o.num_train] if split == "train" else chosen
        return [self._example(f"qa/{split}/{i}", rows[j], j) for i, j in enumerate(chosen)]

    def _example(self, id_: str, row: dict[str, Any], index: int) -> Example:
        for key in self.FIELDS:
            if not isinstance(row[key], str):
                raise DataError(f"qa: record {index}: field {key!r} is not text")
        question = row["question"].strip()
        prompt = (
            self.options.template.format(context=row["context"], question=question)
            + self.options.answer_prefix
        )
        meta = {"question": question, "answer": row["answer"].strip(), "record": index}
        return Example(id_, prompt, answer_target(prompt, row["answer"]), meta)

    def score(self, examples: list[Example], outputs: list[str]) -> dict[str, list[float]]:
        """Per example: ``exact_match`` and ``f1`` (SQuAD normalisation) and ``contains`` (the
        normalised answer inside the normalised output)."""
        check_lengths(examples, outputs, self.name)
        golds = [ex.meta["answer"] for ex in examples]
        return {
            "exact_match": [
                float(normalize_answer(o) == normalize_answer(g))
                for o, g in zip(outputs, golds, strict=True)
            ],
            "f1": [_f1(o, g) for o, g in zip(outputs, golds, strict=True)],
            "contains": [
                float(normalize_answer(g) in normalize_answer(o))
                for o, g in zip(outputs, golds, strict=True)
            ],
        }


# --------------------------------------------------------------------------------------------
# examples as a datasets folder
# --------------------------------------------------------------------------------------------

EXPORT_COLUMNS = ("id", "prompt", "target", "context_part", "question_part", "meta")


def export_examples(examples: Sequence[Example], folder: str | Path) -> Path:
    """Write ``examples`` as a ``datasets`` folder (``datasets.load_from_disk`` opens it).

    Columns: ``id``, ``prompt``, ``target``, ``context_part``, ``question_part`` (null unless
    the task keeps the question apart) and ``meta`` as JSON text: tasks' details (character
    spans, supporting facts, paraphrases) mix types that one Arrow column type cannot hold.
    """
    datasets = _datasets()
    rows = []
    for ex in examples:
        row = asdict(ex)
        row["meta"] = json.dumps(ex.meta, ensure_ascii=False, sort_keys=True)
        rows.append({key: row[key] for key in EXPORT_COLUMNS})
    features = datasets.Features({key: datasets.Value("string") for key in EXPORT_COLUMNS})
    out = Path(folder)
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(out))
    return out


def examples_from_dataset(folder: str | Path) -> list[Example]:
    """The examples of a folder written by :func:`export_examples`."""
    datasets = _datasets()
    try:
        data = datasets.load_from_disk(str(folder))
    except FileNotFoundError as err:
        raise DataError(f"{folder}: not a datasets folder ({err})") from None
    missing = [c for c in EXPORT_COLUMNS if c not in data.column_names]
    if missing:
        raise DataError(f"{folder}: no column {missing[0]!r}: not a memllm export")
    return [
        Example(
            row["id"],
            row["prompt"],
            row["target"],
            json.loads(row["meta"]),
            row["context_part"],
            row["question_part"],
        )
        for row in data
    ]
