"""Experiment configs: several arms on the same data and the same evaluation.

An experiment config names a backbone, a task, the segment length the memory arms (and the
``window`` baseline) see per forward call, and a set of arms:

- ``base`` — the backbone zero-shot with the whole input in its window (inputs longer than the
  window are cut from the left, the question kept; the report says so);
- ``window`` — the backbone seeing only the last ``segment_length`` tokens;
- ``finetuned`` — the backbone with LoRA trained on the same data, seeing the same window;
- ``memory`` — a memory (latent or neural, optionally with LoRA) trained on the same data and
  reading the whole input segment by segment; with ``untrained: true`` the memory is injected
  and evaluated without any training (Hercules' "no fine-tuning" ablation). A neural memory still
  learns at test time, but memllm's memories enter through zero-initialised output gates, so an
  untrained memory is exactly the bare backbone (identity at initialisation, an invariant of
  the library): the arm equals ``window`` by construction, and is there to show it. With
  ``carry: false`` the memory trains and answers on the last segment only: the no-carry control,
  which learns the task's format but cannot carry anything from earlier segments.

Training data: ``train_data`` holds options of ``data.task`` that differ for training (train
short, test long); or, when it names another task (``train_data.task``, e.g. ``corpus`` for
MemoryLlama's pretraining on FineWeb-Edu before a BabiLong evaluation), that task's own full
options. The trained arms train and validate on it; every arm is evaluated on ``data``.

Every arm is scored on the same test examples with the task's official metric; results carry
95 % intervals and paired tests against ``base`` and ``window``, or the arms ``compare_with``
lists (see :mod:`memllm.evaluation.results`). Each memory arm is also paired with its own
no-carry control on the questions whose facts lie before the last segment, shown first in the
report: the control of arm ``X`` is the arm named ``X_no_carry`` (``carry: false``); an
untrained (training-free) memory arm's is ``window``; and with the strongest no-carry control
of the experiment, the format-only bar (:mod:`memllm.evaluation.carry`).

Choosing on validation: ``select`` names candidate memory arms (``among``); each is trained and
scored on the task's validation split (``subset``: the questions the choice is made on), the
best is tested, the others are not, and neither are their no-carry controls
(:mod:`memllm.evaluation.selection`)::

    select:
      among: [latent, episodic, kv_retrieval]
      keep: [latent]            # tested whatever validation says
      subset: facts earlier     # all (default), or a subset the task's breakdown labels
      max_examples: null        # validation examples per group; null = all of the split
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from memllm.core.config import check, from_dict, load_yaml, to_dict
from memllm.errors import ConfigError
from memllm.training.run_config import ModelSettings, RunConfig, with_file

ArmKind = Literal["base", "window", "finetuned", "memory"]


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class ArmSettings:
    """One arm of an experiment."""

    kind: ArmKind = _help("base | window | finetuned | memory")
    memory: Any = _help("memory config (kind memory)", default=None)
    lora: Any = _help("LoRA settings (required for finetuned, optional for memory)", default=None)
    train: dict[str, Any] = _help(
        "train settings for this arm, over the experiment's train section", default_factory=dict
    )
    checkpoint: str | None = _help(
        "evaluate this trained memory folder instead of training one", default=None
    )
    description: str | None = _help("one line for the report", default=None)
    untrained: bool = _help(
        "memory arms: inject the memory and evaluate it without training (the no fine-tuning "
        "ablation; equals window by construction, the memory starting as the identity)",
        default=False,
    )
    carry: bool = _help(
        "memory arms: false = the no-carry control: the memory trains and answers on the last "
        "segment_length tokens only (what window sees), so it can learn the answer's format and "
        "prior but nothing that earlier segments said; a memory that retrieves must beat it",
        default=True,
    )

    def __post_init__(self) -> None:
        if not self.carry:
            check(self.kind == "memory", "carry", f"a {self.kind} arm has no memory to carry")
            check(not self.untrained, "carry", "an untrained arm is the window arm already")
        if self.untrained:
            check(self.kind == "memory", "untrained", f"a {self.kind} arm has no memory to skip")
            check(self.memory is not None, "memory", "an untrained arm needs a memory config")
            check(self.checkpoint is None, "checkpoint", "an untrained arm loads no checkpoint")
            # LoRA starts as the identity too (B = 0): untrained it would change nothing.
            check(self.lora is None, "lora", "an untrained arm has no LoRA (it would be a no-op)")
            check(not self.train, "train", "an untrained arm does not train")
        if self.kind in ("base", "window"):
            check(self.memory is None and self.lora is None, "memory", f"{self.kind}: no memory")
            check(not self.train, "train", f"a {self.kind} arm does not train")
        if self.kind == "finetuned":
            check(self.lora is not None, "lora", "a finetuned arm needs lora settings")
            check(self.memory is None, "memory", "a finetuned arm has no memory")
        if self.kind == "memory":
            check(
                self.memory is not None or self.checkpoint is not None,
                "memory",
                "a memory arm needs a memory config (or a checkpoint)",
            )


@dataclass
class ExperimentEval:
    """The final evaluation, the same for every arm."""

    split: Literal["test", "validation"] = _help("split scored for the report", default="test")
    max_examples: int | None = _help("examples per group (task/length); null = all", default=None)
    batch_size: int = _help("generation batch size", default=8)
    max_new_tokens: int | None = _help("generation length; null = the task's", default=None)
    closed_set: bool = _help(
        "also score closed_set_accuracy: the most likely of the task's candidate answers, "
        "teacher-forced as the arm reads (tasks with a closed answer set: recall, BabiLong "
        "qa1-qa5); reported beside the generative accuracy",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.max_examples is not None:
            check(self.max_examples > 0, "max_examples", "must be > 0 (or null)")
        check(self.batch_size > 0, "batch_size", "must be > 0")


@dataclass
class ExperimentSelect:
    """Choose among memory arms on validation; only the chosen one (and ``keep``) is tested."""

    among: list[str] = _help(
        "candidate memory arms (names in arms); the highest validation score is tested, ties "
        "to the earlier name",
        default_factory=list,
    )
    keep: list[str] = _help("candidates tested whatever validation says", default_factory=list)
    subset: str = _help(
        "the validation questions the choice is made on: all, or a subset the task's breakdown "
        "labels (babilong, recall: facts earlier, facts in window)",
        default="all",
    )
    max_examples: int | None = _help(
        "validation examples scored per group (task/length), after the subset; null = all",
        default=None,
    )

    def __post_init__(self) -> None:
        check(len(self.among) > 0, "among", "name at least one candidate memory arm")
        twice = next((n for n in self.among if self.among.count(n) > 1), None)
        check(twice is None, "among", f"{twice!r} is named twice")
        for name in self.keep:
            check(name in self.among, "keep", f"{name!r} is not a candidate (add it to among)")
        if self.max_examples is not None:
            check(self.max_examples > 0, "max_examples", "must be > 0 (or null)")


@dataclass
class ExperimentConfig:
    """A set of arms evaluated on the same data."""

    name: str = _help("the report's title", default="experiment")
    model: ModelSettings = _help("the backbone shared by every arm", default_factory=ModelSettings)
    data: dict[str, Any] = _help(
        "task and its options", default_factory=lambda: {"task": "babilong"}
    )
    train_data: dict[str, Any] = _help(
        "what the trained arms train on: options of data.task that differ (train short, test "
        "long), or another task with its full options (task: corpus, ...: pretrain, then "
        "evaluate on data)",
        default_factory=dict,
    )
    segment_length: int = _help(
        "tokens per forward call for window/finetuned/memory arms", default=512
    )
    train: dict[str, Any] = _help("train settings shared by trained arms", default_factory=dict)
    validation: dict[str, Any] = _help(
        "validation during training (the run config's eval section)", default_factory=dict
    )
    log: dict[str, Any] = _help("logging of trained arms", default_factory=dict)
    eval: ExperimentEval = _help("the final evaluation", default_factory=ExperimentEval)
    arms: dict[str, ArmSettings] = _help("arm name → settings", default_factory=dict)
    compare_with: list[str] | None = _help(
        "reference arms, each other arm is paired-tested against each of them; null = base and "
        "window (list them too when adding one, e.g. a no-carry control: [base, window, x])",
        default=None,
    )
    select: ExperimentSelect | None = _help(
        "choose the best memory arm on the validation split, test only it (and keep); null = "
        "test every arm",
        default=None,
    )
    output_dir: str = _help("results.json, results.md, plots/ and arms/", default="runs/experiment")
    seed: int = _help("seed of every arm", default=0)

    def __post_init__(self) -> None:
        from memllm.data import TASKS

        check(len(self.arms) > 0, "arms", "needs at least one arm")
        check(self.segment_length > 0, "segment_length", "must be > 0")
        check(isinstance(self.data.get("task"), str), "data.task", "name the task")
        for ref in self.compare_with or []:
            check(ref in self.arms, "compare_with", f"no arm named {ref!r}")
        # The no-carry control cuts each input to its last segment where the answer is
        # generated; HotpotQA's supporting facts and ZsRE's teacher-forced scores read the
        # inputs their own way, so there the control would see more than it should.
        for name, arm in self.arms.items():
            check(
                arm.carry or self.data["task"] not in ("hotpotqa", "zsre"),
                f"arms.{name}.carry",
                f"false is not supported for {self.data['task']} (its extra scorers read whole "
                "inputs); use it on babilong",
            )
        # Every arm is scored by generating answers; a corpus has none (its place is train_data).
        check(
            self.data["task"] != "corpus",
            "data.task",
            "the evaluation needs a task with answers; pretrain on a corpus with train_data.task",
        )
        task = self.train_data.get("task", self.data["task"])
        check(
            isinstance(task, str) and task in TASKS,
            "train_data.task",
            f"unknown task {task!r} (known: {', '.join(TASKS)})",
        )
        if self.select is not None:
            self._check_select(self.select)
        if self.train_task_name == "corpus":
            metric = self.validation.get("metric", "loss")
            check(
                metric == "loss",
                "validation.metric",
                f"{metric!r}: the corpus (train_data.task) has no answers to score; use loss",
            )
        # Build every arm's run config now, so that a bad memory or train setting in any arm is
        # an error when the file loads, not after the arms before it have run.
        for name, arm in self.arms.items():
            if arm.untrained:
                from memllm.memory import memory_config_from_dict

                memory_config_from_dict(arm.memory, prefix=f"arms.{name}.memory.")
            elif arm.kind in ("finetuned", "memory") and arm.checkpoint is None:
                run = arm_run_config(self, name, arm)
                check(
                    self.train_task_name != "corpus" or run.train.max_length is not None,
                    "train.max_length",
                    "the corpus (train_data.task) is packed into rows of this many tokens; set it",
                )

    def _check_select(self, select: ExperimentSelect) -> None:
        from memllm.data import TASKS

        for name in select.among:
            arm = self.arms.get(name)
            check(arm is not None, "select.among", f"no arm named {name!r}")
            check(arm.kind == "memory", "select.among", f"{name!r} is not a memory arm")
            check(
                arm.carry,
                "select.among",
                f"{name!r} is a no-carry control (it runs with its candidate, not as one)",
            )
        check(
            self.eval.split == "test",
            "eval.split",
            "select chooses on the validation split; the chosen arm is evaluated on test",
        )
        task = self.data["task"]
        labelled = getattr(TASKS[task].task_cls, "breakdown_subsets", ()) if task in TASKS else ()
        check(
            select.subset in ("all", *labelled),
            "select.subset",
            f"{select.subset!r}: {task} labels "
            + (", ".join(repr(s) for s in labelled) if labelled else "no subsets")
            + "; or all",
        )
        # The choice is made on data's validation split; trained arms train on train_data's train
        # split. With fewer held-out examples there, train would hold what select validates on.
        held_out = self.train_data.get("num_validation")
        if self.train_task_name == task and isinstance(held_out, int):
            defaults = {f.name: f.default for f in fields(TASKS[task].options_cls)}
            chosen_on = self.data.get("num_validation", defaults.get("num_validation"))
            check(
                not isinstance(chosen_on, int) or held_out >= chosen_on,
                "train_data.num_validation",
                "below data.num_validation: the trained arms would train on validation examples "
                "that select chooses on",
            )

    @property
    def train_task_name(self) -> str:
        """The task the trained arms train and validate on."""
        return self.train_data.get("task", self.data["task"])

    @property
    def train_task_data(self) -> dict[str, Any]:
        """``task`` and options of the training data (what a trained arm's run config holds)."""
        if self.train_task_name != self.data["task"]:
            return dict(self.train_data)  # another task: data's options are not its options
        return {**self.data, **self.train_data}


def load_experiment_config(path: str | Path, overrides: list[str] | None = None):
    from memllm.core.config import apply_overrides

    data = load_yaml(path)
    if isinstance(data, dict) and "rungs" in data:
        raise with_file(
            ConfigError(
                f"rungs: a ladder (one experiment per rung): memllm ladder --config {path}"
            ),
            path,
        )
    try:
        return from_dict(ExperimentConfig, apply_overrides(data, list(overrides or [])))
    except ConfigError as err:
        raise with_file(err, path) from None


def arm_run_config(exp: ExperimentConfig, name: str, arm: ArmSettings) -> RunConfig:
    """The run config that trains ``arm``: the experiment's model, seed and segment length, and
    its training data (``train_data`` over ``data``, or ``train_data`` alone for another task)."""
    train = {**exp.train, **arm.train, "segment_length": exp.segment_length}
    if not arm.carry:  # the no-carry control trains on what it will answer from: one segment
        train["max_length"] = min(train.get("max_length") or exp.segment_length, exp.segment_length)
    validation = dict(exp.validation)
    if exp.train_task_name == "corpus":
        # A corpus has no answers: validate on its held-out loss, and say so in the saved config.
        validation.update(generate=False, metric="loss")
    data = {
        "model": to_dict(exp.model),
        "memory": arm.memory,
        "lora": arm.lora,
        "data": exp.train_task_data,
        "train": train,
        "eval": validation,
        "log": exp.log,
        "output_dir": str(Path(exp.output_dir) / "arms" / name),
        "seed": exp.seed,
    }
    try:
        return from_dict(RunConfig, data)
    except ConfigError as err:
        raise ConfigError(f"arms.{name}: {err}") from None
