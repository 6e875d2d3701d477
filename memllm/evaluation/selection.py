"""Choose the best memory arm on validation, then test only it.

Results discipline (DESIGN.md): settings are chosen on validation and the test split is run once
per setting. An experiment's ``select`` block names the candidate memory arms (``among``); before
any arm is tested, :func:`run_selection` prepares each candidate as its test would (trains it, or
injects an untrained one) and scores it with the experiment's primary metric (the first of
:data:`memllm.evaluation.results.PRIMARY_METRICS` that the task's generation scores report, the
same generation and closed-set scoring as the test, the same prompt layout) on the task's
**validation** split, restricted to ``subset`` (a subset the task's breakdown labels, e.g.
``facts earlier``) and to the first ``max_examples`` of each group. The chosen arm is the one
with the highest score, ties to the earlier name in ``among``.

Tested afterwards (:func:`arms_to_test`): the chosen arm, the ``keep`` arms and every arm that is
not a candidate; a candidate's no-carry control (``<name>_no_carry``) only when its candidate is
tested, so the losers' controls are never trained. A tested candidate keeps the model validation
trained (it is not trained again); a loser's model is dropped as soon as it falls behind.

``--arms`` runs validate the candidates among their arms; a candidate validated in an earlier run
with the same settings is not prepared again (its score is read back from ``results.json``).
The choice is made once every candidate has a score; until then only the ``keep`` candidates are
tested. ``results.json`` records::

    "selection": {"split": "validation", "subset", "max_examples", "metric", "among", "keep",
                  "scores": {arm: {"value", "ci95", "n", "method", "eval_time_s"}},
                  "chosen": arm | None,      # None while a candidate has no score
                  "tested": [candidates tested]}

and the report shows it as "Chosen on validation" (:mod:`memllm.evaluation.markdown`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from memllm.data.base import Reading
from memllm.errors import ConfigError
from memllm.evaluation import results
from memllm.evaluation.carry import CONTROL_SUFFIX
from memllm.evaluation.experiment_config import ExperimentSelect
from memllm.evaluation.groups import first_per_group
from memllm.training.run_config import with_file

# The functions that drive a run take the :class:`memllm.evaluation.experiment.Experiment`
# (typed ``Experiment`` below as Any: that module imports this one).
Experiment = Any

log = logging.getLogger(__name__)


def leader(scores: Mapping[str, float], among: Sequence[str]) -> str | None:
    """The candidate of ``among`` with the highest score among those scored (ties: the earlier
    name); None when none is scored."""
    return max((name for name in among if name in scores), key=scores.__getitem__, default=None)


def choose(scores: Mapping[str, float], among: Sequence[str]) -> str | None:
    """The chosen candidate: :func:`leader` once every candidate has a score, else None."""
    if any(name not in scores for name in among):
        return None
    return leader(scores, among)


def arms_to_test(arms: Sequence[str], select: ExperimentSelect, chosen: str | None) -> list[str]:
    """Of ``arms`` (in their order), those tested: every arm that is not a candidate, the chosen
    candidate and the ``keep`` ones, and a candidate's no-carry control only with its candidate."""
    tested = set(select.keep) | ({chosen} if chosen else set())
    control_of = {name + CONTROL_SUFFIX: name for name in select.among}
    out = []
    for name in arms:
        if name in select.among:
            keep = name in tested
        elif name in control_of:
            keep = control_of[name] in tested
        else:
            keep = True
        if keep:
            out.append(name)
    return out


def validation_examples(task, select: ExperimentSelect, tokenizer, reading: Reading) -> list:
    """The validation examples the choice is made on: the task's validation split, restricted to
    ``select.subset`` (labelled by the task's breakdown as the arms read), then the first
    ``select.max_examples`` of each group.

    Raises:
        ConfigError: naming ``select.subset`` when the task does not label the subset or no
            validation example is in it, or ``select`` when the split is empty.
    """
    examples = task.examples("validation")
    if not examples:
        raise ConfigError("select: the task has no validation examples (set data.num_validation)")
    subset = select.subset
    if subset != "all":
        found = task.breakdown(examples, tokenizer, reading)
        if not found or not found.labels:
            raise ConfigError(
                f"select.subset: {subset!r}: these validation examples do not say where their "
                "facts are (use all)"
            )
        examples = [ex for ex in examples if found.labels.get(ex.id) == subset]
        if not examples:
            raise ConfigError(
                f"select.subset: no validation example is {subset!r} at segment_length "
                f"{reading.segment_length} (use all, or longer inputs)"
            )
    return first_per_group(examples, select.max_examples)


def summarize_scores(
    name: str, per_example: Mapping[str, Sequence[float]], examples
) -> tuple[str, dict[str, Any]]:
    """``(metric, summary)``: the primary metric of ``per_example`` with its 95 % interval (a
    Wilson interval for a 0/1 metric), as an arm's result would report it."""
    arm = results.build_arm_result(
        name,
        per_example,
        [ex.meta.get("group", "all") for ex in examples],
        example_ids=[ex.id for ex in examples],
    )
    metric = results.primary_metric({"arms": {name: arm}})
    summary = dict(arm["metrics"][metric])
    summary.pop("description", None)  # the metric's definition is in every arm's result
    return metric, summary


def recorded_scores(experiment: Experiment) -> tuple[dict[str, dict[str, Any]], str | None]:
    """``(arm → summary, metric)`` of the candidates validated by an earlier run in this output
    folder whose settings (the experiment's, the arm's, ``select.subset`` and
    ``select.max_examples``) are the ones this run has."""
    select = experiment.cfg.select
    assert select is not None
    previous, same = experiment.previous_results()
    record = previous.get("selection") or {}
    old = previous["experiment"].get("config", {}).get("select") or {}
    if not same or not record.get("scores"):
        return {}, None
    if (old.get("subset"), old.get("max_examples")) != (select.subset, select.max_examples):
        return {}, None
    scores = {
        name: summary
        for name, summary in record["scores"].items()
        if name in select.among and experiment.same_arm(previous, name)
    }
    return scores, record.get("metric")


def _record(
    select: ExperimentSelect, scores: Mapping[str, dict], metric: str | None
) -> dict[str, Any]:
    values = {name: s["value"] for name, s in scores.items()}
    chosen = choose(values, select.among)
    return {
        "split": "validation",
        "subset": select.subset,
        "max_examples": select.max_examples,
        "metric": metric,
        "among": list(select.among),
        "keep": list(select.keep),
        "scores": {name: dict(scores[name]) for name in select.among if name in scores},
        "chosen": chosen,
        "tested": arms_to_test(select.among, select, chosen),
    }


def run_selection(experiment: Experiment, kept: dict[str, dict[str, Any]]) -> list[str]:
    """Validate the candidates of ``experiment.cfg.select`` that this run's arms include, choose,
    and return the arms of this run to test (in order). Sets ``experiment.selection``; drops from
    ``kept`` (the earlier runs' arm results) the arms not to be tested. The test split is not
    read here: every candidate is scored on validation before any arm is tested."""
    select = experiment.cfg.select
    assert select is not None
    scores, metric = recorded_scores(experiment)
    if scores:
        log.info("select: validation scores of %s read back (same settings)", ", ".join(scores))
    experiment.selection = _record(select, scores, metric)
    examples = None
    for name in select.among:
        if name in scores or name not in experiment.arm_names:
            continue
        arm = experiment.cfg.arms[name]
        log.info("select: validating %s", name)
        prepared = experiment.prepare_arm(name, arm)
        if examples is None:
            reading = Reading(prepared.segment, chat=experiment.cfg.model.chat_template)
            try:
                examples = validation_examples(experiment.task, select, prepared.tokenizer, reading)
            except ConfigError as err:
                raise with_file(err, experiment.source) from None
        start = time.perf_counter()
        per_example = experiment.validate_arm(name, arm, prepared, examples)
        metric, scores[name] = summarize_scores(name, per_example, examples)
        scores[name]["eval_time_s"] = time.perf_counter() - start
        log.info(
            "select: %s %s = %.3f on %d validation examples (%s)",
            name,
            metric,
            scores[name]["value"],
            scores[name]["n"],
            select.subset,
        )
        experiment.prepared[name] = prepared
        _drop_behind(experiment, select, scores)
        experiment.selection = _record(select, scores, metric)
        # written now, so that an interrupted run keeps the scores it has (the plots wait)
        experiment.write_report([kept[n] for n in experiment.cfg.arms if n in kept], plots=False)

    record = experiment.selection
    chosen = record["chosen"]
    waiting = [name for name in select.among if name not in scores]
    if waiting:
        log.warning(
            "select: no validation score yet for %s (run them with --arms): the choice waits; "
            "only keep arms are tested",
            ", ".join(waiting),
        )
    else:
        log.info("select: chosen on validation: %s", chosen)
    tested = set(arms_to_test(list(experiment.cfg.arms), select, chosen))
    for name in list(kept):
        if name not in tested:
            del kept[name]
    for name in [n for n in experiment.prepared if n not in tested]:
        del experiment.prepared[name]
    untested = [n for n in record["tested"] if n not in kept and n not in experiment.arm_names]
    if untested:
        log.warning(
            "select: %s to be tested but not among this run's arms (run them with --arms %s)",
            ", ".join(untested),
            ",".join(
                a
                for a in arms_to_test(list(experiment.cfg.arms), select, chosen)
                if a in untested or a.removesuffix(CONTROL_SUFFIX) in untested
            ),
        )
    return [name for name in experiment.arm_names if name in tested]


def _drop_behind(experiment: Experiment, select: ExperimentSelect, scores) -> None:
    """Free the models of validated candidates that can no longer be chosen before the others
    are trained: a candidate behind the leader is not tested, unless ``keep`` says so."""
    ahead = leader({n: s["value"] for n, s in scores.items()}, select.among)
    behind = [n for n in experiment.prepared if n not in select.keep and n != ahead]
    for name in behind:
        del experiment.prepared[name]
    if behind:
        gc.collect()  # a model with hooks may sit in reference cycles: free it now
