"""Curriculum: train on easy inputs first, then harder ones (``train.curriculum``).

Learned memories that work on long inputs are trained so (RMT/ARMT: 1 → 2 → 4 → … segments):
a memory that has never carried a fact over one segment gets little signal from sixteen.
A curriculum is a list of stages, each overriding the settings that set difficulty::

    train:
      max_steps: 3000
      curriculum:
        - {steps: 1000, segments: 2, data: {num_facts: [1]}}   # inputs cut to 2 segments
        - {until: {metric: accuracy, value: 0.8}, data: {lengths: [2k]}}
        - {data: {lengths: [4k], num_facts: [4]}}               # the last stage runs to the end

- ``data``: task options (``num_facts``, ``lengths``, …) over the run's ``data`` section;
- ``segments`` / ``max_length``: inputs cut to that many segments / tokens (``train.max_length``);
- ``steps``: optimizer steps in this stage; ``until``: advance at the first validation whose
  ``metric`` reaches ``value`` (at or below it for ``loss``, at or above it otherwise). Every
  stage but the last needs one of them; the last runs until ``train.max_steps``.

The trainer rebuilds the training and validation data when a stage starts, orders each stage's
examples by ``(seed, stage, epoch)``, and keeps the stage and its first step in the checkpoint,
so a run resumed in a later stage continues exactly (:mod:`memllm.training.trainer`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from memllm.core.config import check


@dataclass
class StageUntil:
    """Advance when a validation metric reaches a value."""

    metric: str = field(metadata={"help": "a validation result: loss, accuracy, …"})
    value: float = field(metadata={"help": "loss: at or below; other metrics: at or above"})

    def met(self, result: dict[str, float]) -> bool:
        got = result[self.metric]
        return got <= self.value if self.metric == "loss" else got >= self.value


@dataclass
class CurriculumStage:
    """One stage of ``train.curriculum`` (see the module docstring)."""

    steps: int | None = field(default=None, metadata={"help": "optimizer steps in this stage"})
    until: StageUntil | None = field(
        default=None, metadata={"help": "{metric, value}: advance when validation reaches it"}
    )
    data: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "task options over the run's data section"}
    )
    segments: int | None = field(
        default=None, metadata={"help": "cut inputs to this many segments (max_length)"}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "cut inputs to this many tokens"}
    )

    def __post_init__(self) -> None:
        if self.steps is not None:
            check(self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        check(self.steps is None or self.until is None, "until", "give steps or until, not both")
        if self.segments is not None:
            check(self.segments > 0, "segments", f"must be > 0, got {self.segments}")
        if self.max_length is not None:
            check(self.max_length > 1, "max_length", f"must be > 1, got {self.max_length}")
        check(
            self.segments is None or self.max_length is None,
            "segments",
            "give segments or max_length, not both",
        )
        check("task" not in self.data, "data.task", "a stage keeps the run's task")


def check_curriculum(stages: list[CurriculumStage], max_steps: int | None) -> None:
    """Checks across stages (key names relative to ``train``)."""
    if not stages:
        return
    check(
        max_steps is not None,
        "curriculum",
        "needs train.max_steps (stages change the size of an epoch)",
    )
    for i, stage in enumerate(stages[:-1]):
        check(
            stage.steps is not None or stage.until is not None,
            f"curriculum[{i}]",
            "needs steps or until (only the last stage may run to the end)",
        )


def stage_config(cfg, index: int):
    """``cfg`` (a RunConfig) with stage ``index``'s data and length settings applied."""
    stage = cfg.train.curriculum[index]
    staged = copy.deepcopy(cfg)
    staged.data = {**cfg.data, **stage.data}
    if stage.segments is not None:
        staged.train.max_length = stage.segments * cfg.train.segment_length
    elif stage.max_length is not None:
        staged.train.max_length = stage.max_length
    return staged


def stage_steps_done(cfg, index: int, steps_in_stage: int) -> bool:
    """Whether stage ``index`` has run its ``steps`` (never for the last stage)."""
    stages = cfg.train.curriculum
    if index >= len(stages) - 1:
        return False
    steps = stages[index].steps
    return steps is not None and steps_in_stage >= steps


def stage_threshold_met(cfg, index: int, result: dict[str, float]) -> bool:
    """Whether a validation ``result`` ends stage ``index`` (never for the last stage)."""
    stages = cfg.train.curriculum
    if index >= len(stages) - 1 or stages[index].until is None:
        return False
    return stages[index].until.met(result)


__all__ = [
    "CurriculumStage",
    "StageUntil",
    "check_curriculum",
    "stage_config",
    "stage_steps_done",
    "stage_threshold_met",
]
