"""Group keys such as ``"qa10/128k"``: natural order, and their task/length structure.

An arm's examples carry one group each (``task/length`` for BabiLong, ``all`` when a task has
none); results, tables and plots order them with :func:`group_sort_key` and find the length
component with :func:`length_axis`; :func:`first_per_group` takes the first examples of each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_LENGTH_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgG]?)$")
_LENGTH_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_length(text: str) -> float | None:
    """``"16k"`` → 16000.0, ``"1M"`` → 1e6, ``"512"`` → 512.0; ``None`` if not a length."""
    match = _LENGTH_RE.match(str(text).strip())
    if not match:
        return None
    return float(match.group(1)) * _LENGTH_UNITS[match.group(2).lower()]


def natural_key(text: str) -> tuple:
    """Sort key that orders the numbers inside ``text`` by value (``qa2`` before ``qa10``)."""
    parts = re.split(r"(\d+)", str(text))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p)


def group_sort_key(key: str) -> tuple:
    """Sort key for group keys such as ``"qa10/128k"``: lengths by size, names naturally."""
    out = []
    for part in str(key).split("/"):
        length = parse_length(part)
        out.append((0, length, ()) if length is not None else (1, 0.0, natural_key(part)))
    return tuple(out)


def length_axis(keys: Sequence[str]) -> int | None:
    """Index of the ``/``-separated component that is a length in every key (the last one)."""
    split = [str(k).split("/") for k in keys]
    if not split or len({len(s) for s in split}) != 1:
        return None
    for index in reversed(range(len(split[0]))):
        if all(parse_length(s[index]) is not None for s in split):
            return index
    return None


def task_length(keys: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """``(tasks, lengths)`` in natural order when every key is ``task/length``."""
    if not keys or length_axis(keys) != 1 or any(k.count("/") != 1 for k in keys):
        return None
    tasks = sorted({k.split("/")[0] for k in keys}, key=natural_key)
    lengths = sorted({k.split("/")[1] for k in keys}, key=lambda x: parse_length(x) or 0.0)
    return tasks, lengths


def first_per_group(examples: Sequence, per_group: int | None) -> list:
    """The first ``per_group`` examples of each group (``meta["group"]``), in their order;
    all of them when ``per_group`` is None."""
    if per_group is None:
        return list(examples)
    seen: dict[str, int] = {}
    chosen = []
    for ex in examples:
        group = ex.meta.get("group", "all")
        if seen.get(group, 0) < per_group:
            chosen.append(ex)
            seen[group] = seen.get(group, 0) + 1
    return chosen
