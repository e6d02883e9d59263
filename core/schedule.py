"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, total: int, warmup: int = 0, kind: str = "cosine",
          min_ratio: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    floor = peak * min_ratio
    if kind == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
