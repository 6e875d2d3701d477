"""The shapes every task shares: :class:`Example`, the :class:`Task` protocol, small helpers."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
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
        meta: task-specific details (the bare answer, question, supporting facts, ...).
    """

    id: str
    prompt: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """One configured benchmark (or corpus)."""

    name: str
    max_new_tokens: int

    def examples(self, split: str) -> list[Example]: ...

    def score(self, examples: list[Example], outputs: list[str]) -> dict[str, list[float]]: ...


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


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
    text = path.read_text(encoding="utf-8")
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
