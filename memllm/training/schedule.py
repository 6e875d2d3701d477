"""The learning-rate schedule: linear warm-up, then constant, cosine to 0 or linear to 0."""

from __future__ import annotations

import math


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak lr for the update with index ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0
