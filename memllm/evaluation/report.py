"""Write an experiment's report: ``results.json``, ``results.md`` and the plots, in one call.

The pieces live in their own modules, each importing only the ones before it:
:mod:`memllm.evaluation.results` (the schema: arm results, comparisons, breakdowns, reading and
writing ``results.json``), :mod:`memllm.evaluation.markdown` (``results.md`` and the console
tables) and :mod:`memllm.evaluation.plots` (the PNGs and the training-log readers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memllm.evaluation import plots as _plots
from memllm.evaluation.markdown import render_markdown
from memllm.evaluation.results import write_results_json

logger = logging.getLogger(__name__)


def write_results(
    output_dir: str | Path, results: Mapping[str, Any], *, plots: bool = True
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and ``plots/*.png`` into ``output_dir``.

    Args:
        output_dir: folder, created if needed.
        results: ``{"experiment": ..., "arms": ...}`` (see :mod:`memllm.evaluation.results`).
        plots: draw the plots (each is skipped cleanly when its data is absent).

    Returns:
        ``{"json": Path, "markdown": Path, "plots": [Path, ...]}``.
    """
    out = Path(output_dir)
    json_path, clean = write_results_json(out, results)
    figures: list[tuple[str, str, str]] = []
    if plots:
        figures = _plots.draw_plots(clean, out)
    md_path = out / "results.md"
    md_path.write_text(render_markdown(clean, figures))
    logger.info("wrote %s, %s and %d plots", json_path, md_path, len(figures))
    return {"json": json_path, "markdown": md_path, "plots": [out / f[1] for f in figures]}
