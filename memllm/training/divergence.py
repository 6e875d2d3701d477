"""Stopping on a NaN/inf: find the first non-finite value of a step and say what to change."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from memllm.errors import MemllmError
from memllm.training import checkpointing as ckpt


class TrainingDiverged(MemllmError):
    """The loss or the gradient became NaN/inf; the run stopped before taking that step."""


def first_nonfinite(
    memory_state: Any,
    diagnostics: dict[str, Any],
    task_loss: float,
    aux_loss: float,
    extra_terms: dict[str, float],
) -> str:
    """The first non-finite value of the step, upstream first: memory state, then losses."""
    carried = [x for x in tree_leaves(memory_state) if isinstance(x, Tensor)]
    if any(not bool(x.isfinite().all()) for x in carried):
        return "the carried memory state is non-finite"
    for key, value in diagnostics.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"the memory's {key} is {value}"
    terms = {"task loss": task_loss, "memory loss": aux_loss, **extra_terms}
    for name, value in terms.items():
        if not math.isfinite(value):
            return f"the {name.replace('_', ' ')} is {value}"
    return "the loss is non-finite"


def first_nonfinite_param(model: nn.Module, params: list[nn.Parameter], *, grad: bool) -> str:
    """The name of the first trainable tensor (or its gradient) that is NaN/inf."""
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        x = p.grad if grad else p
        if x is not None and not bool(x.isfinite().all()):
            return names.get(id(p), "a plug-in parameter")
    return "a trainable parameter"


def diverged_error(
    cfg, out: Path, step: int, what: str, *, updated: bool, is_main: bool
) -> TrainingDiverged:
    """One line with the step, the first non-finite value and what to change; writes
    ``diverged.json`` so that resuming the last good checkpoint may change lr / clipping."""
    t = cfg.train
    last = ckpt.latest_checkpoint(out)
    change = (
        f"a lower train.lr (now {t.lr:g}) or a smaller train.max_grad_norm (now {t.max_grad_norm})"
    )
    if last is None:
        then = f"no checkpoint was written yet: rerun with {change}"
    else:
        then = (
            f"the last good checkpoint is {last}: rerun in the same output_dir with "
            f"{change} to resume from it"
        )
        if is_main:
            record = {"step": step, "what": what, "checkpoint": ckpt.latest_step(out)}
            ckpt.write_diverged(out, record)
    done = "after updating the weights (not saved)" if updated else "before updating them"
    return TrainingDiverged(f"step {step}: {what}; stopped {done} — {then}")
