"""Tasks: BabiLong, HotpotQA, ZsRE, recall and a pretraining corpus, with their
official formats (recall: :mod:`memllm.data.recall`, the recall ladder's first rung).

The rest of memllm sees every benchmark through one small interface::

    task = build_task("babilong", {"tasks": ["qa1", "qa2"], "lengths": ["0k", "4k"]})
    examples = task.examples("test")          # list[Example]; splits: train, validation, test
    outputs = [generate(ex.prompt) for ex in examples]
    per_example = task.score(examples, outputs)   # {"accuracy": [1.0, 0.0, ...]}

* :class:`Example` — ``id``, ``prompt`` (everything the model reads, formatted, ending where
  the answer begins), ``target`` (the gold text to generate after it; a leading space when the
  prompt ends with a cue such as ``Answer:``; empty for the corpus) and ``meta`` (the bare
  ``answer``, ``question``, ``group`` — e.g. ``qa1/4k`` — and task details: BabiLong facts and
  their character spans, HotpotQA supporting facts and sentence spans, ZsRE paraphrases and
  locality question).
* A task has ``name``, ``max_new_tokens`` (a generation length that fits the benchmark: 20 for
  BabiLong as published, 32 HotpotQA, 16 ZsRE), ``examples(split)`` and
  ``score(examples, outputs) -> dict[str, list[float]]`` with **per-example** values so that
  callers compute means, confidence intervals and paired tests. Extras:
  ``HotpotQATask.score(..., supporting_facts=...)`` adds ``sp_*``/``joint_*``;
  :func:`memllm.data.zsre.teacher_forced_metrics` computes ZsRE's model-based accuracies;
  ``CorpusTask.token_sequences(tokenizer, seq_len, split)`` packs the corpus
  (its examples have empty prompt/target and ``meta["text"]``).
* Evaluation hooks, with defaults on :class:`~memllm.data.base.Task` (which task classes
  subclass): ``model_scores(model, tokenizer, examples, reading)`` (scores that need the model:
  HotpotQA's supporting facts, ZsRE's teacher-forced accuracies), ``breakdown(examples,
  tokenizer, reading)`` (BabiLong: the questions by where their facts are) and
  ``checkpoint_heads`` (a head saved with a memory); ``reading`` says how the arm reads inputs.
* :func:`build_task` — ``options`` are the task's own strict dataclass fields
  (:class:`~memllm.data.babilong.BabiLongOptions`, :class:`~memllm.data.hotpotqa.HotpotQAOptions`,
  :class:`~memllm.data.zsre.ZsREOptions`, :class:`~memllm.data.recall.RecallOptions`,
  :class:`~memllm.data.corpus.CorpusOptions`); an unknown
  key or a bad value is a :class:`~memllm.errors.ConfigError` naming it (and ``source_file``).
* :data:`TASKS` — the registry: name → :class:`TaskSpec`.

Around the tasks: each task's official metric beside it (:mod:`memllm.data.babilong_metric`,
:mod:`memllm.data.hotpotqa_metric`, :mod:`memllm.data.zsre_metric`; usable on any system's
files),
:mod:`memllm.data.supporting_facts` (``SupportingFactHead``, sentence token spans, turning scores
into ``[[title, sent_id], ...]``, the official prediction file), :mod:`memllm.data.distractors`
(offline books: ``memllm data fetch``), :mod:`memllm.data.babi` (the bAbI files),
:mod:`memllm.data.facts` (real facts for the offline HotpotQA/ZsRE builders) and
:mod:`memllm.cli.data` (``memllm score …``, ``memllm data …``). ``docs/data.md`` has the
formats, metric definitions and commands.

Validation examples always come from training data, held out from the train examples, never
from test data. Every offline builder is deterministic under its ``seed``. Nothing here touches
a hub unless a source says ``hf``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from memllm.core.config import from_dict
from memllm.data.base import SPLITS, Example, Task
from memllm.errors import ConfigError, DataError


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: where its options and task classes live, imported on demand."""

    name: str
    module: str
    options: str
    task: str
    summary: str

    @property
    def options_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.options)

    @property
    def task_cls(self) -> type:
        return getattr(importlib.import_module(self.module), self.task)


TASKS: dict[str, TaskSpec] = {
    "babilong": TaskSpec(
        "babilong",
        "memllm.data.babilong",
        "BabiLongOptions",
        "BabiLongTask",
        "bAbI facts hidden in long book text (qa1-qa20, 0k-128k); official checker",
    ),
    "hotpotqa": TaskSpec(
        "hotpotqa",
        "memllm.data.hotpotqa",
        "HotpotQAOptions",
        "HotpotQATask",
        "multi-hop QA over 10 paragraphs with supporting facts; hotpot_evaluate_v1 metrics",
    ),
    "zsre": TaskSpec(
        "zsre",
        "memllm.data.zsre",
        "ZsREOptions",
        "ZsRETask",
        "relation questions with paraphrases and locality; token/sequence accuracy, EM",
    ),
    "corpus": TaskSpec(
        "corpus",
        "memllm.data.corpus",
        "CorpusOptions",
        "CorpusTask",
        "plain text for LM pretraining of the memory, packed into fixed-length rows",
    ),
    "recall": TaskSpec(
        "recall",
        "memllm.data.recall",
        "RecallOptions",
        "RecallTask",
        "K key->value facts hidden in book text, one key asked; closed-set match, known chance",
    ),
    "qa": TaskSpec(
        "qa",
        "memllm.data.hf_source",
        "QAOptions",
        "QATask",
        "your own context/question/answer records (local files or hub, via datasets); EM, F1",
    ),
}


def build_task(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    source_file: str | None = None,
    key_prefix: str = "",
):
    """Build the task ``name`` from its options mapping (strictly checked).

    Args:
        name: a key of :data:`TASKS`.
        options: the task's options (its options dataclass's fields).
        source_file: the config file they came from, named in errors.
        key_prefix: how the options are reached in that file (e.g. ``"data."``), put before
            key names in errors.

    Raises:
        ConfigError: an unknown task, an unknown option or a bad value; the message names the
            key and, when given, ``source_file``.
    """
    where = f"{source_file}: " if source_file else ""
    if name not in TASKS:
        raise ConfigError(f"{where}task: unknown task {name!r} (known: {', '.join(TASKS)})")
    spec = TASKS[name]
    try:
        opts = from_dict(spec.options_cls, dict(options or {}), prefix=key_prefix)
    except (ConfigError, DataError) as err:
        raise ConfigError(f"{where}{name} options: {err}") from None
    return spec.task_cls(opts)


__all__ = ["SPLITS", "TASKS", "Example", "Task", "TaskSpec", "build_task"]
