"""Run an experiment: every arm on the same examples, then the report.

The config (arm kinds, training data, references) is described in
:mod:`memllm.evaluation.experiment_config`; results, intervals and paired tests in
:mod:`memllm.evaluation.results`, the files written in :mod:`memllm.evaluation.report`.

Each arm generates an answer for every evaluation example and the task scores them
(``task.score``); what a task measures beyond that comes from its hooks
(:class:`memllm.data.base.Task`): ``model_scores`` (HotpotQA's supporting facts, ZsRE's
teacher-forced accuracies), ``breakdown`` (BabiLong's questions by where their facts are) and
``checkpoint_heads`` (a head saved with a memory). The runner never asks which task it runs.

An arm is first *prepared* (:meth:`Experiment.prepare_arm`: trained, loaded, or the bare
backbone), then tested (:meth:`Experiment.test_arm`). With ``select`` in the config, the
candidate memory arms are prepared and scored on the validation split first, and only the
chosen one (and ``keep``) is tested (:mod:`memllm.evaluation.selection`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memllm.core.config import to_dict
from memllm.data.base import Breakdown, Reading
from memllm.errors import ConfigError
from memllm.evaluation import answers, carry, closed_set, report, results, selection
from memllm.evaluation.experiment_config import (
    ArmSettings,
    ExperimentConfig,
    arm_run_config,
    load_experiment_config,
)
from memllm.evaluation.groups import first_per_group
from memllm.training.feature_cache import SharedFeatures
from memllm.training.run_config import with_file

log = logging.getLogger(__name__)


# How each neural ``arch`` attaches to its decoder layer, for the report's arm descriptions.
_NEURAL_ARCHS = {
    "context": "context (Hercules/Titans MAC)",
    "layer": "a layer before attention",
    "gate": "a gated branch (Titans MAG)",
}


# Experiment settings that do not change what an arm's test result means: an arm evaluated under
# other values of these is kept (``--arms``); ``select`` only decides which arms are tested, and
# ``output_dir`` where they are written (a moved or copied folder keeps its arms).
LOOSE_SETTINGS = ("arms", "name", "compare_with", "select", "output_dir")


def select_examples(task, split: str, per_group: int | None):
    """The evaluation examples: the first ``per_group`` of each group, in the task's order."""
    return first_per_group(task.examples(split), per_group)


@dataclass
class PreparedArm:
    """An arm ready to answer: its model (trained, loaded, or the bare backbone) and what its
    result reports about how it got there.

    Attributes:
        seconds: spent preparing it (loading, training), counted in the arm's wall time.
        segment: tokens per segment it reads (``base``: its whole window).
    """

    model: Any
    tokenizer: Any
    segment: int
    seconds: float
    heads: dict[str, Any] = field(default_factory=dict)
    train_time: float | None = None
    train_log: Path | None = None
    params: int = 0


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
    inline: bool = False,
    shard: tuple[int, int] | None = None,
    answered: Collection[int] = (),
    on_batch: Callable[[list[int], list[str], float], None] | None = None,
) -> list[str | None]:
    """Generate an answer for each example (batched, longest first to waste little padding);
    ``context_tokens``: read only the last that many tokens of each prompt. Examples with their
    question in its own segment (``data.question_segment: own``) are laid out so, unless
    ``inline`` (the base arm reads the whole prompt as one).

    Examples in ``answered`` (indices) and, with ``shard = (k, n)``, those of the other shards'
    batches (:func:`memllm.evaluation.answers.plan_batches`) are not generated: their entries are
    None. ``on_batch(indices, texts, seconds)`` is called as each batch finishes."""
    from tqdm.auto import tqdm

    from memllm.core.generation import generate
    from memllm.data.layout import encode_rows, generate_rows, has_own_question, longest_first
    from memllm.data.prompting import format_example

    own = not inline and has_own_question(examples)
    if own:
        rows = encode_rows(examples, tokenizer, segment_length=segment_length, chat=chat, eos=False)
        order = longest_first([len(r.prompt_ids) for r in rows])
    else:
        prompts = [format_example(tokenizer, ex.prompt, ex.target, chat)[0] for ex in examples]
        order = longest_first([len(p) for p in prompts])
    settings = dict(
        segment_length=segment_length, max_new_tokens=max_new_tokens, context_tokens=context_tokens
    )

    def answer(batch: list[int]) -> list[str]:
        if own:
            return generate_rows(model, tokenizer, [rows[i] for i in batch], **settings)
        return generate(
            model, tokenizer, [prompts[i] for i in batch], batch_size=len(batch), **settings
        )

    result: list[str | None] = [None] * len(examples)
    batches = answers.plan_batches(order, batch_size, shard=shard, answered=answered)
    for batch in tqdm(batches, desc=desc, unit="batch"):
        start = time.perf_counter()
        texts = answer(batch)
        for i, text in zip(batch, texts, strict=True):
            result[i] = text
        if on_batch is not None:
            on_batch(batch, texts, time.perf_counter() - start)
    return result


class Experiment:
    """Runs the arms of an :class:`ExperimentConfig` and writes the report."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        source: str | Path | None = None,
        arms: list[str] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        from memllm.data import build_task

        self.cfg, self.source, self.shard = cfg, source, shard
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
            self._check_checkpoints()
            self._check_shard()
        except ConfigError as err:
            raise with_file(err, source) from None
        self.examples = select_examples(self.task, cfg.eval.split, cfg.eval.max_examples)
        self.max_new_tokens = cfg.eval.max_new_tokens or getattr(self.task, "max_new_tokens", 20)
        self.candidates = self._closed_set_candidates(self.examples)
        self.notes: list[str] = []
        self.selection: dict[str, Any] | None = None  # results["selection"] (select in config)
        self.prepared: dict[str, PreparedArm] = {}  # candidates validated, kept for their test
        # what the frozen backbone hands to a memory's layer, recorded once for all the arms
        # that train at that place (train.feature_cache)
        self.features = SharedFeatures()
        self._backbone = None
        self._tokenizer = None  # of the last arm run: the task's breakdown reads prompts with it
        self._breakdown: Breakdown | bool | None = None  # the task's; False: it has none
        self._unreported: set[str] = set()  # earlier arms that select does not test
        self.paths: dict[str, Path] | None = None  # the report's files, once written

    def _check_checkpoints(self) -> None:
        """Every selected arm's checkpoint is a readable checkpoint folder, checked before any
        arm runs: a missing one would otherwise stop an experiment (or a ladder) after the
        arms before it had run for hours. A checkpoint that an arm of this run trains (one in
        ``<output_dir>/arms/<arm>/``) is not there yet, and is checked when it is loaded."""
        from memllm.core.checkpoint import read_checkpoint
        from memllm.errors import CheckpointError

        written_here = [
            (self.out / "arms" / n).resolve() for n in self.arm_names if n in self.run_configs
        ]
        for name in self.arm_names:
            path = self.cfg.arms[name].checkpoint
            if path is None or any(Path(path).resolve().is_relative_to(d) for d in written_here):
                continue
            try:
                read_checkpoint(path)
            except CheckpointError as err:
                raise ConfigError(
                    f"arms.{name}.checkpoint: {err} (train that arm first, or fix the path)"
                ) from None

    def _check_shard(self) -> None:
        """``--shard`` splits the answering of arms that are ready to answer; an arm that trains
        here would be trained by every shard, and selection validates on all examples."""
        if self.shard is None:
            return
        k, n = self.shard[0] + 1, self.shard[1]
        if self.cfg.select is not None:
            raise ConfigError(f"--shard {k}/{n}: not with select (run the selection unsharded)")
        training = [a for a in self.arm_names if a in self.run_configs]
        if training:
            raise ConfigError(
                f"--shard {k}/{n}: arm {training[0]} trains in this run and every shard would "
                f"train it; train it first (a run without --shard, or memllm train), then give "
                f"arms.{training[0]}.checkpoint its final folder"
            )

    def tokenizer(self):
        """The tokenizer of the last arm prepared, else the backbone's (loaded alone: a run
        whose arms were all kept from earlier runs still reports the task's breakdown)."""
        if self._tokenizer is None:
            from memllm.core.backbone import load_tokenizer

            m = self.cfg.model
            self._tokenizer = load_tokenizer(m.name, gguf_file=m.gguf_file)
        return self._tokenizer

    def backbone(self):
        """The bare backbone, loaded once for the baseline arms."""
        if self._backbone is None:
            self._backbone = self._fresh_backbone()
        return self._backbone

    def run(self) -> dict[str, Any]:
        """Run the selected arms; the report is rewritten after each one, so an interrupted
        experiment keeps what it finished (rerun the rest with ``--arms``)."""
        names = self.arm_names
        if self.cfg.select is not None:  # validate the candidates; test only the chosen ones
            kept = self._kept_arms()
            before = set(kept)
            names = selection.run_selection(self, kept)  # drops kept arms not to be tested
            self._unreported |= before - set(kept)
        own: dict[str, Any] = {}  # this run's arms, filled in as they finish
        results = self._write_shared_report(own) if not names else {}
        for name in names:
            log.info("arm %s (%s)", name, self.cfg.arms[name].kind)
            result = self.run_arm(name, self.cfg.arms[name])  # a rerun replaces a kept one
            if result is None:  # a shard whose arm other shards still answer
                continue
            own[name] = result
            results = self._write_shared_report(own)
        return results

    def _write_shared_report(self, own: dict[str, Any]) -> dict[str, Any]:
        """The report of this run's arms and of every other arm whose result is in the output
        folder with the same settings, read again at each write: experiments that run other
        ``--arms`` into the same folder at the same time (on several GPUs, say) build one report
        between them. The read and the write are one step under a lock."""
        from memllm.training.lock import waiting_lock

        with waiting_lock(self.out / "results.lock"):
            kept = {n: r for n, r in self._kept_arms().items() if n not in self._unreported}
            arms = {**kept, **own}
            return self.write_report([arms[n] for n in self.cfg.arms if n in arms])

    def write_report(self, arm_results: list[dict[str, Any]], *, plots: bool = True) -> dict:
        """Write results.json, results.md and (``plots``) the plots from ``arm_results`` and the
        selection, if any; returns the results."""
        info = results.experiment_info(
            self.cfg.name, to_dict(self.cfg), self.cfg.seed, notes=self.notes
        )
        out = results.make_results(info, arm_results)
        references = self.cfg.compare_with or results.REFERENCE_ARMS
        results.add_comparisons(out, references)
        if self.selection is not None:
            out["selection"] = self.selection
        if self._breakdown is None and arm_results:  # once, with the first arm's tokenizer
            reading = Reading(self.cfg.segment_length, chat=self.cfg.model.chat_template)
            self._breakdown = self.task.breakdown(self.examples, self.tokenizer(), reading) or False
        if self._breakdown:
            b = self._breakdown
            results.add_breakdown(out, b.key, b.labels, b.description, references, order=b.order)
        chance = self.chance()
        if chance is not None:
            out["experiment"]["chance"] = chance
        labels = self._breakdown.labels if self._breakdown else None
        carry.carry_checks(
            out,
            carry.control_pairs(self.cfg.arms),
            labels,
            seed=self.cfg.seed,
            controls=carry.control_arms(self.cfg.arms),
        )
        self.paths = report.write_results(self.out, out, plots=plots)
        return out

    def chance(self) -> float | None:
        """The accuracy of a uniform guess, for tasks with a closed answer set: the task's own
        ``chance``, else a uniform guess among each example's candidates; None otherwise."""
        chance = getattr(self.task, "chance", None)
        if isinstance(chance, (int, float)):
            return float(chance)
        candidates = [self.task.answer_candidates(ex) for ex in self.examples]
        if candidates and all(candidates):
            return closed_set.chance_level(candidates)
        return None

    def _closed_set_candidates(self, examples) -> list | None:
        """Each example's candidate answers under ``eval.closed_set`` (None when off)."""
        if not self.cfg.eval.closed_set:
            return None
        candidates = [self.task.answer_candidates(ex) for ex in examples]
        missing = next((e for e, c in zip(examples, candidates, strict=True) if not c), None)
        if missing is not None:
            raise with_file(
                ConfigError(
                    f"eval.closed_set: {missing.id} has no closed answer set (tasks that have "
                    "one: recall, babilong qa1-qa5)"
                ),
                self.source,
            )
        return [list(c) for c in candidates]

    def _kept_arms(self) -> dict[str, dict[str, Any]]:
        """With ``--arms``, the other arms' results from this output folder's ``results.json``,
        so that running arms one session at a time builds up one report instead of overwriting
        it. An arm is kept only if the experiment's settings (all but arms, name, compare_with)
        and that arm's own settings are unchanged; others are dropped with a warning."""
        path = self.out / "results.json"
        others = [n for n in self.cfg.arms if n not in self.arm_names]
        if not others or not path.is_file():
            return {}
        previous, same = self.previous_results()
        kept, dropped = {}, []
        for name in others:
            if name not in previous["arms"]:
                continue
            if same and self.same_arm(previous, name):
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

    def previous_results(self) -> tuple[dict[str, Any], bool]:
        """This output folder's ``results.json`` (empty when there is none), and whether it ran
        with this experiment's settings (all but :data:`LOOSE_SETTINGS`)."""
        path = self.out / "results.json"
        if not path.is_file():
            return {"experiment": {}, "arms": {}}, False
        previous = results.load_results(path)
        old, new = previous["experiment"].get("config", {}), to_dict(self.cfg)
        same = {k: v for k, v in old.items() if k not in LOOSE_SETTINGS} == {
            k: v for k, v in new.items() if k not in LOOSE_SETTINGS
        }
        return previous, same

    def same_arm(self, previous: dict[str, Any], name: str) -> bool:
        """Whether arm ``name`` ran in ``previous`` with the settings it has now."""
        old = previous["experiment"].get("config", {}).get("arms", {}).get(name)
        return old == to_dict(self.cfg)["arms"][name]

    def run_arm(self, name: str, arm: ArmSettings) -> dict[str, Any] | None:
        """Train (or load) one arm, generate its answers and score them; an arm already
        prepared for validation (``select``) is tested as it is, not trained again. None: this
        shard answered its share, and others still have examples to answer."""
        prepared = self.prepared.pop(name, None) or self.prepare_arm(name, arm)
        return self.test_arm(name, arm, prepared)

    def prepare_arm(self, name: str, arm: ArmSettings) -> PreparedArm:
        """Train one arm (or load its checkpoint, or take the bare backbone)."""
        import memllm
        from memllm.core.backbone import context_length

        start = time.perf_counter()
        train_time, train_log, params = None, None, 0
        heads: dict[str, Any] = {}  # auxiliary heads trained or saved with the arm
        segment = self.cfg.segment_length
        if arm.kind in ("base", "window"):
            model, tokenizer = self.backbone()
            if arm.kind == "base":
                window = context_length(model) or segment
                segment = window - self.max_new_tokens
                self._note_truncation(tokenizer, segment)
        elif arm.checkpoint is not None:
            model, tokenizer = self._load_checkpoint(arm)
            # loaded before generating: a missing head is an error that should not wait for it
            train = {**self.cfg.train, **arm.train}
            heads = self.task.checkpoint_heads(arm.checkpoint, model, train)
        elif arm.untrained:
            model, tokenizer = self._untrained_memory(name, arm)
        else:
            from memllm.training.trainer import train

            cfg = self.run_configs[name]
            # the built task is shared, unless a curriculum stage changes its options: then the
            # trainer builds each stage's task from the run's data section
            staged = any(stage.data for stage in cfg.train.curriculum)
            result = train(
                cfg,
                source=self.source,
                task=None if staged else self.train_task,
                shared_features=self.features,
            )
            model, tokenizer = result.model, result.tokenizer
            # the heads of the trainer's plug-ins, by plug-in name (the SP head: "sp")
            heads = {k: getattr(p, "head", p) for k, p in result.plugins.items()}
            train_time = time.perf_counter() - start
            train_log = Path(cfg.output_dir) / "log.jsonl"
        # a finetuned arm has no memory parameters; an untrained memory trained none
        if arm.kind in ("finetuned", "memory") and not arm.untrained:
            trained = memllm.memory_parameters(model) + memllm.lora_parameters(model)
            params = sum(p.numel() for p in trained)
        model.eval()
        self._tokenizer = tokenizer
        return PreparedArm(
            model,
            tokenizer,
            segment,
            time.perf_counter() - start,
            heads=heads,
            train_time=train_time,
            train_log=train_log,
            params=params,
        )

    def score_examples(
        self,
        name: str,
        arm: ArmSettings,
        prepared: PreparedArm,
        examples,
        candidates,
        desc: str,
        store: answers.AnswerStore | None = None,
    ) -> tuple[list[str], dict[str, list[float]], float] | None:
        """``(outputs, per-example scores, seconds)``: the arm's answers to ``examples`` scored
        by the task, and by ``eval.closed_set`` (``candidates``: each example's answer set) when
        on; ``seconds``: what the answers taken from ``store`` cost when they were generated.

        With a ``store``, answers already in it are reused, new ones are saved batch by batch,
        and only this experiment's shard is answered: None when other shards' examples still
        have no answer (the shard that answers the last one scores them all)."""
        model, tokenizer, segment = prepared.model, prepared.tokenizer, prepared.segment
        saved = store.saved(name, [ex.id for ex in examples]) if store is not None else {}
        known = {i for i, ex in enumerate(examples) if ex.id in saved}

        def record(batch: list[int], texts: list[str], seconds: float) -> None:
            assert store is not None
            store.append([examples[i].id for i in batch], texts, seconds)

        with torch.no_grad():
            outputs = predict(
                model,
                tokenizer,
                examples,
                segment_length=segment,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.cfg.eval.batch_size,
                desc=desc,
                chat=self.cfg.model.chat_template,
                context_tokens=None if arm.carry else segment,
                inline=arm.kind == "base",
                shard=self.shard if store is not None else None,
                answered=known,
                on_batch=record if store is not None else None,
            )
        reused = {i for i, text in enumerate(outputs) if text is None}
        if reused:  # answered before, or by other shards (which may have finished meanwhile)
            saved = store.load()[0] if store is not None else {}
            for i in reused:
                outputs[i] = saved[examples[i].id][0] if examples[i].id in saved else None
            missing = sum(text is None for text in outputs)
            if missing:
                k, n = self.shard[0] + 1, self.shard[1]  # only a shard leaves examples out
                log.info(
                    "arm %s: shard %d/%d has answered its share; %d of %d examples still wait "
                    "for the other shards (the one that answers the last writes the result)",
                    name, k, n, missing, len(examples),
                )  # fmt: skip
                return None
        seconds = sum(saved[examples[i].id][1] for i in reused)
        scores = self.task.score(examples, outputs)
        if candidates is not None:
            with torch.no_grad():
                likelihoods = closed_set.candidate_log_likelihoods(
                    model,
                    tokenizer,
                    examples,
                    candidates,
                    segment_length=segment,
                    chat=self.cfg.model.chat_template,
                    context_tokens=None if arm.carry else segment,
                    batch_size=self.cfg.eval.batch_size,
                )
            scores[closed_set.METRIC] = closed_set.closed_set_correct(
                examples, candidates, likelihoods
            )
        return outputs, scores, seconds

    def validate_arm(
        self, name: str, arm: ArmSettings, prepared: PreparedArm, examples
    ) -> dict[str, list[float]]:
        """Per-example scores of a prepared arm on validation ``examples``: the same generation
        (and closed-set) scoring as its test, without the task's model-based extras."""
        candidates = self._closed_set_candidates(examples)
        scored = self.score_examples(name, arm, prepared, examples, candidates, f"validate {name}")
        assert scored is not None  # without a store every example is answered
        return scored[1]

    def test_arm(self, name: str, arm: ArmSettings, prepared: PreparedArm) -> dict[str, Any] | None:
        """Generate a prepared arm's answers to the evaluation examples (saved as they come,
        :mod:`memllm.evaluation.answers`), score them, write its predictions and return its
        result; None when other shards still have examples to answer."""
        model, tokenizer, segment = prepared.model, prepared.tokenizer, prepared.segment
        start = time.perf_counter()
        self._tokenizer = tokenizer
        key = answers.model_fingerprint(to_dict(self.cfg), name, model)
        store = answers.AnswerStore(self.out / "arms" / name, key)
        scored = self.score_examples(
            name, arm, prepared, self.examples, self.candidates, f"eval {name}", store
        )
        if scored is None:
            return None
        outputs, scores, reused_seconds = scored
        # what every answer cost, including those generated by an earlier run or another shard
        eval_time = time.perf_counter() - start + reused_seconds
        reading = Reading(
            segment,
            chat=self.cfg.model.chat_template,
            batch_size=self.cfg.eval.batch_size,
            arm=name,
            outputs=outputs,
            heads=prepared.heads,
            reference_model=lambda: self.backbone()[0],
            train_task=self.train_task,
            seed=self.cfg.seed,
            output_dir=self.out / "arms" / name,
        )
        extra = self.task.model_scores(model, tokenizer, self.examples, reading)
        scores.update(extra.scores)
        self.notes += [n for n in extra.notes if n not in self.notes]
        self._write_predictions(name, outputs, scores)
        return results.build_arm_result(
            name,
            scores,
            [ex.meta.get("group", "all") for ex in self.examples],
            example_ids=[ex.id for ex in self.examples],
            description=arm.description or self._describe(name, arm),
            wall_time_s=prepared.seconds + time.perf_counter() - start + reused_seconds,
            train_time_s=prepared.train_time,
            eval_time_s=eval_time,
            trainable_params=prepared.params,
            seed=self.cfg.seed,
            train_log=(
                prepared.train_log if prepared.train_log and prepared.train_log.is_file() else None
            ),
            descriptions=getattr(self.task, "metric_definitions", None),
            extra={"kind": arm.kind, "segment_length": segment},
        )

    @staticmethod
    def _describe(name: str, arm: ArmSettings) -> str:
        D = results.ARM_DESCRIPTIONS

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
        if kind == "kv_retrieval":  # nothing to train: not the identity-at-init ablation
            return text
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
        set_seed(
            self.cfg.seed
        )  # the initial weights a trained arm starts from (memllm.training.trainer)
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
        from memllm.data.prompting import format_example

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


def run_experiment(
    path: str | Path, overrides: list[str] | None = None, arms=None, shard: str | None = None
):
    cfg = load_experiment_config(path, overrides)
    experiment = Experiment(cfg, source=path, arms=arms, shard=answers.parse_shard(shard))
    return experiment, experiment.run()


def quickstart_config() -> Path:
    return Path(__file__).parent.parent / "presets" / "quickstart.yaml"
