"""The bAbI tasks v1.2: parse the official files, from the ``.tar.gz`` or an unpacked folder.

Line format: ``ID text`` for a fact, ``ID question<TAB>answer<TAB>supporting IDs`` for a
question; IDs restart at 1 with each story. As BabiLong does, every question becomes one sample
whose facts are all the story's non-question lines before it, in order (earlier questions are
dropped), and whose supporting facts are indices into those facts. Each sample names its story
(``story``: file and first line), so that splits can be kept apart story by story
(:func:`group_stories`).

Where the data is looked for (first hit): the ``path`` given, ``$MEMLLM_BABI``,
``cache_dir()/data/babi``, then ``shared/data/babi`` in or beside the repository checkout and the
current directory (``tasks_1-20_v1-2.tar.gz`` or the unpacked ``tasks_1-20_v1-2/``).
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from memllm.core.backbone import cache_dir
from memllm.errors import DataError

ARCHIVE_NAME = "tasks_1-20_v1-2.tar.gz"
TASK_NAMES = {
    1: "single-supporting-fact",
    2: "two-supporting-facts",
    3: "three-supporting-facts",
    4: "two-arg-relations",
    5: "three-arg-relations",
    6: "yes-no-questions",
    7: "counting",
    8: "lists-sets",
    9: "simple-negation",
    10: "indefinite-knowledge",
    11: "basic-coreference",
    12: "conjunction",
    13: "compound-coreference",
    14: "time-reasoning",
    15: "basic-deduction",
    16: "basic-induction",
    17: "positional-reasoning",
    18: "size-reasoning",
    19: "path-finding",
    20: "agents-motivations",
}
TASKS = tuple(f"qa{i}" for i in TASK_NAMES)


@dataclass(frozen=True)
class BabiSample:
    """One bAbI question with the story facts before it."""

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...]  # indices into ``facts``
    source: str  # "file:line"
    story: str = ""  # "file:first line" of the story the question belongs to


def task_number(task: str) -> int:
    m = re.fullmatch(r"qa(\d{1,2})", task)
    if not m or int(m.group(1)) not in TASK_NAMES:
        raise DataError(f"unknown bAbI task {task!r} (choose from qa1 … qa20)")
    return int(m.group(1))


def task_file_name(task: str, split: str) -> str:
    n = task_number(task)
    return f"qa{n}_{TASK_NAMES[n]}_{split}.txt"


def _candidates() -> Iterable[Path]:
    env = os.environ.get("MEMLLM_BABI")
    if env:
        yield Path(env)
    yield cache_dir() / "data" / "babi"
    repo = Path(__file__).resolve().parents[2]
    for base in (repo, repo.parent, Path.cwd(), Path.cwd().parent):
        yield base / "shared" / "data" / "babi"


def find_babi(path: str | Path | None = None) -> Path:
    """The bAbI archive or folder to read (see the module docstring for the search order)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"{p}: bAbI data not found")
        return p / ARCHIVE_NAME if (p / ARCHIVE_NAME).is_file() else p
    for p in _candidates():
        if (p / ARCHIVE_NAME).is_file():
            return p / ARCHIVE_NAME
        if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
            return p
        if p.is_dir() and any(p.rglob("qa1_*_test.txt")):
            return p
    raise DataError(
        f"bAbI data not found: put {ARCHIVE_NAME} (or the unpacked folder) in "
        f"{cache_dir() / 'data' / 'babi'}, set MEMLLM_BABI, or pass babi_path"
    )


@functools.lru_cache(maxsize=8)
def _archive_members(archive: str, mtime: float) -> dict[str, str]:
    members = {}
    with tarfile.open(archive, "r:*") as tar:
        for info in tar:
            if info.isfile() and info.name.endswith(".txt"):
                f = tar.extractfile(info)
                if f is not None:
                    members[info.name] = f.read().decode("utf-8")
    return members


def read_babi_text(root: Path, task: str, split: str, lang: str = "en") -> tuple[str, str]:
    """``(text, source name)`` of one task file from an archive or a folder."""
    name = task_file_name(task, split)
    if root.is_file():
        members = _archive_members(str(root), root.stat().st_mtime)
        for member, text in members.items():
            parts = member.split("/")
            if parts[-1] == name and len(parts) >= 2 and parts[-2] == lang:
                return text, f"{root.name}:{member}"
        raise DataError(f"{root}: no {lang}/{name} in the archive")
    hits = [p for p in root.rglob(name) if p.parent.name == lang or root.name == lang]
    if not hits:
        raise DataError(f"{root}: no {lang}/{name}")
    return hits[0].read_text(encoding="utf-8"), str(hits[0])


def parse_babi(text: str, task: str, source: str) -> list[BabiSample]:
    """Parse one bAbI file into one sample per question."""
    samples: list[BabiSample] = []
    facts: list[str] = []
    line_to_fact: dict[int, int] = {}
    previous_id = 0
    story = f"{source}:1"
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{source}:{lineno}"
        head, sep, rest = raw.partition(" ")
        if not sep or not head.isdigit():
            raise DataError(f"{where}: expected 'ID text', got {raw!r}")
        line_id = int(head)
        if line_id == 1 or line_id <= previous_id:
            facts, line_to_fact = [], {}
            story = where
        previous_id = line_id
        if "\t" not in rest:
            line_to_fact[line_id] = len(facts)
            facts.append(rest.strip())
            continue
        fields = rest.split("\t")
        if len(fields) < 2 or not fields[1].strip():
            raise DataError(f"{where}: question line without an answer: {raw!r}")
        question, answer = fields[0].strip(), fields[1].strip()
        refs = fields[2].split() if len(fields) > 2 else []
        try:
            supporting = tuple(line_to_fact[int(r)] for r in refs)
        except (KeyError, ValueError):
            raise DataError(f"{where}: supporting fact IDs {refs} do not name facts") from None
        samples.append(BabiSample(task, tuple(facts), question, answer, supporting, where, story))
    return samples


def group_stories(samples: Iterable[BabiSample]) -> dict[str, list[BabiSample]]:
    """The samples of each story, in file order (story id → its questions' samples)."""
    stories: dict[str, list[BabiSample]] = {}
    for sample in samples:
        stories.setdefault(sample.story or sample.source, []).append(sample)
    return stories


def story_text(samples: list[BabiSample]) -> str:
    """What a story says: the facts before its last question (every fact of a bAbI story),
    joined. Two stories with the same text are the same story, whatever file they are in."""
    return " ".join(max(samples, key=lambda s: len(s.facts)).facts)


def load_babi(
    task: str, split: str, *, lang: str = "en", path: str | Path | None = None
) -> list[BabiSample]:
    """All samples of ``task`` (``qa1`` …) in ``split`` (``train``/``test``) of ``lang``.

    ``lang`` is ``en`` (1,000 questions per split) or ``en-10k`` (10,000 training questions).
    """
    if split not in ("train", "test"):
        raise DataError(f"bAbI split must be train or test, got {split!r}")
    text, source = read_babi_text(find_babi(path), task, split, lang)
    return parse_babi(text, task, source)


_MOVE = re.compile(r"([A-Z]\w*) (?:went back|went|moved|travelled|journeyed) to the (\w+)\.")


def where_questions(facts: tuple[str, ...] | list[str]) -> list[tuple[str, str, int]]:
    """qa1 at the end of a story: ``(question, answer, supporting fact index)`` for every person
    the facts move, in order of first mention — "Where is X?" answered by X's latest move.

    Raises:
        DataError: a fact that is not a qa1 move ("X went to the Y.").
    """
    latest: dict[str, tuple[str, int]] = {}
    for i, fact in enumerate(facts):
        m = _MOVE.fullmatch(fact.strip())
        if not m:
            raise DataError(f"not a qa1 fact (X went to the Y.): {fact!r}")
        latest[m.group(1)] = (m.group(2), i)
    return [(f"Where is {who}?", place, i) for who, (place, i) in latest.items()]
