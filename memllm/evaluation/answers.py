"""An arm's generated answers, saved batch by batch: evaluations that resume and split.

Generating is most of an experiment's cost on long inputs (one 16k-token BabiLong question takes
a minute on a CPU thread), so an arm's answers are appended to ``arms/<arm>/answers.jsonl`` as
each batch finishes. A rerun of the arm generates only the examples that have no answer there,
and ``--shard K/N`` lets N processes (or machines sharing the folder) answer one arm's examples
between them: the one that answers the last example scores them all and writes the arm's result.

An answer is reused only under the same **fingerprint**: everything that decides what the arm
generates for an example of a given id (the experiment's settings but those that only choose,
batch, name or place the examples; the arm's settings; the bytes of its trained weights). A
retrained checkpoint or another prompt makes earlier answers stale: they are skipped, never
mixed in. ``eval.batch_size`` is not in it, as padding does not change an answer (batch equals
one at a time, ``tests/core/test_generation.py``), so a run stopped for memory can resume with
smaller batches; ``eval.max_examples`` is not either, so a run on more examples reuses the first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memllm.errors import ConfigError

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"
# Experiment settings that never change an example's answer (see the module docstring).
NOT_IN_FINGERPRINT = ("arms", "name", "compare_with", "select", "output_dir")
EVAL_NOT_IN_FINGERPRINT = ("max_examples", "batch_size", "closed_set")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 ≤ K ≤ N) as ``(K - 1, N)``: zero-based index and count; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ConfigError(f"--shard: expected K/N with 1 <= K <= N (e.g. 1/2), got {text!r}")
    return int(match[1]) - 1, int(match[2])


def plan_batches(
    order: Sequence[int],
    batch_size: int,
    *,
    shard: tuple[int, int] | None = None,
    answered: Iterable[int] = (),
) -> list[list[int]]:
    """The batches (lists of example indices) left to generate.

    ``order`` is the generation order of *all* examples; it is cut into batches of
    ``batch_size`` first, so a batch holds the same examples whatever was answered before and
    however the work is split: shard ``k`` of ``n`` takes batches ``k, k + n, …`` (similar lengths
    in each shard, as ``order`` runs longest first), and answered examples are then left out.
    """
    done = set(answered)
    batches = [list(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]
    if shard is not None:
        index, count = shard
        batches = batches[index::count]
    return [b for b in ([i for i in batch if i not in done] for batch in batches) if b]


def fingerprint(settings: Mapping[str, Any], arm: str, parameters: Iterable[Any] = ()) -> str:
    """A hash of what decides arm ``arm``'s answers: the experiment ``settings`` (a plain dict of
    the config) less :data:`NOT_IN_FINGERPRINT`, that arm's settings, and ``parameters`` (named
    tensors: the arm's trained or initial weights)."""
    kept = {k: v for k, v in settings.items() if k not in NOT_IN_FINGERPRINT}
    kept["eval"] = {
        k: v for k, v in (settings.get("eval") or {}).items() if k not in EVAL_NOT_IN_FINGERPRINT
    }
    kept["arm"] = settings["arms"][arm]
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode())
    for name, tensor in parameters:
        digest.update(name.encode())
        # float32 on the CPU: a hash of the values, whatever device or dtype they were held in
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(settings: Mapping[str, Any], arm: str, model) -> str:
    """:func:`fingerprint` of arm ``arm`` with ``model``'s memory and LoRA weights."""
    import memllm

    ids = {id(p) for p in memllm.memory_parameters(model) + memllm.lora_parameters(model)}
    return fingerprint(settings, arm, [(n, p) for n, p in model.named_parameters() if id(p) in ids])


class AnswerStore:
    """``arms/<arm>/answers.jsonl``: one line per answered example, ``{"fingerprint", "id",
    "output", "seconds"}`` (``seconds``: the example's share of its batch's generation time, so
    a resumed arm still reports what its answers cost). Appends take the file's lock, so shards
    of one arm write to one file."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.path = Path(folder) / ANSWERS_FILE
        self.fingerprint = fingerprint

    def load(self) -> tuple[dict[str, tuple[str, float]], int]:
        """``(id → (output, seconds), stale)``: the answers under this fingerprint (the last one
        of an id wins) and how many lines hold answers under another one."""
        answers: dict[str, tuple[str, float]] = {}
        stale = 0
        if not self.path.is_file():
            return answers, stale
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key, example = row["fingerprint"], str(row["id"])
                entry = (str(row["output"]), float(row.get("seconds", 0.0)))
            except (ValueError, KeyError, TypeError):
                # a line cut short when a run was killed mid-write: that batch is generated again
                continue
            if key == self.fingerprint:
                answers[example] = entry
            else:
                stale += 1
        return answers, stale

    def saved(self, arm: str, ids: Sequence[str]) -> dict[str, tuple[str, float]]:
        """:meth:`load`'s answers, saying in the log how many of ``ids`` are reused and how many
        lines are stale."""
        answers, stale = self.load()
        if stale:
            log.info(
                "arm %s: %d answers in %s came from other settings or weights; not reused",
                arm, stale, self.path,
            )  # fmt: skip
        reused = sum(i in answers for i in ids)
        if reused:
            log.info(
                "arm %s: %d of %d answers reused from %s (same settings and weights; delete it "
                "to generate them again)",
                arm, reused, len(ids), self.path,
            )  # fmt: skip
        return answers

    def append(self, ids: Sequence[str], outputs: Sequence[str], seconds: float) -> None:
        """Record one batch's answers (``seconds``: what the batch took, shared among them)."""
        from memllm.training.lock import waiting_lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        each = seconds / max(len(ids), 1)
        lines = "".join(
            json.dumps({"fingerprint": self.fingerprint, "id": i, "output": o, "seconds": each})
            + "\n"
            for i, o in zip(ids, outputs, strict=True)
        )
        with waiting_lock(self.path.with_suffix(".lock")), open(self.path, "a+b") as f:
            # after a line cut short by a killed run, start a new one rather than extend it
            f.seek(0, 2)
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    lines = "\n" + lines
            f.write(lines.encode())
            f.flush()
