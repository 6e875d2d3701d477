"""Where a run stands: steps, tokens, the best validation so far, the patience and time left.

:class:`RunState` is what a checkpoint's ``state.json`` holds besides tensors, so a resumed run
continues its early stopping and best-checkpoint bookkeeping where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from memllm.training.run_config import EvalSettings


@dataclass
class RunState:
    """What a checkpoint's ``state.json`` holds besides tensors."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    stopped_early: bool = False
    tokens_seen: int = 0
    stage: int = 0  # train.curriculum: the current stage and the step it began at
    stage_start: int = 0

    def record_eval(self, value: float, settings: EvalSettings) -> bool:
        """Update best / patience with a validation's metric; True when it improved."""
        e = settings
        if self.best_metric is None:
            improved = True
        elif e.higher_is_better:
            improved = value > self.best_metric + e.min_delta
        else:
            improved = value < self.best_metric - e.min_delta
        self.last_eval_step = self.step
        if improved:
            self.best_metric, self.best_step, self.bad_evals = value, self.step, 0
        else:
            self.bad_evals += 1
            if e.patience is not None and self.bad_evals >= e.patience:
                self.stopped_early = True
        return improved


def window_record(window: list[dict[str, float]]) -> dict[str, float]:
    """One train log record: means over the steps since the last one, the last lr, tokens/s."""
    rate = sum(w["tokens"] for w in window) / max(sum(w["seconds"] for w in window), 1e-9)
    record = {
        k: float(np.mean([w[k] for w in window]))
        for k in window[-1]
        if k not in ("tokens", "seconds")
    }
    return record | {"lr": window[-1]["lr"], "tokens_per_s": rate}


def time_is_up(started: float, minutes: float, accelerator) -> bool:
    """Whether ``minutes`` have passed since ``started``, as process 0 sees it (so that every
    process stops at the same step)."""
    over = torch.tensor(float(time.time() - started >= 60 * minutes), device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        over = broadcast(over, from_process=0)
    return bool(over)
