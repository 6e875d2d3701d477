"""The Markdown report (``results.md``) and the console tables of an experiment's results.

:func:`render_markdown` turns results (:mod:`memllm.evaluation.results`) into the report's
tables, notes and embedded plots; :func:`format_table` prints the main tables on a console.
Percent metrics are shown in percent and their differences in percentage points; a missing
number is shown as ``–``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from memllm.evaluation.groups import group_sort_key, parse_length
from memllm.evaluation.results import (
    ARM_DESCRIPTIONS,
    headline_metrics,
    is_missing,
    metric_definitions,
    metric_header,
    metric_names,
    percent_metrics,
    primary_metric,
)
from memllm.evaluation.stats import ALPHA


def _fmt_num(x: Any, pct: bool) -> str:
    if is_missing(x):
        return "–"
    if pct:
        return f"{100 * x:.1f}"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def _fmt_summary(s: Mapping[str, Any] | None, pct: bool) -> str:
    if not s or is_missing(s.get("value")):
        return "–"
    low, high = s["ci95"]
    return f"{_fmt_num(s['value'], pct)} [{_fmt_num(low, pct)}, {_fmt_num(high, pct)}]"


def _fmt_diff(x: Any, pct: bool) -> str:
    if is_missing(x):
        return "–"
    text = _fmt_num(x, pct)
    return text if text.startswith("-") else f"+{text}"


def _fmt_delta_cell(t: Mapping[str, Any] | None, pct: bool) -> str:
    if not t:
        return "–"
    low, high = t["ci95"]
    mark = "✓" if t["significant"] else "✗"
    return f"{_fmt_diff(t['diff'], pct)} [{_fmt_num(low, pct)}, {_fmt_num(high, pct)}] {mark}"


def _fmt_p(p: Any) -> str:
    if is_missing(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_count(n: Any) -> str:
    if is_missing(n):
        return "–"
    n = int(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit} ({n:,})"
    return f"{n:,}"


def _fmt_seconds(s: Any) -> str:
    if is_missing(s):
        return "–"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _md_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None
) -> str:
    """A Markdown table; ``align`` has one letter per column (l, r, c), default ``lrrr...``."""

    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    letters = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    align = [marks[c] for c in letters]
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _comparison_rows(results: Mapping[str, Any], pct: set[str]) -> list[list[str]]:
    rows = []
    shown = set(headline_metrics(results))  # precision/recall comparisons stay in results.json
    for name, arm in results["arms"].items():
        for ref_key, tests in arm.get("comparisons", {}).items():
            for metric, t in tests.items():
                if metric not in shown:
                    continue
                low, high = t["ci95"]
                rows.append(
                    [
                        name,
                        ref_key.removeprefix("vs_"),
                        metric,
                        _fmt_diff(t["diff"], metric in pct),
                        f"[{_fmt_num(low, metric in pct)}, {_fmt_num(high, metric in pct)}]",
                        _fmt_p(t["p_value"]),
                        t["test"],
                        "✓" if t["significant"] else "✗",
                    ]
                )
    return rows


_HOW_TO_READ = """\
Each cell is **value [95 % confidence interval]** over the evaluation examples; *n* is their
number. Metrics whose values are fractions (accuracy, exact match, F1) are shown in percent.
Accuracies and other 0/1 metrics use the Wilson score interval; continuous metrics (F1, token
accuracy) a percentile bootstrap of the mean. Every arm ran on the **same examples**, so arms are
compared **paired**, example by example, against the reference arms (`base`: the backbone with
the whole input in its window; `window`: the backbone seeing only the last segment; and any arm
the config lists in `compare_with`, such as a no-carry control): Δ is the arm
minus the reference (percentage points for percent metrics) with the paired-bootstrap 95 %
interval of the mean difference; p is two-sided, from the exact McNemar test on the examples where
the two arms disagree (0/1 metrics) or a sign-flip permutation test on the per-example differences
(continuous metrics). ✓ means p < {alpha}: a difference this large would be unlikely if the two
arms were equally good. There is no correction for the number of comparisons; with many arms and
metrics, expect about one in twenty ✓ by chance when nothing differs. Overlapping intervals of two
arms do not by themselves mean "no difference": use the paired comparison."""


def _subset_tables(arms, metric, pct, columns, summaries, tests, what) -> list[str]:
    """The metric per subset (``columns``: subset → header) for every arm, then the paired Δ
    against each reference per subset; ``summaries(arm)`` / ``tests(arm)`` read an arm's."""
    rows = [
        [name] + [_fmt_summary(summaries(arm).get(c, {}).get(metric), pct) for c in columns]
        for name, arm in arms.items()
    ]
    out = [_md_table(["arm", *columns.values()], rows), ""]
    rows = []
    for name, arm in arms.items():
        for ref_key, per in tests(arm).items():
            cells = [_fmt_delta_cell(per.get(c, {}).get(metric), pct) for c in columns]
            rows.append([name, ref_key.removeprefix("vs_"), *cells])
    if rows:
        out += [
            f"**Δ {metric} by {what}** (paired, same examples; ✓ p < {ALPHA})",
            "",
            _md_table(["arm", "vs", *columns], rows, align="ll" + "r" * len(columns)),
            "",
        ]
    return out


def render_markdown(
    results: Mapping[str, Any], figures: Sequence[tuple[str, str, str]] = ()
) -> str:
    """The Markdown report: tables, notes and ``figures`` (title, relative path, caption)."""
    exp = results.get("experiment", {})
    arms = results["arms"]
    metrics = metric_names(results)
    pct = percent_metrics(results)
    primary = primary_metric(results)
    out = [f"# Results: {exp.get('name', 'experiment')}", ""]
    facts = [
        f"created {exp.get('created', '–')}",
        f"memllm {exp.get('memllm_version', '–')}",
        f"device {exp.get('device', '–')}",
        f"seed {exp.get('seed', '–')}",
    ]
    if primary:
        facts.append(f"primary metric **{primary}**")
    if not is_missing(exp.get("chance")):
        facts.append(f"chance {_fmt_num(exp['chance'], True)} %")
    out += [" · ".join(facts), ""]
    out += carry_section(results)
    out += selection_section(results)
    out += ["## How to read this report", ""]
    out += [_HOW_TO_READ.format(alpha=ALPHA), ""]

    out += ["## Arms", ""]
    chosen = (results.get("selection") or {}).get("chosen")
    for name, arm in arms.items():
        desc = arm.get("description") or ARM_DESCRIPTIONS.get(name, "")
        mark = " (chosen on validation)" if name == chosen else ""
        out.append(f"- **{name}**{mark}" + (f": {desc}" if desc else ""))
    out.append("")

    definitions = metric_definitions(results)
    if metrics:
        out += ["## Metrics", ""]
        rows = [[f"`{m}`", definitions.get(m, "–"), _interval_name(results, m)] for m in metrics]
        out += [_md_table(["metric", "definition", "95 % interval"], rows, align="lll"), ""]
        if not is_missing(exp.get("chance")):
            out += [
                f"Chance (a uniform guess from the task's closed answer set): "
                f"{_fmt_num(exp['chance'], True)} %.",
                "",
            ]

    out += ["## Main results", ""]
    shown = headline_metrics(results)
    details = [m for m in metrics if m not in shown]
    for columns in (shown, details):
        if not columns:
            continue
        if columns is details:
            out += ["**Precision and recall** behind the F1 columns", ""]
        rows = _arm_rows(results, columns, pct)
        out += [_md_table(["arm", "n", *(metric_header(m, pct) for m in columns)], rows), ""]

    comparison_rows = _comparison_rows(results, pct)
    if comparison_rows:
        out += ["## Paired comparisons", ""]
        headers = ["arm", "vs", "metric", "Δ", "95% CI of Δ", "p", "test", f"p < {ALPHA}"]
        out += [_md_table(headers, comparison_rows, align="lllrrrlc"), ""]

    by_length = {name: arm.get("lengths") or {} for name, arm in arms.items()}
    lengths = sorted(
        {length for summary in by_length.values() for length in summary},
        key=lambda x: parse_length(x) or 0.0,
    )
    if primary and len(lengths) > 1:
        out += [f"## {primary} by input length (all tasks pooled)", ""]
        out += _subset_tables(
            arms,
            primary,
            primary in pct,
            {le: le for le in lengths},
            lambda arm: arm.get("lengths") or {},
            lambda arm: arm.get("comparisons_by_length") or {},
            "input length",
        )
    for key, info in (results.get("breakdowns") or {}).items():
        if not primary:
            break
        out += [f"## {primary} by {key}", "", info.get("description", ""), ""]
        out += _subset_tables(
            arms,
            primary,
            primary in pct,
            {sub: f"{sub} (n={n})" for sub, n in info.get("sizes", {}).items() if n},
            lambda arm, key=key: (arm.get("breakdowns") or {}).get(key, {}),
            lambda arm, key=key: (arm.get("comparisons_by") or {}).get(key, {}),
            key,
        )

    group_keys = sorted(
        {g for arm in arms.values() for g in arm.get("groups", {})}, key=group_sort_key
    )
    if len(group_keys) > 1:
        out += ["## Per group", ""]
        first = next(iter(arms.values()))
        for metric in shown:
            out += [f"**{metric_header(metric, pct)}**", ""]
            rows = []
            for key in group_keys:
                n = first.get("groups", {}).get(key, {}).get(metric, {}).get("n", "–")
                cells = [
                    _fmt_summary(arm.get("groups", {}).get(key, {}).get(metric), metric in pct)
                    for arm in arms.values()
                ]
                rows.append([key, str(n), *cells])
            out += [_md_table(["group", "n", *arms], rows), ""]

    out += ["## Cost", ""]
    rows = [
        [
            name,
            _fmt_count(arm.get("trainable_params")),
            _fmt_seconds(arm.get("train_time_s")),
            _fmt_seconds(arm.get("eval_time_s")),
            _fmt_seconds(arm.get("wall_time_s")),
            "–" if arm.get("seed") is None else str(arm["seed"]),
        ]
        for name, arm in arms.items()
    ]
    headers = ["arm", "trainable params", "train time", "eval time", "wall time", "seed"]
    out += [_md_table(headers, rows), ""]

    notes = exp.get("notes") or []
    if notes:
        out += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]

    if figures:
        out += ["## Plots", ""]
        for title, path, caption in figures:
            out += [f"### {title}", "", f"![{title}]({path})", ""]
            if caption:
                out += [caption, ""]

    if exp.get("config"):
        out += ["## Config", "", "<details><summary>run config</summary>", "", "```json"]
        out += [json.dumps(exp["config"], indent=2, default=str), "```", "", "</details>", ""]
    return "\n".join(out)


def _strongest_cells(r: Mapping[str, Any]) -> list[str]:
    """The "strongest no-carry control" and "Δ vs it, p" cells of a carry row."""
    if "strongest_control" not in r:  # results written before the strongest control
        return ["–", "–"]
    name, t = r["strongest_control"], r.get("strongest_test")
    mark = "✔" if r.get("carries_over_strongest") else "✗"
    if name == r["control"] or not t:
        return [f"{name} (its own)", f"as its own {mark}"]
    delta = _fmt_delta_cell(t, True).rsplit(" ", 1)[0]
    return [
        f"{name} {_fmt_summary(r.get('strongest_summary'), True)}",
        f"{delta}, p {_fmt_p(t['p_value'])} {mark}",
    ]


def carry_section(results: Mapping[str, Any]) -> list[str]:
    """The "Does the memory carry?" table (``results["carry"]``,
    :mod:`memllm.evaluation.carry`) as report lines; none when no arm has a control.

    Results written before the strongest no-carry control existed render without its columns.
    """
    info = results.get("carry") or {}
    chosen = (results.get("selection") or {}).get("chosen")
    strongest = any("strongest_control" in r for r in info.get("rows", []))
    rows = []
    for r in info.get("rows", []):
        t = r.get("test")
        rows.append(
            [
                f"{r['arm']} (chosen)" if r["arm"] == chosen else r["arm"],
                r["control"],
                r["metric"],
                str(r["n"]),
                _fmt_summary(r["arm_summary"], True),
                _fmt_summary(r["control_summary"], True),
                _fmt_delta_cell(t, True).rsplit(" ", 1)[0] if t else "–",
                _fmt_p(t["p_value"]) if t else "–",
                "✔" if r["carries"] else "✗",
                *(_strongest_cells(r) if strongest else []),
            ]
        )
    if not rows:
        return []
    alpha = info.get("alpha", 0.01)
    subset = info.get("subset", "all")
    where = (
        "the questions whose facts lie before the last segment (`facts earlier`)"
        if subset != "all"
        else "all questions (this task does not say where its facts are)"
    )
    chance = results.get("experiment", {}).get("chance")
    chance_text = "" if is_missing(chance) else f" Chance is {_fmt_num(chance, True)} %."
    headers = [
        "arm",
        "control",
        "metric",
        "n",
        "arm (%)",
        "control (%)",
        "Δ [95% CI]",
        "p",
        "carries",
    ]
    align = "lllrrrrrc"
    strongest_text = ""
    if strongest:
        headers += ["strongest no-carry control", "Δ vs it, p"]
        align += "lr"
        strongest_text = (
            " An own control that cannot learn the answer's format (the episodic memory reads "
            "nothing when nothing is stored, so its control is `window`) is a weak bar; no "
            "control can carry a fact, so the strongest no-carry control in the experiment "
            "(highest on the same questions; `window` or any `carry: false` arm) is the "
            "format-only bar: the last two columns test each arm against it, ✔ when it beats "
            f"it too with p < {alpha}."
        )
    return [
        "## Does the memory carry?",
        "",
        f"Each memory arm against its own no-carry control (the same memory trained and "
        f"evaluated on the last segment only; `window` for a memory that trains nothing), on "
        f"{where}: accuracy [95 % Wilson interval], the paired difference in points with its "
        f"bootstrap interval, and the exact McNemar p. ✔: the arm beats its control with "
        f"p < {alpha}; only then did the memory carry something from earlier segments."
        + strongest_text
        + chance_text,
        "",
        _md_table(headers, rows, align=align),
        "",
    ]


def selection_section(results: Mapping[str, Any]) -> list[str]:
    """The "Chosen on validation" section (``results["selection"]``,
    :mod:`memllm.evaluation.selection`) as report lines; none without a selection."""
    info = results.get("selection")
    if not info:
        return []
    metric = info.get("metric") or "score"
    scores = info.get("scores") or {}
    chosen, keep = info.get("chosen"), set(info.get("keep") or [])
    rows = []
    for name in info.get("among", []):
        s = scores.get(name)
        role = "chosen" if name == chosen else ("kept" if name in keep else "")
        tested = "yes" if name in (info.get("tested") or []) else "no"
        rows.append(
            [
                name,
                str(s["n"]) if s else "–",
                _fmt_summary(s, True) if s else "not validated yet",
                role or "–",
                tested,
            ]
        )
    subset = info.get("subset", "all")
    where = "every validation question" if subset == "all" else f"the `{subset}` questions"
    if info.get("max_examples"):
        where += f" (the first {info['max_examples']} of each group)"
    if chosen:
        verdict = (
            f"Chosen: **{chosen}**, the highest validation {metric} (ties go to the earlier "
            f"candidate). The test split was run once, on the chosen arm"
            + (f" and on the `keep` arms ({', '.join(sorted(keep))})" if keep - {chosen} else "")
            + "; the other candidates and their no-carry controls were not tested."
        )
    else:
        waiting = ", ".join(f"`{n}`" for n in info.get("among", []) if n not in scores)
        verdict = (
            f"No arm chosen yet: {waiting} not validated (run with `--arms`); until then only "
            "the `keep` arms are tested."
        )
    method = (
        "Wilson interval"
        if _all_wilson(scores)
        else "interval: Wilson for 0/1 values, bootstrap otherwise"
    )
    return [
        "## Chosen on validation",
        "",
        f"Each candidate memory arm trained as its test arm would be, then scored on the "
        f"task's **validation** split, on {where}: {metric} [95 % {method}]. {verdict}",
        "",
        _md_table(
            ["candidate", "n", f"validation {metric} (%)", "choice", "tested"],
            rows,
            align="lrrll",
        ),
        "",
    ]


def _all_wilson(scores: Mapping[str, Any]) -> bool:
    return all(s.get("method") == "wilson" for s in scores.values())


def _arm_rows(results: Mapping[str, Any], metrics: Sequence[str], pct: set[str]) -> list[list]:
    """One row per arm: name, the n of these metrics, and each metric's value [interval]."""
    rows = []
    for name, arm in results["arms"].items():
        ns = sorted({arm["metrics"][m]["n"] for m in metrics if m in arm["metrics"]})
        rows.append(
            [name, "/".join(map(str, ns))]
            + [_fmt_summary(arm["metrics"].get(m), m in pct) for m in metrics]
        )
    return rows


def _interval_name(results: Mapping[str, Any], metric: str) -> str:
    methods = {
        arm["metrics"][metric].get("method")
        for arm in results["arms"].values()
        if metric in arm["metrics"]
    }
    names = {"wilson": "Wilson (0/1 values)", "bootstrap": "bootstrap of the mean"}
    return ", ".join(names.get(m, str(m)) for m in sorted(methods, key=str)) or "–"


def format_table(results: Mapping[str, Any]) -> str:
    """Plain-text tables for the console: metrics per arm (the precision and recall behind an
    F1 in a second table), then the paired comparisons, then the definition of each metric that
    states one."""
    metrics = headline_metrics(results)
    pct = percent_metrics(results)
    params = [arm.get("trainable_params") for arm in results["arms"].values()]
    trainable = ["–" if is_missing(p) else _fmt_count(p).split(" (")[0] for p in params]
    rows = [
        [*row, count]
        for row, count in zip(_arm_rows(results, metrics, pct), trainable, strict=True)
    ]
    header = ["arm", "n", *(metric_header(m, pct) for m in metrics)]
    text = _align_columns([[*header, "trainable"], *rows])
    details = [m for m in metric_names(results) if m not in metrics]
    if details:
        header = ["arm", "n", *(metric_header(m, pct) for m in details)]
        text += "\n\n" + _align_columns([header, *_arm_rows(results, details, pct)])
    comparison_rows = _comparison_rows(results, pct)
    if comparison_rows:
        header = ["arm", "vs", "metric", "Δ", "95% CI", "p", "test", "sig"]
        text += "\n\n" + _align_columns([header, *comparison_rows])
    definitions = metric_definitions(results)
    if definitions:
        text += "\n\n" + "\n".join(f"{m}: {d}" for m, d in definitions.items())
    choice = chosen_line(results)
    if choice:
        text += "\n\n" + choice
    return text


def chosen_line(results: Mapping[str, Any]) -> str | None:
    """One line saying which arm was chosen on validation, with its score; None without a
    selection."""
    info = results.get("selection")
    if not info:
        return None
    chosen = info.get("chosen")
    if not chosen:
        waiting = [n for n in info.get("among", []) if n not in (info.get("scores") or {})]
        return f"chosen on validation: none yet (no validation score for {', '.join(waiting)})"
    s = info["scores"][chosen]
    others = ", ".join(
        f"{n} {_fmt_num(info['scores'][n]['value'], True)}"
        for n in info.get("among", [])
        if n != chosen and n in info["scores"]
    )
    return (
        f"chosen on validation: {chosen} ({info.get('metric')} {_fmt_summary(s, True)} %, "
        f"n={s['n']}, {info.get('subset')}" + (f"; others: {others}" if others else "") + ")"
    )


def _align_columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            str(c).ljust(w) if i == 0 or k == 0 or not _numeric_cell(c) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric_cell(cell: str) -> bool:
    return str(cell) == "–" or bool(re.match(r"^[+\-<]?\d", str(cell)))
