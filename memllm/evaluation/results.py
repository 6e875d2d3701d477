"""Experiment results: one schema, arm results, paired comparisons, breakdowns.

An experiment runs several *arms* (``base``, ``window``, ``finetuned``, ``latent``, ``neural``,
ablations) on the same evaluation examples. Each arm's per-example metric values become a result
with 95 % intervals (:func:`build_arm_result`), the arms are compared pairwise on the same
examples against the reference arms (:func:`add_comparisons`), optionally on subsets of the
examples too (:func:`add_breakdown`), and :func:`memllm.evaluation.report.write_results`
writes::

    <output_dir>/results.json    the numbers (schema below), per-example values included
    <output_dir>/results.md      tables, notes and the embedded plots
    <output_dir>/plots/*.png     heat-map, metric vs length, metrics per arm, per subset, training,
                                 memory (drawn by :mod:`memllm.evaluation.plots`)

``results.json``::

    {"experiment": {"name", "config", "seed", "created", "memllm_version", "device", "notes",
                    "primary_metric", "schema_version"},
     "arms": {arm: {"name", "description",
                    "metrics": {metric: {"value", "ci95": [low, high], "n", "method",
                                         "description"}},         # description when known
                    "groups": {"qa1/2k": {metric: {...}}},
                    "lengths": {"2k": {metric: {...}}},            # when groups carry lengths
                    "comparisons": {"vs_base": {metric: paired_test(...)}, "vs_window": {...}},
                    "comparisons_by_length": {"vs_base": {"2k": {metric: paired_test(...)}}},
                    "breakdowns": {key: {subset: {metric: {...}}}},   # add_breakdown
                    "comparisons_by": {key: {"vs_base": {subset: {metric: paired_test(...)}}}},
                    "wall_time_s", "train_time_s", "eval_time_s", "trainable_params", "seed",
                    "train_log", "example_ids", "example_groups", "per_example": {metric: [...]},
                    "extra"}},
     "breakdowns": {key: {"description", "sizes": {subset: n}}}}  # add_breakdown

Typical use, in the experiment runner::

    arms = [build_arm_result("base", {"accuracy": acc}, groups, example_ids=ids, eval_time_s=t),
            build_arm_result("latent", ..., train_log="runs/latent/log.jsonl")]
    results = add_comparisons(make_results(experiment_info("babilong", config, seed), arms))
    write_results("runs/exp1", results)              # memllm.evaluation.report
    print(format_table(results))                     # memllm.evaluation.markdown

Values are stored as fractions (0.617); tables show metrics whose values all lie in [0, 1] as
percentages (61.7) and their differences in percentage points. ``NaN`` is written as ``null``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memllm.errors import DataError
from memllm.evaluation.groups import group_sort_key, length_axis, parse_length
from memllm.evaluation.metrics import METRIC_DEFINITIONS, METRIC_KINDS
from memllm.evaluation.stats import ALPHA, Kind, is_binary, paired_test, resolve_kind, summarize

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REFERENCE_ARMS = ("base", "window")
PRIMARY_METRICS = ("accuracy", "f1", "joint_f1", "em", "exact_match", "token_acc", "seq_acc")
"""The first of these that an experiment reports is its primary metric (unless set)."""

ARM_DESCRIPTIONS = {
    "base": "backbone alone, whole input in its context window",
    "window": "backbone alone, sees only the last segment (what fits without memory)",
    "finetuned": "backbone + LoRA trained on the same data, no memory",
    "latent": "gated latent memory (G-MemLLM) read segment by segment",
    "neural": "Titans neural memory (test-time gradient updates) read segment by segment",
    "episodic": "episodic memory: earlier segments' hidden states read by attention with recency",
    "kv_retrieval": "training-free retrieval of earlier segments' keys/values at every attention "
    "layer (InfLLM-style), no trained parameters",
    "no_gate": "no update gate (slots overwritten, G-MemLLM ablation)",
    "no_reg": "no sparsity/entropy regularisers (ablation)",
    "no_carry": "no-carry control: trained and evaluated on the last segment only, so nothing "
    "from earlier segments can reach it",
    "untrained": "untrained (no fine-tuning ablation): the memory starts as the identity, "
    "so this equals window by construction",
}
"""Default descriptions, used when an arm is built without one."""


# --------------------------------------------------------------------------------------------
# Building results
# --------------------------------------------------------------------------------------------


def experiment_info(
    name: str,
    config: Mapping[str, Any] | None = None,
    seed: int | None = None,
    *,
    device: str | None = None,
    notes: Iterable[str] = (),
    primary_metric: str | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """The ``experiment`` block of a results file.

    Args:
        name: experiment name (the report's title).
        config: the run config as a plain dict (stored verbatim).
        seed: the experiment's seed.
        device: where it ran; detected from torch when omitted.
        notes: facts a reader needs, e.g. ``"base: inputs above the window truncated from the
            left, question kept"``.
        primary_metric: the metric plotted and ranked by; the first of
            :data:`PRIMARY_METRICS` present when omitted.
        created: ISO time stamp; now (UTC) when omitted.
    """
    from memllm import __version__

    return {
        "name": str(name),
        "config": dict(config or {}),
        "seed": seed,
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "memllm_version": __version__,
        "device": device or _detect_device(),
        "notes": [str(n) for n in notes],
        "primary_metric": primary_metric,
        "schema_version": SCHEMA_VERSION,
    }


def _detect_device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda ({torch.cuda.get_device_name(0)})"
    except Exception:  # torch missing or a broken driver: the report still gets written
        return "unknown"
    return "cpu"


def build_arm_result(
    name: str,
    per_example: Mapping[str, Sequence[float]],
    groups: Sequence[str | Sequence[str]] | None = None,
    *,
    example_ids: Sequence[Any] | None = None,
    description: str | None = None,
    wall_time_s: float | None = None,
    train_time_s: float | None = None,
    eval_time_s: float | None = None,
    trainable_params: int | None = None,
    seed: int | None = None,
    train_log: str | Path | Sequence[Mapping[str, Any]] | None = None,
    kinds: Mapping[str, Kind] | None = None,
    descriptions: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    bootstrap_seed: int = 0,
) -> dict[str, Any]:
    """One arm's result: every metric overall and per group, with 95 % intervals.

    Args:
        name: arm name (``base``, ``window``, ``latent``, ...).
        per_example: metric name → one value per evaluation example, all the same length.
        groups: one group per example, e.g. ``"qa1/2k"`` (task/length) or ``("qa1", "2k")``.
        example_ids: one id per example; used to pair arms in :func:`add_comparisons`. Defaults
            to the example's position (then arms pair by order).
        description: what the arm is; :data:`ARM_DESCRIPTIONS` has defaults.
        wall_time_s: total wall time of the arm.
        train_time_s: training time (``None`` for arms that do not train).
        eval_time_s: evaluation time.
        trainable_params: number of trained parameters (0 for frozen baselines).
        seed: the arm's seed.
        train_log: the training log (a JSONL path, or its records) for the training plots.
        kinds: metric → ``"binary"`` / ``"continuous"``; otherwise the kind the metric's
            definition gives (:data:`memllm.evaluation.metrics.METRIC_KINDS`), else detected from
            the values.
        descriptions: metric → its definition, stored with its numbers and shown in the
            report; defaults from :data:`memllm.evaluation.metrics.METRIC_DEFINITIONS`.
        extra: anything else worth keeping (JSON-serialisable).
        confidence: interval level.
        n_resamples: bootstrap resamples for continuous metrics.
        bootstrap_seed: bootstrap seed.

    Raises:
        DataError: lengths that disagree, duplicate example ids or non-finite values.
    """
    if not per_example:
        raise DataError(f"arm {name!r}: no metrics")
    values = {}
    n = None
    for metric, vals in per_example.items():
        arr = np.asarray(vals, dtype=np.float64).reshape(-1)
        if n is None:
            n = arr.size
        if arr.size != n:
            raise DataError(
                f"arm {name!r}: metric {metric!r} has {arr.size} values, "
                f"{next(iter(per_example))!r} has {n}"
            )
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise DataError(f"arm {name!r}: metric {metric!r} is {arr[bad]} at example {bad}")
        values[str(metric)] = arr
    assert n is not None
    ids = [str(i) for i in range(n)] if example_ids is None else [str(i) for i in example_ids]
    if len(ids) != n:
        raise DataError(f"arm {name!r}: {len(ids)} example ids for {n} examples")
    if len(set(ids)) != n:
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"arm {name!r}: example id {dup!r} appears more than once")
    group_keys = None
    if groups is not None:
        if len(groups) != n:
            raise DataError(f"arm {name!r}: {len(groups)} groups for {n} examples")
        group_keys = [g if isinstance(g, str) else "/".join(str(p) for p in g) for g in groups]

    kinds = dict(kinds or {})
    unknown = set(kinds) - set(values)
    if unknown:
        raise DataError(f"arm {name!r}: kinds given for unknown metrics {sorted(unknown)}")
    stat_args = {"confidence": confidence, "n_resamples": n_resamples, "seed": bootstrap_seed}
    metrics: dict[str, Any] = {}
    resolved: dict[str, str] = {}
    for metric, arr in values.items():
        resolved[metric] = resolve_kind(kinds.get(metric) or _defined_kind(metric, arr), arr)
        metrics[metric] = summarize(arr, resolved[metric], **stat_args)
        text = (descriptions or {}).get(metric) or METRIC_DEFINITIONS.get(metric)
        if text:
            metrics[metric]["description"] = str(text)

    group_results: dict[str, Any] = {}
    if group_keys is not None:
        members: dict[str, list[int]] = {}
        for i, key in enumerate(group_keys):
            members.setdefault(key, []).append(i)
        for key in sorted(members, key=group_sort_key):
            idx = np.asarray(members[key])
            group_results[key] = {
                metric: summarize(arr[idx], resolved[metric], **stat_args)
                for metric, arr in values.items()
            }

    if train_log is not None and not isinstance(train_log, (str, Path)):
        train_log = [dict(r) for r in train_log]
    elif train_log is not None:
        train_log = str(train_log)
    arm = {
        "name": str(name),
        "description": description if description is not None else ARM_DESCRIPTIONS.get(name, ""),
        "metrics": metrics,
        "groups": group_results,
        "comparisons": {},
        "wall_time_s": wall_time_s,
        "train_time_s": train_time_s,
        "eval_time_s": eval_time_s,
        "trainable_params": trainable_params,
        "seed": seed,
        "train_log": train_log,
        "example_ids": ids,
        "example_groups": group_keys,
        "per_example": {m: arr.tolist() for m, arr in values.items()},
        "extra": dict(extra or {}),
    }
    arm["lengths"] = length_summaries(arm, **stat_args)
    return arm


def _defined_kind(metric: str, values: np.ndarray) -> Kind:
    """The kind a metric's definition gives; a mean of fractions stays continuous even when
    every value happens to be 0 or 1 (one-token answers), so its interval does not change
    method from arm to arm. A name reused for non-0/1 values falls back to detection."""
    kind = METRIC_KINDS.get(metric, "auto")
    if kind == "binary" and not is_binary(values):
        return "auto"
    return kind  # type: ignore[return-value]


def make_results(experiment: Mapping[str, Any], arms: Iterable[Mapping[str, Any]]) -> dict:
    """``{"experiment": ..., "arms": {name: arm}}`` from arm results, in the given order."""
    out: dict[str, Any] = {"experiment": dict(experiment), "arms": {}}
    for arm in arms:
        if arm["name"] in out["arms"]:
            raise DataError(f"arm {arm['name']!r} given twice")
        out["arms"][arm["name"]] = dict(arm)
    return out


def _alignment(arm: Mapping[str, Any], ref: Mapping[str, Any]) -> np.ndarray:
    """Index into ``ref``'s examples for each of ``arm``'s examples; a clear error otherwise."""
    ids, ref_ids = list(arm["example_ids"]), list(ref["example_ids"])
    if ids == ref_ids:
        return np.arange(len(ids))
    only_arm = [i for i in ids if i not in set(ref_ids)]
    only_ref = [i for i in ref_ids if i not in set(ids)]
    if only_arm or only_ref:
        raise DataError(
            f"arms {arm['name']!r} and {ref['name']!r} were not evaluated on the same examples: "
            f"{len(only_arm)} ids only in {arm['name']!r} {only_arm[:3]}, "
            f"{len(only_ref)} only in {ref['name']!r} {only_ref[:3]}"
        )
    position = {eid: k for k, eid in enumerate(ref_ids)}
    return np.asarray([position[i] for i in ids])


def _references_of(name: str, present: Sequence[str]) -> Sequence[str]:
    """The reference arms ``name`` is compared with: a reference only with those before it."""
    return present[: present.index(name)] if name in present else present


def _summary_kind(arm: Mapping[str, Any], metric: str) -> Kind:
    """The kind an arm's metric was summarised as (its interval method says)."""
    return "binary" if arm["metrics"][metric].get("method") == "wilson" else "continuous"


def _paired_values(arm: Mapping[str, Any], ref: Mapping[str, Any]):
    """``(metric, arm values, ref values aligned by example id, kind)`` for shared metrics."""
    order = _alignment(arm, ref)
    for metric, vals in arm["per_example"].items():
        if metric not in ref["per_example"]:
            continue
        kinds = {_summary_kind(arm, metric), _summary_kind(ref, metric)}
        yield (
            metric,
            np.asarray(vals, dtype=np.float64),
            np.asarray(ref["per_example"][metric], dtype=np.float64)[order],
            "binary" if kinds == {"binary"} else "continuous",
        )


def add_breakdown(
    results: dict[str, Any],
    key: str,
    labels: Mapping[Any, str],
    description: str,
    reference_arms: Sequence[str] = REFERENCE_ARMS,
    *,
    order: Sequence[str] = (),
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Every arm's metrics on subsets of the examples, with paired tests per subset.

    ``labels`` maps example id → subset name (e.g. whether a question's supporting facts lie in
    the window); examples without a label are left out. Subsets appear in ``order``, then any
    others in first-seen order. Each arm gets
    ``arm["breakdowns"][key][subset][metric]`` (summaries, each metric's own method) and
    ``arm["comparisons_by"][key]["vs_" + ref][subset][metric]`` (paired tests against the
    reference arms, as :func:`add_comparisons`); ``results["breakdowns"][key]`` holds the
    description and each subset's size. Returns ``results``, changed in place.
    """
    labels = {str(k): v for k, v in labels.items()}
    subsets = list(dict.fromkeys([*order, *labels.values()]))
    arms = results["arms"]
    present = [r for r in reference_arms if r in arms]
    stat_args = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    sizes: dict[str, int] = {}
    for name, arm in arms.items():
        of = np.asarray([labels.get(str(i), "") for i in arm["example_ids"]])
        sizes = {sub: int((of == sub).sum()) for sub in subsets}
        arm.setdefault("breakdowns", {})[key] = {
            sub: {
                metric: summarize(
                    np.asarray(vals, dtype=np.float64)[of == sub],
                    _summary_kind(arm, metric),
                    **stat_args,
                )
                for metric, vals in arm["per_example"].items()
            }
            for sub in subsets
            if sizes[sub]
        }
        tests: dict[str, Any] = {}
        for ref_name in _references_of(name, present):
            per: dict[str, Any] = {}
            for metric, a, b, kind in _paired_values(arm, arms[ref_name]):
                for sub in subsets:
                    mask = of == sub
                    if mask.any():
                        per.setdefault(sub, {})[metric] = paired_test(
                            a[mask], b[mask], kind, **stat_args, alpha=alpha
                        )
            tests[f"vs_{ref_name}"] = per
        arm.setdefault("comparisons_by", {})[key] = tests
    results.setdefault("breakdowns", {})[key] = {"description": description, "sizes": sizes}
    return results


def add_comparisons(
    results: dict[str, Any],
    reference_arms: Sequence[str] = REFERENCE_ARMS,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Paired tests of every arm against each reference arm, on the same examples.

    Examples are matched by id (order may differ). For each arm ``a`` and reference ``r``
    present in ``results``, ``a["comparisons"]["vs_" + r][metric]`` is
    :func:`memllm.evaluation.stats.paired_test` of ``a`` minus ``r``. A reference arm is compared
    only with the references listed before it (``window`` vs ``base``, not also ``base`` vs
    ``window``). Binary metrics use the exact McNemar test, continuous ones a sign-flip
    permutation test; the difference's interval is a paired bootstrap. When the examples carry
    input lengths, the same tests per length go to
    ``a["comparisons_by_length"]["vs_" + r][length][metric]``.

    Returns:
        ``results``, changed in place.

    Raises:
        DataError: two arms that do not share exactly the same example ids.
    """
    arms = results["arms"]
    present = [r for r in reference_arms if r in arms]
    if len(present) < len(reference_arms):
        missing = [r for r in reference_arms if r not in arms]
        logger.info("no reference arm %s in these results; not compared", missing)
    test_args = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed, "alpha": alpha}
    for name, arm in arms.items():
        arm["comparisons"] = {}
        arm["comparisons_by_length"] = {}
        length_index = length_axis(sorted(set(arm.get("example_groups") or [])))
        for ref_name in _references_of(name, present):
            ref = arms[ref_name]
            tests, by_length = {}, {}
            for metric, a, b, kind in _paired_values(arm, ref):
                tests[metric] = paired_test(a, b, kind, **test_args)
                if length_index is None:
                    continue
                lengths = np.asarray([g.split("/")[length_index] for g in arm["example_groups"]])
                for length in sorted(set(lengths), key=lambda x: parse_length(x) or 0.0):
                    mask = lengths == length
                    by_length.setdefault(length, {})[metric] = paired_test(
                        a[mask], b[mask], kind, **test_args
                    )
            arm["comparisons"][f"vs_{ref_name}"] = tests
            if by_length:
                arm["comparisons_by_length"][f"vs_{ref_name}"] = by_length
    return results


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """NaN/inf → None, numpy scalars and arrays → Python, paths → str."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_results(path: str | Path) -> dict[str, Any]:
    """Read ``results.json`` (or the folder holding it); ``null`` numbers stay ``None``.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a memllm results file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("arms"), dict):
        raise DataError(f"{path}: not a memllm results file (no 'arms' mapping)")
    if not isinstance(data.get("experiment"), dict):
        raise DataError(f"{path}: not a memllm results file (no 'experiment' mapping)")
    for name, arm in data["arms"].items():
        if not isinstance(arm, dict) or not isinstance(arm.get("metrics"), dict):
            raise DataError(f"{path}: arm {name!r} has no 'metrics' mapping")
    return data


def write_results_json(output_dir: str | Path, results: Mapping[str, Any]) -> tuple[Path, dict]:
    """Write ``output_dir/results.json`` (folder created if needed).

    Returns:
        The file's path and the results as written (NaN → ``None``, numpy → Python), which is
        what the report and the plots are drawn from.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    clean = to_jsonable(results)
    json_path.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
    return json_path, clean


# --------------------------------------------------------------------------------------------
# Pooling by input length
# --------------------------------------------------------------------------------------------


def length_summaries(
    arm: Mapping[str, Any], confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Each metric pooled over the examples of each input length (all tasks together).

    Empty when the arm's groups have no length component. Uses each metric's own method.
    """
    keys = arm.get("example_groups")
    index = length_axis(sorted(set(keys))) if keys else None
    if index is None:
        return {}
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key.split("/")[index], []).append(i)
    out = {}
    for length in sorted(members, key=lambda x: parse_length(x) or 0.0):
        idx = np.asarray(members[length])
        out[length] = {}
        for metric, vals in arm["per_example"].items():
            out[length][metric] = summarize(
                np.asarray(vals, dtype=np.float64)[idx],
                _summary_kind(arm, metric),
                confidence=confidence,
                n_resamples=n_resamples,
                seed=seed,
            )
    return out


# --------------------------------------------------------------------------------------------
# Reading results: which metrics, shown how
# --------------------------------------------------------------------------------------------


def is_missing(x: Any) -> bool:
    """A number that is absent: ``None`` (``null`` in the file) or not finite."""
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def metric_names(results: Mapping[str, Any]) -> list[str]:
    """Every metric of every arm, in first-seen order."""
    names: list[str] = []
    for arm in results["arms"].values():
        names += [m for m in arm["metrics"] if m not in names]
    return names


def headline_metrics(results: Mapping[str, Any]) -> list[str]:
    """The metrics of the tables and plots that show every arm at a glance: all but the
    precision and recall behind a reported F1 (HotpotQA's ``prec``/``recall``,
    ``sp_prec``/``sp_recall``, ...), which get a table of their own."""
    names = metric_names(results)
    return [m for m in names if not _behind_f1(m, names)]


def _behind_f1(metric: str, names: Sequence[str]) -> bool:
    for part in ("prec", "recall"):
        if metric == part or metric.endswith(f"_{part}"):
            return metric.removesuffix(part) + "f1" in names
    return False


def primary_metric(results: Mapping[str, Any]) -> str | None:
    """The experiment's ``primary_metric``, else the first of :data:`PRIMARY_METRICS` present."""
    names = metric_names(results)
    chosen = results.get("experiment", {}).get("primary_metric")
    if chosen in names:
        return chosen
    return next((m for m in PRIMARY_METRICS if m in names), names[0] if names else None)


def percent_metrics(results: Mapping[str, Any]) -> set[str]:
    """Metrics shown as percentages: every value and interval end of every arm in [0, 1]."""
    out = set()
    for metric in metric_names(results):
        numbers = []
        for arm in results["arms"].values():
            s = arm["metrics"].get(metric)
            if s:
                numbers += [x for x in [s["value"], *s["ci95"]] if not is_missing(x)]
        if numbers and all(0.0 <= x <= 1.0 for x in numbers):
            out.add(metric)
    return out


def metric_header(metric: str, pct: set[str]) -> str:
    """A metric's column or axis label: ``"accuracy (%)"`` when shown as a percentage."""
    return f"{metric} (%)" if metric in pct else metric


def metric_definitions(results: Mapping[str, Any]) -> dict[str, str]:
    """Metric → its definition, from the first arm that states one."""
    out: dict[str, str] = {}
    for arm in results["arms"].values():
        for metric, summary in arm["metrics"].items():
            if summary.get("description") and metric not in out:
                out[metric] = summary["description"]
    return out
