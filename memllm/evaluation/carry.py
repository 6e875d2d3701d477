"""Does the memory carry? Each memory arm against its own no-carry control.

Beating ``window`` proves little: a trained read-out also learns the answer's format and the
window's own facts. What only a memory can do is bring facts from earlier segments to the
answer, so each memory arm is compared, paired, with its **no-carry control** (the same memory
trained and evaluated on the last segment only) on the questions whose facts lie **before** the
last segment (the task's breakdown subset ``facts earlier``; all questions when the task has no
breakdown).

Pairing (automatic, by name): the control of arm ``X`` is the arm ``X_no_carry`` (a memory arm
with ``carry: false``). A memory arm that trains nothing (``untrained: true``, e.g. the
training-free ``kv_retrieval``) has ``window`` as its control: with nothing carried it reads what
``window`` reads. :func:`carry_checks` stores the table in ``results["carry"]``; the report
shows it first (:mod:`memllm.evaluation.markdown`) and the ladder marks ✔ where an arm beats its
control with p < :data:`CARRY_ALPHA`.
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


def carry_checks(
    results: dict[str, Any],
    pairs: Mapping[str, str],
    labels: Mapping[str, str] | None = None,
    metrics: Sequence[str] = ("accuracy", "closed_set_accuracy"),
    *,
    subset: str = SUBSET,
    seed: int = 0,
) -> dict[str, Any]:
    """Each arm of ``pairs`` against its control on the ``subset`` of the examples (``labels``:
    example id → subset name, the task's breakdown; None = every example), for each of
    ``metrics`` both arms report. Sets and returns ``results["carry"]``::

        {"subset": "facts earlier" | "all", "alpha": 0.01,
         "rows": [{"arm", "control", "metric", "n", "arm_summary", "control_summary",
                   "test": paired_test(arm − control) | None, "carries": bool}]}
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
        for metric, a, b, kind in _paired_values(arm, arms[control]):
            if metric not in metrics:
                continue
            a, b = a[mask], b[mask]
            test = paired_test(a, b, kind, seed=seed, alpha=CARRY_ALPHA) if mask.any() else None
            rows.append(
                {
                    "arm": name,
                    "control": control,
                    "metric": metric,
                    "n": int(mask.sum()),
                    "arm_summary": summarize(a, _summary_kind(arm, metric), seed=seed),
                    "control_summary": summarize(
                        b, _summary_kind(arms[control], metric), seed=seed
                    ),
                    "test": test,
                    "carries": bool(test and test["diff"] > 0 and test["p_value"] < CARRY_ALPHA),
                }
            )
    rows.sort(key=lambda r: list(metrics).index(r["metric"]))
    results["carry"] = {
        "subset": "all" if labels is None else subset,
        "alpha": CARRY_ALPHA,
        "rows": rows,
    }
    return results["carry"]
