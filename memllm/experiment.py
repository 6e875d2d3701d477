"""Experiments: several arms on the same data and the same evaluation, with an honest report.

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
  the library): the arm equals ``window`` by construction, and is there to show it.

Training data: ``train_data`` holds options of ``data.task`` that differ for training (train
short, test long); or, when it names another task (``train_data.task``, e.g. ``corpus`` for
MemoryLlama's pretraining on FineWeb-Edu before a BabiLong evaluation), that task's own full
options. The trained arms train and validate on it; every arm is evaluated on ``data``.

Every arm is scored on the same test examples with the task's official metric; results carry
95 % intervals and paired tests against ``base`` and ``window`` (see :mod:`memllm.report`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from memllm.config import check, from_dict, load_yaml, to_dict
from memllm.errors import ConfigError
from memllm.run_config import ModelSettings, RunConfig, with_file

log = logging.getLogger(__name__)

ArmKind = Literal["base", "window", "finetuned", "memory"]


# How each neural ``arch`` attaches to its decoder layer, for the report's arm descriptions.
_NEURAL_ARCHS = {
    "context": "context (Hercules/Titans MAC)",
    "layer": "a layer before attention",
    "gate": "a gated branch (Titans MAG)",
}


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

    def __post_init__(self) -> None:
        if self.max_examples is not None:
            check(self.max_examples > 0, "max_examples", "must be > 0 (or null)")
        check(self.batch_size > 0, "batch_size", "must be > 0")


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
    from memllm.config import apply_overrides

    data = load_yaml(path)
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


def select_examples(task, split: str, per_group: int | None):
    """The evaluation examples: the first ``per_group`` of each group, in the task's order."""
    examples = task.examples(split)
    if per_group is None:
        return examples
    seen: dict[str, int] = {}
    chosen = []
    for ex in examples:
        group = ex.meta.get("group", "all")
        if seen.get(group, 0) < per_group:
            chosen.append(ex)
            seen[group] = seen.get(group, 0) + 1
    return chosen


def predict(
    model,
    tokenizer,
    examples,
    *,
    segment_length: int,
    max_new_tokens: int,
    batch_size: int,
    desc: str,
    chat: bool = False,
    context_tokens: int | None = None,
) -> list[str]:
    """Generate an answer for each example (batched, longest first to waste little padding);
    ``context_tokens``: read only the last that many tokens of each prompt."""
    from memllm.generation import generate
    from memllm.prompting import format_example

    prompts = [format_example(tokenizer, ex.prompt, ex.target, chat)[0] for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    outputs = generate(
        model,
        tokenizer,
        [prompts[i] for i in order],
        segment_length=segment_length,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=True,
        desc=desc,
        context_tokens=context_tokens,
    )
    result = [""] * len(examples)
    for i, text in zip(order, outputs, strict=True):
        result[i] = text
    return result


class Experiment:
    """Runs the arms of an :class:`ExperimentConfig` and writes the report."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        source: str | Path | None = None,
        arms: list[str] | None = None,
    ) -> None:
        from memllm.data import build_task

        self.cfg, self.source = cfg, source
        self.out = Path(cfg.output_dir)
        unknown = [a for a in (arms or []) if a not in cfg.arms]
        if unknown:
            raise ConfigError(f"--arms: no arm named {unknown[0]!r} (have {', '.join(cfg.arms)})")
        self.arm_names = arms or list(cfg.arms)
        options = {k: v for k, v in cfg.data.items() if k != "task"}
        train_data = cfg.train_task_data
        try:
            self.task = build_task(
                cfg.data["task"], options, source_file=str(source or ""), key_prefix="data."
            )
            # Tasks build their examples lazily: a corpus on the hub is only read if an arm trains.
            self.train_task = (
                build_task(
                    train_data["task"],
                    {k: v for k, v in train_data.items() if k != "task"},
                    source_file=str(source or ""),
                    key_prefix="train_data.",
                )
                if cfg.train_data
                else self.task
            )
            self.run_configs = {
                name: arm_run_config(cfg, name, arm)
                for name, arm in cfg.arms.items()
                if arm.kind in ("finetuned", "memory")
                and arm.checkpoint is None
                and not arm.untrained
            }
        except ConfigError as err:
            raise with_file(err, source) from None
        self.examples = select_examples(self.task, cfg.eval.split, cfg.eval.max_examples)
        self.max_new_tokens = cfg.eval.max_new_tokens or getattr(self.task, "max_new_tokens", 20)
        self.notes: list[str] = []
        self._backbone = None
        self._reach: dict[str, str] | None = None  # BabiLong: example id → where its facts are

    def backbone(self):
        """The bare backbone, loaded once for the baseline arms."""
        if self._backbone is None:
            self._backbone = self._fresh_backbone()
        return self._backbone

    def run(self) -> dict[str, Any]:
        """Run the selected arms; the report is rewritten after each one, so an interrupted
        experiment keeps what it finished (rerun the rest with ``--arms``)."""
        kept = self._kept_arms()
        done: dict[str, dict[str, Any]] = {}
        results: dict[str, Any] = {}
        for name in self.arm_names:
            log.info("arm %s (%s)", name, self.cfg.arms[name].kind)
            done[name] = self.run_arm(name, self.cfg.arms[name])
            # the config's order, run or kept
            finished = [done.get(n) or kept[n] for n in self.cfg.arms if n in done or n in kept]
            results = self._write_report(finished)
        return results

    def _write_report(self, arm_results: list[dict[str, Any]]) -> dict[str, Any]:
        from memllm import report

        info = report.experiment_info(
            self.cfg.name, to_dict(self.cfg), self.cfg.seed, notes=self.notes
        )
        results = report.make_results(info, arm_results)
        references = self.cfg.compare_with or report.REFERENCE_ARMS
        report.add_comparisons(results, references)
        if self._reach is None:
            self._reach = self._facts_reach()
        if self._reach:
            report.add_breakdown(
                results,
                "where the supporting facts are",
                self._reach,
                f"BabiLong questions split by whether every supporting fact lies in the last "
                f"{self.cfg.segment_length} tokens of the prompt (the window and memory arms' "
                "last segment: answerable without a memory) or starts earlier (only a memory, "
                "or base's whole window, can bring it to the answer).",
                references,
                order=["facts in window", "facts earlier"],
            )
        self.paths = report.write_results(self.out, results)
        return results

    def _kept_arms(self) -> dict[str, dict[str, Any]]:
        """With ``--arms``, the other arms' results from this output folder's ``results.json``,
        so that running arms one session at a time builds up one report instead of overwriting
        it. An arm is kept only if the experiment's settings (all but arms, name, compare_with)
        and that arm's own settings are unchanged; others are dropped with a warning."""
        from memllm import report

        path = self.out / "results.json"
        others = [n for n in self.cfg.arms if n not in self.arm_names]
        if not others or not path.is_file():
            return {}
        previous = report.load_results(path)
        old, new = previous["experiment"].get("config", {}), to_dict(self.cfg)
        loose = ("arms", "name", "compare_with")
        same = {k: v for k, v in old.items() if k not in loose} == {
            k: v for k, v in new.items() if k not in loose
        }
        kept, dropped = {}, []
        for name in others:
            if name not in previous["arms"]:
                continue
            if same and old.get("arms", {}).get(name) == new["arms"][name]:
                kept[name] = previous["arms"][name]
            else:
                dropped.append(name)
        if kept:
            log.info("arms %s: kept from %s (same settings)", ", ".join(kept), path)
            notes = previous["experiment"].get("notes", [])
            self.notes += [n for n in notes if n not in self.notes]
        if dropped:
            log.warning(
                "%s: arms %s ran with other settings; not in the new report (rerun them)",
                path,
                ", ".join(dropped),
            )
        return kept

    def _facts_reach(self) -> dict[str, str]:
        """BabiLong built offline: example id → "facts in window" / "facts earlier" (empty for
        other tasks and for BabiLong files, which do not say where their facts are)."""
        if getattr(self.task, "name", None) != "babilong":
            return {}
        from memllm.data.babilong import supporting_facts_in_window
        from memllm.prompting import format_example

        tokenizer = self.backbone()[1]
        chat = self.cfg.model.chat_template
        reach = {}
        for ex in self.examples:
            text = format_example(tokenizer, ex.prompt, ex.target, chat)[0]
            inside = supporting_facts_in_window(text, ex, tokenizer, self.cfg.segment_length)
            if inside is None:
                return {}
            reach[ex.id] = "facts in window" if inside else "facts earlier"
        return reach

    def run_arm(self, name: str, arm: ArmSettings) -> dict[str, Any]:
        import memllm
        from memllm import report
        from memllm.backbone import context_length

        start = time.perf_counter()
        train_time, train_log, params = None, None, 0
        sp_head = None  # HotpotQA: the supporting-fact head trained with the arm, if any
        segment = self.cfg.segment_length
        if arm.kind in ("base", "window"):
            model, tokenizer = self.backbone()
            if arm.kind == "base":
                window = context_length(model) or segment
                segment = window - self.max_new_tokens
                self._note_truncation(tokenizer, segment)
        elif arm.checkpoint is not None:
            model, tokenizer = self._load_checkpoint(arm)
            sp_head = self._checkpoint_sp_head(arm, model)
        elif arm.untrained:
            model, tokenizer = self._untrained_memory(name, arm)
        else:
            from memllm.train import train

            cfg = self.run_configs[name]
            result = train(cfg, source=self.source, task=self.train_task)
            model, tokenizer = result.model, result.tokenizer
            sp_head = result.sp_head
            train_time = time.perf_counter() - start
            train_log = Path(cfg.output_dir) / "log.jsonl"
        # a finetuned arm has no memory parameters; an untrained memory trained none
        if arm.kind in ("finetuned", "memory") and not arm.untrained:
            trained = memllm.memory_parameters(model) + memllm.lora_parameters(model)
            params = sum(p.numel() for p in trained)
        model.eval()
        eval_start = time.perf_counter()
        with torch.no_grad():
            outputs = predict(
                model,
                tokenizer,
                self.examples,
                segment_length=segment,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.cfg.eval.batch_size,
                desc=f"eval {name}",
                chat=self.cfg.model.chat_template,
                context_tokens=None if arm.carry else segment,
            )
        eval_time = time.perf_counter() - eval_start
        scores = self.task.score(self.examples, outputs)
        scores.update(self._zsre_scores(name, model, tokenizer, segment))
        scores.update(self._sp_scores(name, arm, model, tokenizer, segment, outputs, sp_head))
        self._write_predictions(name, outputs, scores)
        return report.build_arm_result(
            name,
            scores,
            [ex.meta.get("group", "all") for ex in self.examples],
            example_ids=[ex.id for ex in self.examples],
            description=arm.description or self._describe(name, arm),
            wall_time_s=time.perf_counter() - start,
            train_time_s=train_time,
            eval_time_s=eval_time,
            trainable_params=params,
            seed=self.cfg.seed,
            train_log=train_log if train_log and train_log.is_file() else None,
            extra={"kind": arm.kind, "segment_length": segment},
        )

    def _sp_scores(
        self, name: str, arm: ArmSettings, model, tokenizer, segment: int, outputs, head=None
    ) -> dict[str, list[float]]:
        """HotpotQA: each test example's supporting facts, scored with its answer (``sp_*``,
        ``joint_*``); nothing for other tasks.

        A trained arm uses the head trained jointly with it (``train.supporting_facts_weight``)
        or saved in its checkpoint. Every other arm (base, window, untrained, trained without
        the head) cannot predict supporting facts zero-shot: it gets a probe, the same head
        trained on this arm's own frozen final hidden states of the training examples. Features
        come from the arm's own reading of the input (memory arms segment by segment, window and
        finetuned the last ``segment`` tokens, base its whole window), so a sentence outside what
        the arm sees gets no score and is never predicted. Writes the official prediction file
        ``arms/<arm>/hotpot_predictions.json``.
        """
        if getattr(self.task, "name", None) != "hotpotqa":
            return {}
        from memllm import sp_head as sp
        from memllm.backbone import hidden_size
        from memllm.data.supporting_facts import write_hotpot_predictions
        from memllm.inject import _find_controller
        from memllm.metrics import first_line

        start = time.perf_counter()
        size, chat = hidden_size(model), self.cfg.model.chat_template
        reading = {"segment_length": segment, "chat": chat, "batch_size": self.cfg.eval.batch_size}
        notes = [
            f"supporting facts: sentences with head probability ≥ {sp.SELECT_THRESHOLD}, at least "
            f"the {sp.SELECT_MIN_K} best (every HotpotQA question has two supporting paragraphs)"
        ]
        if head is not None:
            notes.append(f"{name}: supporting facts from the SP head trained with the arm")
        else:
            hotpot = getattr(self.train_task, "name", None) == "hotpotqa"
            train_task = self.train_task if hotpot else self.task  # a corpus has no sentences
            train = train_task.examples("train")
            probe = sp.build_head(size, self.cfg.seed)
            features = sp.sentence_features(model, tokenizer, train, head=probe, **reading)
            head = sp.fit_probe(features, train, size, seed=self.cfg.seed)
            notes.append(
                f"{name}: supporting facts from a probe, the SP head trained {sp.PROBE_EPOCHS} "
                f"epochs on this arm's frozen final hidden states of the {len(train)} training "
                "examples (no SP training of the model itself)"
                + (
                    ""
                    if _find_controller(model)
                    else f"; it reads the last {segment} tokens of each input, sentences "
                    "before them get no score"
                )
            )
        head = head.to(next(model.parameters()).device)
        features = sp.sentence_features(model, tokenizer, self.examples, head=head, **reading)
        facts = sp.predict_supporting_facts(head, features, self.examples)
        scores = self.task.score(self.examples, outputs, supporting_facts=facts)
        write_hotpot_predictions(
            self.out / "arms" / name / "hotpot_predictions.json",
            [ex.meta["_id"] for ex in self.examples],
            [first_line(o) for o in outputs],
            facts,
        )
        self.notes += [n for n in notes if n not in self.notes]
        log.info("arm %s: supporting facts in %.1f s", name, time.perf_counter() - start)
        return {k: v for k, v in scores.items() if k.startswith(("sp_", "joint_"))}

    def _checkpoint_sp_head(self, arm: ArmSettings, model):
        """HotpotQA: the supporting-fact head saved with a checkpoint arm's memory (None if it
        has none). Strict when the config trains the head: then a checkpoint without one is an
        error, raised before the arm spends time generating."""
        if getattr(self.task, "name", None) != "hotpotqa":
            return None
        from memllm import sp_head as sp
        from memllm.backbone import hidden_size

        weight = {**self.cfg.train, **arm.train}.get("supporting_facts_weight", 0)
        if weight > 0 or (Path(arm.checkpoint) / sp.SP_HEAD_FILE).is_file():
            return sp.load_sp_head(arm.checkpoint, hidden_size(model))
        return None

    def _zsre_scores(self, name: str, model, tokenizer, segment: int) -> dict[str, list[float]]:
        """ZsRE's teacher-forced accuracies of this arm (nothing for other tasks).

        The model reads each question as the arm reads it in generation: a memory arm writes
        the earlier segments into a fresh memory per batch and reads the last one, the window
        and finetuned arms see the last ``segment`` tokens, base its whole window. Locality
        (``loc_unchanged``) compares with the bare backbone. A variant that some test records
        lack (no paraphrase or locality question) is left out with a note: an interval over a
        subset would not pair with the other metrics' examples.
        """
        if getattr(self.task, "name", None) != "zsre":
            return {}
        from memllm.data.zsre import teacher_forced_metrics

        start = time.perf_counter()
        per = teacher_forced_metrics(
            model,
            tokenizer,
            self.examples,
            batch_size=self.cfg.eval.batch_size,
            segment_length=segment,
            chat=self.cfg.model.chat_template,
            add_special_tokens=False,  # prompts are tokenised as in training and generation
            reference_model=self.backbone()[0],
        )
        notes = [
            "zsre: token_acc, seq_acc and their rephrase_/loc_ variants are teacher-forced on "
            "each arm's own reading of the question (memory arms segment by segment, window and "
            "finetuned arms the last segment_length tokens, base the whole input); loc_unchanged "
            "compares with the bare backbone"
        ]
        kept = {}
        for metric, values in per.items():
            missing = sum(v != v for v in values)  # nan: the record has no such question
            if missing:
                notes.append(
                    f"zsre: {metric} not reported: {missing} of {len(values)} test records "
                    "have no such question"
                )
            else:
                kept[metric] = values
        self.notes += [n for n in notes if n not in self.notes]
        log.info("arm %s: zsre teacher-forced metrics in %.1f s", name, time.perf_counter() - start)
        return kept

    @staticmethod
    def _describe(name: str, arm: ArmSettings) -> str:
        from memllm.report import ARM_DESCRIPTIONS as D

        if arm.kind != "memory" or not isinstance(arm.memory, dict):
            return D.get(name) or D.get(arm.kind, arm.kind)
        # A memory arm is described by its config, not its name: "latent" may be an ablation.
        mem = arm.memory
        kind = mem.get("type", "latent")
        parts = [D.get(kind, kind)]
        if kind == "neural":
            arch = mem.get("arch", "context")
            parts[0] += f", as {_NEURAL_ARCHS.get(arch, arch)}"
        if "layer_ids" in mem:
            parts[0] += f", layers {mem['layer_ids']}"
        if kind == "latent" and mem.get("update_gate") is False:
            parts.append(D["no_gate"])
        if kind == "latent" and mem.get("sparsity_weight") == 0 and mem.get("entropy_weight") == 0:
            parts.append(D["no_reg"])
        if not arm.carry:
            parts.append(D["no_carry"])
        text = "; ".join(parts) + (" + LoRA" if arm.lora is not None else "")
        return f"{text}; {D['untrained']}" if arm.untrained else text

    def _fresh_backbone(self):
        """A new copy of the backbone, for an arm that adds memory to it."""
        import memllm

        m = self.cfg.model
        return memllm.load_backbone(m.name, gguf_file=m.gguf_file, dtype=m.dtype, device=_device())

    def _untrained_memory(self, name: str, arm: ArmSettings):
        """A fresh backbone with the arm's memory injected as initialised, never trained."""
        from accelerate.utils import set_seed

        import memllm

        model, tokenizer = self._fresh_backbone()
        memory = memllm.memory_config_from_dict(arm.memory, prefix=f"arms.{name}.memory.")
        set_seed(self.cfg.seed)  # the initial weights a trained arm starts from (memllm.train)
        try:  # inject_memory validates (layer ids) before touching the model
            memllm.inject_memory(model, memory)
        except ConfigError as err:
            raise with_file(ConfigError(f"arms.{name}.memory.{err}"), self.source) from None
        return model, tokenizer

    def _load_checkpoint(self, arm: ArmSettings):
        import memllm

        model, tokenizer = self._fresh_backbone()
        memllm.load_memory(model, arm.checkpoint)
        return model, tokenizer

    def _note_truncation(self, tokenizer, window: int) -> None:
        from memllm.prompting import format_example

        chat = self.cfg.model.chat_template
        longest = max(
            len(tokenizer(format_example(tokenizer, ex.prompt, ex.target, chat)[0]).input_ids)
            for ex in self.examples
        )
        if longest > window:
            self.notes.append(
                f"base: inputs above the {window}-token window (the longest has {longest}) "
                "were cut from the left, the question kept"
            )

    def _write_predictions(self, name: str, outputs: list[str], scores) -> None:
        import json

        folder = self.out / "arms" / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "predictions.jsonl", "w") as f:
            for i, (ex, text) in enumerate(zip(self.examples, outputs, strict=True)):
                row = {
                    "id": ex.id,
                    "group": ex.meta.get("group"),
                    "target": ex.target,
                    "output": text,
                    **{k: v[i] for k, v in scores.items()},
                }
                f.write(json.dumps(row) + "\n")


def _device() -> str | None:
    """Where evaluated models go: the GPU when there is one (trained arms come from
    accelerate, which picks it too); None keeps the CPU."""
    return "cuda" if torch.cuda.is_available() else None


def run_experiment(path: str | Path, overrides: list[str] | None = None, arms=None):
    cfg = load_experiment_config(path, overrides)
    experiment = Experiment(cfg, source=path, arms=arms)
    return experiment, experiment.run()


def cmd_experiment(args) -> int:
    from memllm.report import format_table

    arms = args.arms.split(",") if args.arms else None
    experiment, results = run_experiment(args.config, args.overrides, arms)
    print(format_table(results))
    print(f"report: {experiment.paths['markdown']}")
    return 0


def quickstart_config() -> Path:
    return Path(__file__).parent / "presets" / "quickstart.yaml"


def cmd_quickstart(args) -> int:
    from memllm.report import format_table

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    arms = args.arms.split(",") if args.arms else None
    experiment, results = run_experiment(quickstart_config(), overrides, arms)
    print(format_table(results))
    print(f"report: {experiment.paths['markdown']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("experiment", help="run memory and baseline arms, write a report")
    p.add_argument("--config", required=True, help="experiment config YAML")
    p.add_argument("--arms", help="comma-separated subset of the config's arms")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=cmd_experiment)

    q = sub.add_parser(
        "quickstart",
        help="the bundled model + BabiLong built offline: latent memory vs baselines (~15 min CPU)",
    )
    q.add_argument("--output", help="output folder (default runs/quickstart)")
    q.add_argument("--arms", help="comma-separated subset of the arms (base, window, latent)")
    q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    q.set_defaults(func=cmd_quickstart)
