"""The recall ladder: one experiment per rung, then one table of arms × rungs.

A ladder config is an experiment config (:mod:`memllm.evaluation.experiment_config`) with a
``rungs`` mapping: rung name → the settings that differ on that rung (usually ``data``, merged
over the shared ``data``; any other key, e.g. ``model`` or ``segment_length``, merged the same
way). Each rung runs as an ordinary :class:`~memllm.evaluation.experiment.Experiment` into
``output_dir/<rung>/`` (its own ``results.json`` and ``results.md``, "Does the memory carry?"
first), and :func:`run_ladder` collects them into::

    output_dir/ladder.json   every (arm, rung) cell: subset accuracy [95 % CI], n, chance,
                             the arm's control and the paired test against it, and the
                             strongest no-carry control of the rung and the test against it
    output_dir/ladder.md     rows = arms, columns = rungs, cells = accuracy on ``subset`` with
                             its 95 % interval, ✔ where the arm beats its own no-carry control
                             with p < 0.01 (:data:`memllm.evaluation.carry.CARRY_ALPHA`), ✔✔
                             where it also beats the strongest no-carry control of the rung
    output_dir/ladder.png    the same table as a heat-map

Why two marks: an arm's own control can be degenerate (``episodic_no_carry`` reads nothing, so
it is ``window`` and cannot learn the answer's format), while another memory's control learns
the format and scores above chance without any fact. ✔✔ says the arm beats the best any
no-carry control does on those questions, the format-only bar (:mod:`memllm.evaluation.carry`);
a lone ✔ says it beats only its own, weaker, control. Cells from results written before the
strongest control existed have no ``carries_over_strongest`` and show ✔ alone.

``subset`` (default ``facts earlier``) is the task breakdown's subset the cells show: the
questions only a memory can answer; ``all`` shows every question (the backbone's ceiling, where
the facts are inside ``base``'s window). ``memllm ladder --config ... [--rungs a,b] [--arms x,y]
[KEY=VALUE ...]``: overrides apply to the whole file before the rungs are split (so
``eval.max_examples=10`` sets every rung, ``rungs.k1.data.num_test=20`` one rung; a rung's own
setting wins over a shared one it overrides), and ``--arms``
keeps the other arms' results already in each rung's folder, as ``memllm experiment`` does.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memllm.core.config import apply_overrides, from_dict, load_yaml
from memllm.errors import ConfigError
from memllm.evaluation.carry import CARRY_ALPHA
from memllm.evaluation.experiment_config import ExperimentConfig
from memllm.evaluation.results import is_missing, load_results, to_jsonable
from memllm.training.run_config import with_file

log = logging.getLogger(__name__)

METRICS = ("accuracy", "closed_set_accuracy")
SUBSETS = ("facts earlier", "all")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, mappings key by key (a rung's ``data`` adds to the
    shared ``data``), anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_ladder(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, ExperimentConfig]]:
    """``(settings, rung name → experiment config)`` of a ladder file; every rung is checked
    as an experiment config now, so a bad setting in the last rung fails before the first runs.

    ``settings``: ``name``, ``output_dir``, ``subset`` and ``rungs`` (the rung names in order).
    """
    data = apply_overrides(load_yaml(path), list(overrides))
    rungs = data.pop("rungs", None)
    if not isinstance(rungs, Mapping) or not rungs:
        raise with_file(ConfigError("rungs: give at least one rung (name → settings)"), path)
    subset = data.pop("subset", SUBSETS[0])
    if subset not in SUBSETS:
        raise with_file(ConfigError(f"subset: expected one of {', '.join(SUBSETS)}"), path)
    name = str(data.get("name", "ladder"))
    output_dir = str(data.get("output_dir", "runs/ladder"))
    configs = {}
    for rung, settings in rungs.items():
        if not isinstance(settings, Mapping):
            raise with_file(ConfigError(f"rungs.{rung}: expected a mapping of settings"), path)
        merged = _merge(data, settings)
        merged["name"] = f"{name}: {rung}"
        merged["output_dir"] = str(Path(output_dir) / str(rung))
        try:
            configs[str(rung)] = from_dict(ExperimentConfig, merged)
        except ConfigError as err:
            raise with_file(ConfigError(f"rungs.{rung}: {err}"), path) from None
    settings = {"name": name, "output_dir": output_dir, "subset": subset, "rungs": list(configs)}
    return settings, configs


def run_ladder(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    rungs: Sequence[str] | None = None,
    arms: Sequence[str] | None = None,
    shard: str | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the ladder's rungs (all, or ``rungs``), each arm (all, or ``arms``), then write
    ``ladder.json``, ``ladder.md`` and ``ladder.png`` from every rung's results found in the
    output folder. Returns ``(ladder, paths)``. ``shard`` ("K/N"): this process answers its
    share of every arm's examples (:mod:`memllm.evaluation.answers`)."""
    from memllm.evaluation.answers import parse_shard
    from memllm.evaluation.experiment import Experiment

    split = parse_shard(shard)
    settings, configs = load_ladder(path, overrides)
    unknown = [r for r in rungs or [] if r not in configs]
    if unknown:
        raise ConfigError(f"--rungs: no rung named {unknown[0]!r} (have {', '.join(configs)})")
    for rung in rungs or list(configs):
        cfg = configs[rung]
        chosen = [a for a in arms if a in cfg.arms] if arms else None
        if arms and not chosen:
            continue
        log.info("rung %s", rung)
        Experiment(cfg, source=path, arms=chosen, shard=split).run()
    found = {}
    for rung, cfg in configs.items():
        file = Path(cfg.output_dir) / "results.json"
        if file.is_file():
            found[rung] = load_results(file)
    ladder = summarize(found, settings)
    return ladder, write_ladder(settings["output_dir"], ladder)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _subset_summary(arm: Mapping[str, Any], metric: str, subset: str):
    """``(summary, subset used)`` of ``metric`` on ``subset`` of the arm's examples."""
    if subset != "all":
        for per in (arm.get("breakdowns") or {}).values():
            if subset in per:
                return per[subset].get(metric), subset
            if per:  # the task splits its questions, and none is in this subset
                return None, subset
    return arm["metrics"].get(metric), "all"


def summarize(rung_results: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]):
    """The ladder (the schema of ``ladder.json``) from each rung's results."""
    subset = settings.get("subset", SUBSETS[0])
    rungs = [r for r in settings.get("rungs", rung_results) if r in rung_results]
    arms: list[str] = []
    for r in rungs:
        arms += [a for a in rung_results[r]["arms"] if a not in arms]
    cells: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    for r in rungs:
        res = rung_results[r]
        carry = {
            (row["arm"], row["metric"]): row for row in (res.get("carry") or {}).get("rows", [])
        }
        info[r] = {
            "chance": res["experiment"].get("chance"),
            "data": res["experiment"].get("config", {}).get("data", {}),
        }
        for a, arm in res["arms"].items():
            cell = {}
            for metric in METRICS:
                summary, used = _subset_summary(arm, metric, subset)
                if summary is None:
                    continue
                row = carry.get((a, metric))
                cell[metric] = {
                    **{k: summary[k] for k in ("value", "ci95", "n")},
                    "subset": used,
                    "control": row["control"] if row else None,
                    "vs_control": row["test"] if row else None,
                    "carries": bool(row and row["carries"]),
                }
                if row and "carries_over_strongest" in row:  # absent in older results
                    cell[metric].update(
                        strongest_control=row["strongest_control"],
                        vs_strongest=row["strongest_test"],
                        carries_over_strongest=bool(row["carries_over_strongest"]),
                    )
            cells.setdefault(a, {})[r] = cell
    return to_jsonable(
        {
            "name": settings.get("name", "ladder"),
            "subset": subset,
            "alpha": CARRY_ALPHA,
            "rungs": rungs,
            "arms": arms,
            "rung_info": info,
            "cells": cells,
        }
    )


def _pct(x) -> str:
    return "–" if is_missing(x) else f"{100 * x:.1f}"


def _mark(cell: Mapping[str, Any]) -> str:
    """✔✔: beats its own and the strongest no-carry control; ✔: its own only; else none.
    A cell without ``carries_over_strongest`` (an older ladder) shows ✔ at most."""
    if not cell.get("carries"):
        return ""
    return "✔✔" if cell.get("carries_over_strongest") else "✔"


def _test_text(t: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(Δ [95 % CI] in points, p)`` of a paired test; dashes without one."""
    if not t:
        return "–", "–"
    low, high = t["ci95"]
    p = "<0.001" if t["p_value"] < 0.001 else f"{t['p_value']:.3f}"
    return f"{100 * t['diff']:+.1f} [{_pct(low)}, {_pct(high)}]", p


def _cell_text(cell: Mapping[str, Any] | None) -> str:
    if not cell or is_missing(cell.get("value")):
        return "–"
    low, high = cell["ci95"]
    mark = _mark(cell)
    return f"{_pct(cell['value'])} [{_pct(low)}, {_pct(high)}]" + (f" {mark}" if mark else "")


def render_ladder(ladder: Mapping[str, Any]) -> str:
    """``ladder.md``: one table per metric (rows = arms, columns = rungs), then every cell
    in long form with its control and paired test."""
    from memllm.evaluation.markdown import _md_table

    rungs, arms, subset = ladder["rungs"], ladder["arms"], ladder["subset"]
    where = (
        "the questions whose facts lie before the last segment (`facts earlier`)"
        if subset != "all"
        else "all questions"
    )
    out = [
        f"# Ladder: {ladder.get('name', 'ladder')}",
        "",
        f"Each cell: accuracy (%) on {where}, with its 95 % Wilson interval; ✔ where the arm "
        f"beats its own no-carry control on the same questions with an exact McNemar p < "
        f"{ladder['alpha']} (the control of arm `X` is `X_no_carry`; `window` for a memory "
        f"that trains nothing); ✔✔ where it also beats the rung's strongest no-carry control "
        f"(the `carry: false` arm or `window` highest on those questions). An own control that "
        f"cannot learn the answer's format (`episodic_no_carry` reads nothing, like `window`) "
        f"is a weak bar; no control can carry a fact, so the strongest one is the format-only "
        f"bar. Rows are arms, columns are rungs (one experiment each, its report in "
        f"`<rung>/results.md`).",
        "",
    ]
    for metric in METRICS:
        if not any(metric in ladder["cells"].get(a, {}).get(r, {}) for a in arms for r in rungs):
            continue
        out += [f"## {metric}", ""]
        rows = [
            [a, *(_cell_text(ladder["cells"].get(a, {}).get(r, {}).get(metric)) for r in rungs)]
            for a in arms
        ]
        rows.append(["*chance*", *(_pct(ladder["rung_info"][r].get("chance")) for r in rungs)])
        out += [_md_table(["arm", *rungs], rows), ""]
    out += ["## Every cell", ""]
    rows = []
    for r in rungs:
        for a in arms:
            for metric, cell in ladder["cells"].get(a, {}).get(r, {}).items():
                diff, p = _test_text(cell.get("vs_control"))
                strongest = cell.get("strongest_control")
                if strongest is None:
                    vs_strongest = "–"
                elif strongest == cell.get("control"):
                    vs_strongest = "its own control"
                else:
                    vs_strongest = "{}, p {}".format(*_test_text(cell.get("vs_strongest")))
                rows.append(
                    [
                        r,
                        a,
                        metric,
                        cell.get("subset", "–"),
                        str(cell.get("n", "–")),
                        _cell_text(cell),
                        cell.get("control") or "–",
                        diff,
                        p,
                        strongest or "–",
                        vs_strongest,
                    ]
                )
    headers = ["rung", "arm", "metric", "subset", "n", "value (%)", "control", "Δ vs control"]
    headers += ["p", "strongest no-carry control", "Δ vs it, p"]
    out += [_md_table(headers, rows, align="llllrrlrrlr"), ""]
    return "\n".join(out)


def plot_ladder(ladder: Mapping[str, Any], path: Path, metric: str = "accuracy") -> Path | None:
    """The ladder's ``metric`` table as a heat-map (0–100 %, ✔ and ✔✔ marked); None without
    data."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    from memllm.evaluation.plots import _figure, _save

    rungs, arms = ladder["rungs"], ladder["arms"]
    grid = np.full((len(arms), len(rungs)), np.nan)
    marks = np.full(grid.shape, "", dtype=object)
    for i, a in enumerate(arms):
        for j, r in enumerate(rungs):
            cell = ladder["cells"].get(a, {}).get(r, {}).get(metric)
            if cell and not is_missing(cell.get("value")):
                grid[i, j] = 100 * cell["value"]
                marks[i, j] = _mark(cell)
    if not np.isfinite(grid).any():
        return None
    cmap = colormaps["RdYlGn"].with_extremes(bad="#dddddd")
    norm = Normalize(0.0, 100.0)
    fig = _figure(1.0 * len(rungs) + 2.4, 0.42 * len(arms) + 1.4)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        text = (
            "–" if not math.isfinite(v) else f"{v:.0f}" + (f" {marks[i, j]}" if marks[i, j] else "")
        )
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(rungs)), rungs, rotation=30, ha="right")
    ax.set_yticks(range(len(arms)), arms)
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, shrink=0.85, label=f"{metric} (%)")
    fig.suptitle(
        f"{metric}, {ladder['subset']} (✔ beats its no-carry control, ✔✔ also the strongest "
        f"one, p < {ladder['alpha']})"
    )
    _save(fig, path)
    return path


def plot_ladder_lines(
    ladder: Mapping[str, Any], path: Path, metric: str = "accuracy"
) -> Path | None:
    """The ladder's ``metric`` per arm across the rungs as lines with 95 % intervals, chance
    dotted: on a ladder whose rungs are input lengths, accuracy vs length. None unless some arm
    has the metric on two rungs."""
    from memllm.evaluation.plots import _figure, _save, draw_interval_lines

    rungs = ladder["rungs"]
    series = {
        a: {r: cell[metric] for r, cell in ladder["cells"].get(a, {}).items() if metric in cell}
        for a in ladder["arms"]
    }
    points = [sum(not is_missing(s.get("value")) for s in per.values()) for per in series.values()]
    if max(points, default=0) < 2:
        return None
    fig = _figure(max(7.5, 0.8 * len(rungs) + 5.0), 4.0)  # the legend takes ~3 inches
    ax = fig.subplots()
    chance = [ladder["rung_info"].get(r, {}).get("chance") for r in rungs]
    if any(not is_missing(c) for c in chance):
        y = [np.nan if is_missing(c) else 100 * c for c in chance]
        ax.plot(range(len(rungs)), y, ls=":", color="black", lw=1.2, label="chance")
    draw_interval_lines(ax, rungs, series, scale=100.0)
    ax.set_ylim(-2, 102)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_xlabel("rung")
    ax.set_title(f"{metric}, {ladder['subset']} (bars and bands: 95 % CI)")
    _save(fig, path)
    return path


def write_ladder(output_dir: str | Path, ladder: Mapping[str, Any]) -> dict[str, Path]:
    """``ladder.json``, ``ladder.md`` and (with data) ``ladder.png`` (the heat-map) and
    ``ladder_lines.png`` (each arm across the rungs) in ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "ladder.json", "markdown": out / "ladder.md"}
    paths["json"].write_text(json.dumps(ladder, indent=1, allow_nan=False) + "\n")
    text = render_ladder(ladder)
    png = plot_ladder(ladder, out / "ladder.png")
    if png is not None:
        paths["plot"] = png
        text += "\n![ladder heat-map](ladder.png)\n"
    lines = plot_ladder_lines(ladder, out / "ladder_lines.png")
    if lines is not None:
        paths["lines"] = lines
        text += "\n![each arm across the rungs](ladder_lines.png)\n"
    paths["markdown"].write_text(text)
    return paths
