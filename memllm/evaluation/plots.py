"""The report's plots, and the training logs they read.

Matplotlib's object API with the Agg canvas: no pyplot, no global backend change. Each plot is
drawn only when its data is present; :func:`draw_plots` is called by
:func:`memllm.evaluation.report.write_results`. The training-log readers
(:func:`read_train_log`, :func:`log_series`) are public for other tools.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memllm.errors import DataError
from memllm.evaluation.groups import group_sort_key, natural_key, parse_length, task_length
from memllm.evaluation.results import (
    headline_metrics,
    is_missing,
    metric_header,
    percent_metrics,
    primary_metric,
)

logger = logging.getLogger(__name__)

_LOG_AXIS_KEYS = (
    "step",
    "global_step",
    "epoch",
    "time",
    "time_s",
    "elapsed",
    "elapsed_s",
    "wall_time",
    "kind",
)
_EVAL_KINDS = ("eval", "val", "validation")
_REFERENCE_COLOURS = {"base": "#3a3a3a", "window": "#9a9a9a"}


def _arm_colours(names: Sequence[str]) -> dict[str, Any]:
    """Grey for the reference arms, the tab10 colours (minus grey) for the others."""
    from matplotlib import colormaps

    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    out, k = {}, 0
    for name in names:
        if name in _REFERENCE_COLOURS:
            out[name] = _REFERENCE_COLOURS[name]
        else:
            out[name] = palette[k % len(palette)]
            k += 1
    return out


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "arm"


def draw_plots(results: Mapping[str, Any], output_dir: str | Path) -> list[tuple[str, str, str]]:
    """Every plot whose data is present, as PNGs under ``output_dir/plots``.

    Returns:
        ``(title, path relative to output_dir, caption)`` per plot written.
    """
    out = Path(output_dir)
    logs = {name: _arm_log(arm, out) for name, arm in results["arms"].items()}
    figures: list[tuple[str, str, str]] = []
    plotters = (
        _plot_metrics,
        _plot_heatmap,
        _plot_by_length,
        _plot_breakdowns,
        _plot_training,
        _plot_memory,
    )
    for draw in plotters:
        try:
            figures += draw(results, out, logs)
        except Exception:  # one broken plot must not lose the report
            logger.warning(
                "plot %s failed; the report is written without it", draw.__name__[6:], exc_info=True
            )
    return figures


def _plot_breakdowns(
    results: Mapping[str, Any], out: Path, logs: Mapping[str, list]
) -> list[tuple[str, str, str]]:
    """The primary metric per subset of each breakdown: one group of bars per subset, one bar
    per arm, 95 % intervals."""
    primary = primary_metric(results)
    arms = list(results["arms"])
    figures = []
    for number, (key, info) in enumerate((results.get("breakdowns") or {}).items()):
        subsets = [sub for sub, n in info.get("sizes", {}).items() if n]
        if not primary or not subsets:
            continue
        scale = 100.0 if primary in percent_metrics(results) else 1.0
        colours = _arm_colours(arms)
        fig = _figure(max(5.0, 0.5 * len(arms) * len(subsets) + 2.0), 3.8)
        ax = fig.subplots()
        width = 0.8 / len(arms)
        for k, name in enumerate(arms):
            by = (results["arms"][name].get("breakdowns") or {}).get(key, {})
            stats = [by.get(sub, {}).get(primary) or {} for sub in subsets]
            values = np.asarray([st.get("value", np.nan) for st in stats], float)
            ci = np.asarray([st.get("ci95", (np.nan, np.nan)) for st in stats], float)
            x = np.arange(len(subsets)) + (k - (len(arms) - 1) / 2) * width
            ax.bar(x, values * scale, width, color=colours[name], label=name)
            errors = np.abs(ci.T - values) * scale
            ax.errorbar(x, values * scale, yerr=errors, fmt="none", ecolor="black", capsize=3)
        sizes = info["sizes"]
        ax.set_xticks(np.arange(len(subsets)), [f"{sub} (n={sizes[sub]})" for sub in subsets])
        ax.set_ylabel(metric_header(primary, percent_metrics(results)))
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        fig.suptitle(f"{primary} by {key} (error bars: 95% CI)")
        rel = f"plots/breakdown_{number}.png"
        _save(fig, out / rel)
        figures.append((f"{primary} by {key}", rel, info.get("description", "")))
    return figures


def _plot_metrics(
    results: Mapping[str, Any], out: Path, logs: Mapping[str, list]
) -> list[tuple[str, str, str]]:
    """(e) Bars per arm with 95 % intervals, one panel per metric (primary first)."""
    arms = list(results["arms"])
    metrics = headline_metrics(results)
    primary = primary_metric(results)
    if not arms or not metrics:
        return []
    metrics = [primary] + [m for m in metrics if m != primary]
    pct = percent_metrics(results)
    colours = _arm_colours(arms)
    fig = _figure(max(4.0, 0.55 * len(arms) + 1.6) * len(metrics), 3.8)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        scale = 100.0 if metric in pct else 1.0
        names, values, lows, highs = [], [], [], []
        for name in arms:
            s = results["arms"][name]["metrics"].get(metric)
            if not s or is_missing(s["value"]):
                continue
            names.append(name)
            values.append(s["value"] * scale)
            low, high = (np.nan if is_missing(x) else x * scale for x in s["ci95"])
            lows.append(values[-1] - low)
            highs.append(high - values[-1])
        x = np.arange(len(names))
        ax.bar(x, values, color=[colours[n] for n in names], width=0.7)
        ax.errorbar(x, values, yerr=[lows, highs], fmt="none", ecolor="black", capsize=4, lw=1)
        for xi, v, h in zip(x, values, highs, strict=True):
            ax.annotate(
                f"{v:.1f}" if scale == 100 else f"{v:.3g}",
                (xi, v + (h if np.isfinite(h) else 0)),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(
            x,
            names,
            rotation=30 if len(names) > 4 else 0,
            ha="right" if len(names) > 4 else "center",
        )
        ax.set_ylabel(metric_header(metric, pct))
        ax.set_title(metric + (" (primary)" if metric == primary and len(metrics) > 1 else ""))
        if scale == 100:
            tops = [v + h for v, h in zip(values, highs, strict=True) if np.isfinite(h)]
            top = max([*tops, 1.0])
            ax.set_ylim(0, min(110.0, top * 1.15 + 2))
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle("Metrics per arm (error bars: 95% CI)")
    path = out / "plots" / "metrics.png"
    _save(fig, path)
    return [
        (
            "Metrics per arm",
            "plots/metrics.png",
            "Bars: mean over all examples; error bars: 95% CI.",
        )
    ]


def _plot_heatmap(
    results: Mapping[str, Any], out: Path, logs: Mapping[str, list]
) -> list[tuple[str, str, str]]:
    """(a) BabiLong-style task × length heat-map of the primary metric, one panel per arm."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    metric = primary_metric(results)
    arms = [a for a in results["arms"] if results["arms"][a].get("groups")]
    keys = sorted({g for a in arms for g in results["arms"][a]["groups"]}, key=group_sort_key)
    layout = task_length(keys)
    if metric is None or layout is None:
        return []
    tasks, lengths = layout
    pct = metric in percent_metrics(results)
    scale = 100.0 if pct else 1.0
    grids = {}
    for name in arms:
        grid = np.full((len(tasks), len(lengths)), np.nan)
        for key, summ in results["arms"][name]["groups"].items():
            task, length = key.split("/")
            s = summ.get(metric)
            if s and not is_missing(s["value"]):
                grid[tasks.index(task), lengths.index(length)] = s["value"] * scale
        grids[name] = grid
    if pct:
        norm = Normalize(0.0, 100.0)
    else:
        finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
        if finite.size == 0:
            return []
        norm = Normalize(float(finite.min()), float(finite.max()) or 1.0)
    cmap = colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    cell_w, cell_h = 0.62, 0.42
    panel_w = cell_w * len(lengths) + 0.9
    # Side by side like the benchmark's figure, wrapping only past ~24 inches.
    ncols = max(1, min(len(arms), int(24 // panel_w)))
    nrows = math.ceil(len(arms) / ncols)
    fig = _figure(ncols * panel_w + 1.6, nrows * (cell_h * len(tasks) + 1.1) + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(arms):
            ax.set_visible(False)
            continue
        name = arms[k]
        grid = grids[name]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                r, g, b, _ = cmap(norm(v))
                colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"
                text = f"{v:.0f}" if pct else f"{v:.2f}"
            else:
                colour, text = "#666666", "–"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(tasks)), tasks if k % ncols == 0 else [""] * len(tasks))
        ax.set_xlabel("input length")
        ax.set_title(name)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    if image is not None:
        fig.colorbar(
            image, ax=axes, shrink=0.85, label=metric_header(metric, percent_metrics(results))
        )
    fig.suptitle(f"{metric} by task and input length")
    _save(fig, out / "plots" / "heatmap.png")
    caption = (
        f"{metric} per task (rows) and input length (columns), one panel per arm; "
        "shared colour scale" + (" 0–100." if pct else ".")
    )
    return [("Task × length", "plots/heatmap.png", caption)]


def draw_interval_lines(
    ax,
    labels: Sequence[str],
    series: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    scale: float = 1.0,
    colours: Mapping[str, Any] | None = None,
) -> None:
    """One line per arm over the categorical x axis ``labels``: ``series`` maps an arm to
    ``{label: summary}`` (a summary has ``value`` and ``ci95``), drawn with its 95 % interval
    as bars and a band; reference arms (base, window) dashed. A label an arm lacks leaves a gap
    in its line (a lone point keeps its marker)."""
    colours = colours or _arm_colours(list(series))
    for k, (name, summaries) in enumerate(series.items()):
        # every label, NaN where the arm has no value: a gap breaks the line instead of
        # drawing one across a rung (or length) that was not measured
        found = [summaries.get(lb) for lb in labels]
        found = [s if s and not is_missing(s.get("value")) else None for s in found]
        if not any(found):
            continue
        # Small horizontal offsets keep overlapping error bars apart.
        x = np.arange(len(labels), dtype=float) + (k - (len(series) - 1) / 2) * 0.06
        # (value, ci low, ci high) per label, NaN where missing
        rows = [(s["value"], *s["ci95"]) if s else (None, None, None) for s in found]
        y, low, high = (
            np.array([np.nan if is_missing(v) else v * scale for v in column])
            for column in zip(*rows, strict=True)
        )
        style = "--" if name in _REFERENCE_COLOURS else "-"
        ax.errorbar(
            x,
            y,
            yerr=[y - low, high - y],
            color=colours[name],
            ls=style,
            marker="o",
            ms=4,
            capsize=3,
            lw=1.6,
            label=name,
        )
        ax.fill_between(x, low, high, color=colours[name], alpha=0.1, lw=0)
    ax.set_xticks(range(len(labels)), labels)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def _plot_by_length(
    results: Mapping[str, Any], out: Path, logs: Mapping[str, list]
) -> list[tuple[str, str, str]]:
    """(b) Primary metric vs input length per arm, with 95 % intervals."""
    metric = primary_metric(results)
    by_arm = {
        name: {le: s[metric] for le, s in (arm.get("lengths") or {}).items() if metric in s}
        for name, arm in results["arms"].items()
        if (arm.get("lengths") or {})
    }
    lengths = sorted(
        {le for d in by_arm.values() for le in d}, key=lambda x: parse_length(x) or 0.0
    )
    if metric is None or len(lengths) < 2:
        return []
    pct = metric in percent_metrics(results)
    fig = _figure(max(5.5, 0.8 * len(lengths) + 3.0), 4.0)
    ax = fig.subplots()
    colours = _arm_colours(list(results["arms"]))
    draw_interval_lines(ax, lengths, by_arm, scale=100.0 if pct else 1.0, colours=colours)
    ax.set_xlabel("input length")
    ax.set_ylabel(metric_header(metric, percent_metrics(results)))
    if pct:
        ax.set_ylim(-2, 102)
    ax.set_title(f"{metric} vs input length (all tasks pooled; bars and bands: 95% CI)")
    _save(fig, out / "plots" / "by_length.png")
    caption = (
        f"{metric} at each input length, pooled over tasks; dashed lines are the reference arms."
    )
    return [("Metric vs input length", "plots/by_length.png", caption)]


# ---- training logs --------------------------------------------------------------------------


def read_train_log(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL training log; a truncated last line (a run still writing) is skipped.

    Raises:
        DataError: a malformed line other than the last.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    records = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(lines) - 1:
                logger.warning("%s: last line is incomplete; skipped", path)
                continue
            raise DataError(f"{path}:{k + 1}: not a JSON object ({err})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{k + 1}: not a JSON object")
        records.append(record)
    return records


def _arm_log(arm: Mapping[str, Any], base_dir: Path) -> list[dict[str, Any]]:
    spec = arm.get("train_log")
    if not spec:
        return []
    if not isinstance(spec, str):
        return [r for r in spec if isinstance(r, dict)]
    candidates = [Path(spec)] if Path(spec).is_absolute() else [base_dir / spec, Path(spec)]
    for candidate in candidates:
        if candidate.is_file():
            return read_train_log(candidate)
    logger.warning(
        "arm %s: training log %s not found; no training plot for it", arm.get("name"), spec
    )
    return []


def log_series(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key → (steps, values) for every numeric key (steps: ``step`` or the record index).

    Records with a ``kind`` other than ``train`` (memllm's logger writes ``kind: eval``) have
    their keys prefixed by it (``eval/loss``), so they never mix with the training loss. A
    quantity logged once outside training and evaluation (a one-off record) is not a curve and
    is left out.
    """
    raw: dict[str, tuple[list[float], list[float]]] = {}
    for k, record in enumerate(records):
        step = record.get("step", record.get("global_step", k))
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            step = k
        kind = record.get("kind")
        prefix = f"{kind}/" if isinstance(kind, str) and kind and kind != "train" else ""
        for key, value in record.items():
            if key in _LOG_AXIS_KEYS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                name = key if key.startswith(prefix) else prefix + key
                xs, ys = raw.setdefault(name, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return {
        k: (np.asarray(x), np.asarray(y))
        for k, (x, y) in raw.items()
        if len(x) > 1 or "/" not in k or k.split("/")[0] in (*_EVAL_KINDS, "memory", "loss")
    }


def smooth(values: np.ndarray, span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average (span ≈ n/12 points by default)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 3:
        return values.copy()
    span = span or max(2, values.size // 12)
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(values)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def _training_key_order(key: str) -> tuple:
    if key == "loss":
        rank = 0
    elif key.startswith(_EVAL_KINDS):
        rank = 2
    elif "loss" in key:
        rank = 1
    elif _is_lr(key):
        rank = 3
    elif "grad" in key:
        rank = 4
    else:
        rank = 5
    return (rank, natural_key(key))


def _draw_series(
    ax, x: np.ndarray, y: np.ndarray, colour, label: str | None, smoothed: bool = True
) -> None:
    if y.size > 20 and smoothed:
        ax.plot(x, y, color=colour, alpha=0.25, lw=0.8)
        ax.plot(x, smooth(y), color=colour, lw=1.8, label=label)
    elif y.size > 20:
        ax.plot(x, y, color=colour, lw=1.6, label=label)
    else:
        ax.plot(x, y, color=colour, lw=1.5, marker="o", ms=3, label=label)


def _panel_grid(count: int, ncols: int = 3, width: float = 4.2, height: float = 3.0):
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    fig = _figure(width * ncols, height * nrows + 0.5)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _is_lr(key: str) -> bool:
    return key in ("lr", "learning_rate") or key.startswith(("lr/", "lr_"))


def _finish_axis(ax, key: str, y: Sequence[np.ndarray]) -> None:
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(key.split("/")[-1])
    ax.grid(alpha=0.3)
    values = np.concatenate([np.asarray(v) for v in y]) if y else np.array([])
    # Log scale only for a sustained spread (a loss falling 100×), not for noise near zero.
    if values.size > 1 and np.all(values > 0):
        low, high = np.percentile(values, [5, 95])
        if high / low > 100:
            ax.set_yscale("log")
    if _is_lr(key) and ax.get_yscale() == "linear":
        # a cosine schedule ends near 0 (spread > 100×, so log scale): sci labels only on linear
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _plot_training(
    results: Mapping[str, Any], out: Path, logs: Mapping[str, list]
) -> list[tuple[str, str, str]]:
    """(c) Training curves: one panel per logged quantity, a line per arm (raw + smoothed)."""
    colours = _arm_colours(list(results["arms"]))
    series = {}
    for name in results["arms"]:
        s = {k: v for k, v in log_series(logs[name]).items() if "memory/" not in k}
        if s:
            series[name] = s
    keys = sorted({k for s in series.values() for k in s}, key=_training_key_order)
    if not keys:
        return []
    fig, axes = _panel_grid(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        ys = []
        for name, s in series.items():
            if key in s:
                _draw_series(ax, *s[key], colours[name], name, smoothed=not _is_lr(key))
                ys.append(s[key][1])
        _finish_axis(ax, key, ys)
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(len(labels), 8), frameon=False
    )
    fig.suptitle("Training curves (faint: raw; solid: smoothed; lr unsmoothed)")
    _save(fig, out / "plots" / "training.png")
    caption = "Every numeric key of each arm's training log; faint lines raw, solid lines an EMA."
    return [("Training curves", "plots/training.png", caption)]


def _plot_memory(
    results: Mapping[str, Any], out: Path, logs: Mapping[str, list]
) -> list[tuple[str, str, str]]:
    """(d) Memory diagnostics per arm: one panel per diagnostic, a line per layer."""
    from matplotlib import colormaps

    figures = []
    for name in results["arms"]:
        panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for key, xy in log_series(logs[name]).items():
            parts = key.split("/")
            if parts[0] != "memory" or len(parts) < 2:
                continue
            layer, diag = (parts[1], "/".join(parts[2:])) if len(parts) > 2 else ("all", parts[1])
            panels.setdefault(diag, {})[layer] = xy
        if not panels:
            continue
        diags = sorted(panels, key=natural_key)
        fig, axes = _panel_grid(len(diags))
        for ax, diag in zip(axes, diags, strict=True):
            layers = sorted(panels[diag], key=natural_key)
            cmap = colormaps["viridis"]
            for k, layer in enumerate(layers):
                colour = cmap(0.05 + 0.75 * k / max(1, len(layers) - 1))
                label = layer.removeprefix("layer") if len(layers) > 1 else layer
                _draw_series(ax, *panels[diag][layer], colour, label)
            _finish_axis(ax, diag, [panels[diag][la][1] for la in layers])
            if len(layers) > 1 or layers[0] != "all":
                ax.legend(fontsize=8, frameon=False, title="layer" if len(layers) > 1 else None)
        fig.suptitle(f"Memory diagnostics during training: {name}")
        file = f"plots/memory_{_safe_name(name)}.png"
        _save(fig, out / file)
        caption = f"{name}: each memory diagnostic in the training log, one line per memory layer."
        figures.append((f"Memory diagnostics: {name}", file, caption))
    return figures
