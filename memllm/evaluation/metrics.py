"""The metric-definition registry: every metric a task reports → its definition and kind.

Each task's official metric lives beside the task (:mod:`memllm.data.babilong_metric`,
:mod:`memllm.data.hotpotqa_metric`, :mod:`memllm.data.zsre_metric`) with its definitions; this is
the one place that collects them. Reports print :data:`METRIC_DEFINITIONS` next to the numbers
and choose each metric's interval by :data:`METRIC_KINDS`
(:func:`memllm.evaluation.results.build_arm_result`). A new task's metric is registered here;
a task whose metric shares a name with another task's (recall's ``accuracy``) states its own
definition in its ``metric_definitions``, which the experiment passes with its numbers.
"""

from __future__ import annotations

from memllm.data.babilong_metric import BABILONG_DEFINITIONS, BABILONG_KINDS
from memllm.data.hotpotqa_metric import HOTPOT_DEFINITIONS, HOTPOT_KINDS
from memllm.data.zsre_metric import ZSRE_DEFINITIONS, ZSRE_KINDS

CLOSED_SET_DEFINITIONS = {
    "closed_set_accuracy": "the most likely of the task's candidate answers (sum of its tokens' "
    "teacher-forced log-probabilities, the input read as for generation) is the gold one; "
    "beside the generative accuracy, not instead of it (chance = 1 / candidates)",
}

METRIC_DEFINITIONS: dict[str, str] = {
    **BABILONG_DEFINITIONS,
    **HOTPOT_DEFINITIONS,
    **ZSRE_DEFINITIONS,
    **CLOSED_SET_DEFINITIONS,
}
"""Metric name → definition, shown in reports next to the numbers."""

METRIC_KINDS: dict[str, str] = {
    **BABILONG_KINDS,
    **HOTPOT_KINDS,
    **ZSRE_KINDS,
    "closed_set_accuracy": "binary",
}
"""Metric name → ``binary`` / ``continuous`` by definition (reports choose intervals by it)."""
