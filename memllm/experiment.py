"""Experiments: several arms on the same data and the same evaluation, with an honest report.

An experiment config names a backbone, a task, the segment length the memory arms (and the
``window`` baseline) see per forward call, and a set of arms:

- ``base`` — the backbone zero-shot with the whole input in its window (inputs longer than the
  window are cut from the left, the question kept; the report says so);
- ``window`` — the backbone seeing only the last ``segment_length`` tokens;
- ``finetuned`` — the backbone with LoRA trained on the same data, seeing the same window;
- ``memory`` — a memory (latent or neural, optionally with LoRA) trained on the same data and
  reading the whole input segment by segment.

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

    def __post_init__(self) -> None:
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
        "task options that differ for training (e.g. shorter lengths: train short, test long)",
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
    output_dir: str = _help("results.json, results.md, plots/ and arms/", default="runs/experiment")
    seed: int = _help("seed of every arm", default=0)

    def __post_init__(self) -> None:
        check(len(self.arms) > 0, "arms", "needs at least one arm")
        check(self.segment_length > 0, "segment_length", "must be > 0")
        check(isinstance(self.data.get("task"), str), "data.task", "name the task")
        check("task" not in self.train_data, "train_data.task", "the task is data.task")


def load_experiment_config(path: str | Path, overrides: list[str] | None = None):
    from memllm.config import apply_overrides

    data = load_yaml(path)
    try:
        return from_dict(ExperimentConfig, apply_overrides(data, list(overrides or [])))
    except ConfigError as err:
        raise with_file(err, path) from None


def arm_run_config(exp: ExperimentConfig, name: str, arm: ArmSettings) -> RunConfig:
    """The run config that trains ``arm`` (same model, data, seed, segment length)."""
    train = {**exp.train, **arm.train, "segment_length": exp.segment_length}
    data = {
        "model": to_dict(exp.model),
        "memory": arm.memory,
        "lora": arm.lora,
        "data": exp.data,
        "train": train,
        "eval": exp.validation,
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
) -> list[str]:
    """Generate an answer for each example (batched, longest first to waste little padding)."""
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
        try:
            self.task = build_task(cfg.data["task"], options, source_file=str(source or ""))
            self.train_task = (
                build_task(
                    cfg.data["task"],
                    {**options, **cfg.train_data},
                    source_file=str(source or ""),
                    key_prefix="train_data.",
                )
                if cfg.train_data
                else self.task
            )
            self.run_configs = {
                name: arm_run_config(cfg, name, arm)
                for name, arm in cfg.arms.items()
                if arm.kind in ("finetuned", "memory") and arm.checkpoint is None
            }
        except ConfigError as err:
            raise with_file(err, source) from None
        self.examples = select_examples(self.task, cfg.eval.split, cfg.eval.max_examples)
        self.max_new_tokens = cfg.eval.max_new_tokens or getattr(self.task, "max_new_tokens", 20)
        self.notes: list[str] = []
        self._backbone = None

    def backbone(self):
        """The bare backbone, loaded once for the baseline arms."""
        import memllm

        if self._backbone is None:
            m = self.cfg.model
            self._backbone = memllm.load_backbone(m.name, gguf_file=m.gguf_file, dtype=m.dtype)
        return self._backbone

    def run(self) -> dict[str, Any]:
        from memllm import report

        arm_results = []
        for name in self.arm_names:
            log.info("arm %s (%s)", name, self.cfg.arms[name].kind)
            arm_results.append(self.run_arm(name, self.cfg.arms[name]))
        info = report.experiment_info(
            self.cfg.name, to_dict(self.cfg), self.cfg.seed, notes=self.notes
        )
        results = report.make_results(info, arm_results)
        report.add_comparisons(results)
        paths = report.write_results(self.out, results)
        self.paths = paths
        return results

    def run_arm(self, name: str, arm: ArmSettings) -> dict[str, Any]:
        import memllm
        from memllm import report
        from memllm.backbone import context_length

        start = time.perf_counter()
        train_time, train_log, params = None, None, 0
        segment = self.cfg.segment_length
        if arm.kind in ("base", "window"):
            model, tokenizer = self.backbone()
            if arm.kind == "base":
                window = context_length(model) or segment
                segment = window - self.max_new_tokens
                self._note_truncation(tokenizer, segment)
        elif arm.checkpoint is not None:
            model, tokenizer = self._load_checkpoint(arm)
        else:
            from memllm.train import train

            cfg = self.run_configs[name]
            result = train(cfg, source=self.source, task=self.train_task)
            model, tokenizer = result.model, result.tokenizer
            train_time = time.perf_counter() - start
            train_log = Path(cfg.output_dir) / "log.jsonl"
        if arm.kind in ("finetuned", "memory"):  # a finetuned arm has no memory parameters
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
            )
        eval_time = time.perf_counter() - eval_start
        scores = self.task.score(self.examples, outputs)
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

    @staticmethod
    def _describe(name: str, arm: ArmSettings) -> str:
        from memllm.report import ARM_DESCRIPTIONS

        if name in ARM_DESCRIPTIONS:
            return ARM_DESCRIPTIONS[name]
        kind = arm.memory.get("type", "latent") if isinstance(arm.memory, dict) else arm.kind
        text = ARM_DESCRIPTIONS.get(kind, arm.kind)
        return text + (" + LoRA" if arm.lora is not None and arm.kind == "memory" else "")

    def _load_checkpoint(self, arm: ArmSettings):
        import memllm

        m = self.cfg.model
        model, tokenizer = memllm.load_backbone(m.name, gguf_file=m.gguf_file, dtype=m.dtype)
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
