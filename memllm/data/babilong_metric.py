"""BabiLong's official checker, usable on any system's predictions.

:func:`babilong_compare_answers` follows ``compare_answers`` in the benchmark's
``babilong/metrics.py``: lowercase the output, keep its first sentence (cut at the first ``.``,
then at ``<context>``, ``<example>`` and ``Question`` — the last cut never fires on lowercased
text, as in the original), find which of the task's labels occur in it as substrings, drop the
labels that occur in the question, and count the answer correct iff the target is the only label
left. Comma targets of qa8 (``len(target) > 3``) need every sub-target present and as many labels
as sub-targets. Substring scorers (lm-eval-harness, OpenCompass, Hercules) give other numbers and
are not used. :func:`read_babilong_predictions` reads the benchmark's prediction CSVs
(``memllm score babilong``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from memllm.errors import DataError

_ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")

BABILONG_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": _ROOMS,
    "qa2": _ROOMS,
    "qa3": _ROOMS,
    "qa4": _ROOMS,
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
    "qa11": _ROOMS,
    "qa12": _ROOMS,
    "qa13": _ROOMS,
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"),
    "qa17": ("no", "yes"),
    "qa18": ("no", "yes"),
    "qa19": ("e,e", "e,n", "e,s", "n,e", "n,n", "n,w", "s,e", "s,s", "s,w", "w,n", "w,s", "w,w"),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}
"""The answer labels of each BabiLong task (the benchmark's ``TASK_LABELS``)."""


def babilong_preprocess_output(output: str) -> str:
    """The part of a generation that BabiLong's checker reads (its ``preprocess_output``)."""
    output = output.lower()
    output = output.split(".")[0]
    output = output.split("<context>")[0]
    output = output.split("<example>")[0]
    # The original also cuts at "Question", after lowercasing, so that cut never happens; kept
    # for fidelity.
    output = output.split("Question")[0]
    return output


def babilong_compare_answers(
    target: str, output: str, question: str, task_labels: Iterable[str]
) -> bool:
    """Whether ``output`` answers ``question`` with ``target`` (BabiLong's ``compare_answers``)."""
    output = babilong_preprocess_output(output)
    target = target.lower()
    labels = {label.lower() for label in task_labels}
    in_question = {label for label in labels if label in question.lower()}
    in_output = {label for label in labels if label in output} - in_question
    if "," in target and len(target) > 3:  # qa8: several items, e.g. "apple,milk"
        parts = target.split(",")
        return all(p in in_output for p in parts) and len(in_output) == len(parts)
    return target in in_output and len(in_output) == 1


def babilong_labels(task: str) -> tuple[str, ...]:
    """The labels of ``task`` (``qa1`` … ``qa20``); an unknown task is a :class:`DataError`."""
    if task not in BABILONG_LABELS:
        raise DataError(f"unknown BabiLong task {task!r} (known: qa1 … qa20)")
    return BABILONG_LABELS[task]


def babilong_correct(
    task: str, targets: Sequence[str], outputs: Sequence[str], questions: Sequence[str]
) -> list[float]:
    """Per-example correctness (1.0/0.0) under the official checker."""
    if not len(targets) == len(outputs) == len(questions):
        raise DataError(
            f"babilong: {len(targets)} targets, {len(outputs)} outputs and "
            f"{len(questions)} questions: the counts must match"
        )
    labels = babilong_labels(task)
    return [
        float(babilong_compare_answers(t, o, q, labels))
        for t, o, q in zip(targets, outputs, questions, strict=True)
    ]


def babilong_score(
    task: str, targets: Sequence[str], outputs: Sequence[str], questions: Sequence[str]
) -> dict[str, Any]:
    """``{"task", "n", "correct", "accuracy"}`` under the official checker."""
    correct = babilong_correct(task, targets, outputs, questions)
    n = len(correct)
    hits = int(sum(correct))
    return {"task": task, "n": n, "correct": hits, "accuracy": hits / n if n else 0.0}


def read_babilong_predictions(path: str | Path) -> list[dict[str, str]]:
    """Rows ``{target, output, question}`` of a BabiLong prediction CSV (an empty cell is "")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    # utf-8-sig: a byte-order mark (Excel's CSV export) is not part of the first column's name
    with path.open(newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.DictReader(f)
            missing = {"target", "output", "question"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(sorted(missing))} "
                    "(expected a CSV with columns target,output,question)"
                )
            rows = []
            for i, row in enumerate(reader):
                # a short row fills None, a long one puts the rest under None: either way the
                # columns are shifted and the row would be scored as a wrong answer
                if None in row or None in row.values():
                    raise DataError(
                        f"{path}: record {i} (line {reader.line_num}) has "
                        f"{'more' if None in row else 'fewer'} fields than the header"
                    )
                if row["target"] == "":
                    raise DataError(f"{path}: record {i} (line {reader.line_num}) has no target")
                rows.append({k: row[k] for k in ("target", "output", "question")})
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (offset {err.start})") from None
        except csv.Error as err:
            raise DataError(f"{path}: malformed CSV ({err})") from None
    return rows


def infer_babilong_task(path: str | Path) -> str | None:
    """``qaN`` from a file name such as ``gpt2_qa1_0k.csv`` (None when absent or ambiguous)."""
    found = set(re.findall(r"(?<![a-z0-9])(qa\d{1,2})(?![0-9])", Path(path).name.lower()))
    return found.pop() if len(found) == 1 else None


BABILONG_DEFINITIONS = {
    "accuracy": "BabiLong's official checker: the output up to its first '.', lowercased, holds "
    "the answer label(s) and no other label of the task (labels in the question ignored)",
}
BABILONG_KINDS = {"accuracy": "binary"}
