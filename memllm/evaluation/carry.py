"""Does the memory carry? Each memory arm against its own no-carry control, and against the
strongest no-carry control of the experiment.

Beating ``window`` proves little: a trained read-out also learns the answer's format and the
window's own facts. What only a memory can do is bring facts from earlier segments to the
answer, so each memory arm is compared, paired, with its **no-carry control** (the same memory
trained and evaluated on the last segment only) on the questions whose facts lie **before** the
last segment (the task's breakdown subset ``facts earlier``; all questions when the task has no
breakdown).

Pairing (automatic, by name): the control of arm ``X`` is the arm ``X_no_carry`` (a memory arm
with ``carry: false``). A memory arm that trains nothing (``untrained: true``, e.g. the
training-free ``kv_retrieval``) has ``window`` as its control: with nothing carried it reads what
``window`` reads.

The strongest control. An arm's own control can be degenerate: the episodic memory reads nothing
when nothing is stored, so ``episodic_no_carry`` is ``window`` and cannot even learn the answer's
format, while another memory's control (``latent_no_carry``, a read-out trained on the question
segment) does, and scores above chance without a single fact. No control can carry a fact, so
the best of them is the format-only bar: each row also names the **strongest no-carry control**
of the experiment (:func:`control_arms`: the ``carry: false`` memory arms and ``window``), the
one with the highest mean on the same subset and metric (ties: the arm's own control, then name
order), and tests the arm against it too when it is not the own control. Choosing the strongest
control on the test questions can only make that test harder to pass.

:func:`carry_checks` stores the table in ``results["carry"]``; the report shows it first
(:mod:`memllm.evaluation.markdown`) and the ladder (:mod:`memllm.evaluation.ladder`) marks ✔
where an arm beats its own control with p < :data:`CARRY_ALPHA`, ✔✔ where it also beats the
strongest control.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from memllm.evaluation.results import _paired_values, _summary_kind
from memllm.evaluation.stats import paired_test, summarize

CONTROL_SUFFIX = "_no_carry"
CARRY_ALPHA = 0.01
"""A memory carries when it beats its control with a paired p below this (and Δ > 0)."""
SUBSET = "facts earlier"


def control_pairs(arms: Mapping[str, Any]) -> dict[str, str]:
    """Memory arm → its no-carry control, among ``arms`` (name → :class:`ArmSettings`-like
    objects with ``kind``, ``carry`` and ``untrained``), in the arms' order."""
    pairs = {}
    for name, arm in arms.items():
        if arm.kind != "memory" or not arm.carry:
            continue
        control = arms.get(name + CONTROL_SUFFIX)
        if control is not None and control.kind == "memory" and not control.carry:
            pairs[name] = name + CONTROL_SUFFIX
        elif arm.untrained and "window" in arms:
            pairs[name] = "window"
    return pairs


def control_arms(arms: Mapping[str, Any]) -> list[str]:
    """The arms of ``arms`` (as for :func:`control_pairs`) that cannot carry a fact from an
    earlier segment: the ``carry: false`` memory arms and the ``window`` arms, in order."""
    return [
        name
        for name, arm in arms.items()
        if arm.kind == "window" or (arm.kind == "memory" and not arm.carry)
    ]


def _strongest(own: str, means: Mapping[str, float]) -> str:
    """The control with the highest mean (``means``: control → mean, NaN = unknown, ranked
    last); ties go to ``own``, then to the first name in alphabetical order."""

    def rank(name: str):
        mean = means[name]
        return (-mean if np.isfinite(mean) else np.inf, name != own, name)

    return min(means, key=rank)


def _beats(test: Mapping[str, Any] | None) -> bool:
    """Whether a paired test (arm − control) says the arm is better with p < CARRY_ALPHA."""
    return bool(test and test["diff"] > 0 and test["p_value"] < CARRY_ALPHA)


def carry_checks(
    results: dict[str, Any],
    pairs: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
    metrics: Sequence[str] = ("accuracy", "closed_set_accuracy"),
    *,
    controls: Sequence[str],
    subset: str = SUBSET,
    seed: int = 0,
) -> dict[str, Any]:
    """Each arm of ``pairs`` against its control, and against the strongest no-carry control,
    on the ``subset`` of the examples (``labels``: example id → subset name, the task's
    breakdown; None = every example), for each of ``metrics`` both arms report.

    ``controls``: the arms that cannot carry a fact (:func:`control_arms` of the experiment's
    arm settings). Sets and returns ``results["carry"]``::

        {"subset": "facts earlier" | "all", "alpha": 0.01,
         "rows": [{"arm", "control", "metric", "n", "arm_summary", "control_summary",
                   "test": paired_test(arm − control) | None, "carries": bool,
                   "strongest_control", "strongest_summary",
                   "strongest_test": paired_test(arm − strongest) | None,
                   "carries_over_strongest": bool}]}

    ``strongest_test`` is None when the strongest control is the arm's own (``test`` is that
    test already; ``carries_over_strongest`` is then ``carries``). Results written before the
    strongest control existed lack the four ``strongest_*``/``carries_over_strongest`` keys.
    """
    arms = results["arms"]
    rows = []
    for name, control in pairs.items():
        if name not in arms or control not in arms:
            continue
        arm = arms[name]
        if labels is None:
            mask = np.ones(len(arm["example_ids"]), dtype=bool)
        else:
            mask = np.asarray([labels.get(str(i)) == subset for i in arm["example_ids"]])
        # the arm's and each control's values on the subset, paired: metric → control → values
        paired: dict[str, dict[str, tuple[np.ndarray, np.ndarray, str]]] = {}
        for c in dict.fromkeys([control, *controls]):
            if c == name or c not in arms:
                continue
            for metric, a, b, kind in _paired_values(arm, arms[c]):
                if metric in metrics:
                    paired.setdefault(metric, {})[c] = (a[mask], b[mask], kind)
        for metric, by_control in paired.items():
            if control not in by_control:
                continue
            a, b, kind = by_control[control]
            test = paired_test(a, b, kind, seed=seed, alpha=CARRY_ALPHA) if mask.any() else None
            row = {
                "arm": name,
                "control": control,
                "metric": metric,
                "n": int(mask.sum()),
                "arm_summary": summarize(a, _summary_kind(arm, metric), seed=seed),
                "control_summary": summarize(b, _summary_kind(arms[control], metric), seed=seed),
                "test": test,
                "carries": _beats(test),
                "strongest_control": control,
                "strongest_summary": None,
                "strongest_test": None,
                "carries_over_strongest": _beats(test),
            }
            means = {
                c: float(np.mean(v)) if v.size else float("nan")
                for c, (_, v, _) in by_control.items()
            }
            strongest = _strongest(control, means)
            if strongest == control:
                row["strongest_summary"] = row["control_summary"]
            else:
                _, s, s_kind = by_control[strongest]
                s_test = paired_test(a, s, s_kind, seed=seed, alpha=CARRY_ALPHA)
                row.update(
                    strongest_control=strongest,
                    strongest_summary=summarize(
                        s, _summary_kind(arms[strongest], metric), seed=seed
                    ),
                    strongest_test=s_test,
                    carries_over_strongest=_beats(s_test),
                )
            rows.append(row)
    rows.sort(key=lambda r: list(metrics).index(r["metric"]))
    results["carry"] = {
        "subset": "all" if labels is None else subset,
        "alpha": CARRY_ALPHA,
        "rows": rows,
    }
    return results["carry"]
