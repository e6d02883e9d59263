"""Dynamic loss scaling for float16 base weights, framework-free.

In float16 the gradients that flow back through the frozen layers are rounded to the
nearest representable value, and anything below about 6e-8 becomes zero: the adapter then
learns from a fraction of its gradient, or from nothing. Multiplying the loss by a large
factor S before the backward pass moves those gradients into float16's range; dividing the
(float32) adapter gradients by S before the update undoes it. S must stay below the point
where the largest gradient overflows, which changes as training goes, so it is adjusted:
a step whose gradient is not finite is skipped and S halved; after `growth_interval` finite
steps in a row S doubles (PyTorch's GradScaler rule).

bfloat16 has float32's exponent range and needs none of this: the trainer scales only when
the base weights are float16 (the loader prefers bfloat16 for training where the device
has it).
"""

from __future__ import annotations

import math


class DynamicLossScale:
    def __init__(self, scale: float = 2.0 ** 15, growth_interval: int = 200,
                 factor: float = 2.0, min_scale: float = 1.0, max_scale: float = 2.0 ** 24):
        self.scale = float(scale)
        self.growth_interval, self.factor = growth_interval, factor
        self.min_scale, self.max_scale = min_scale, max_scale
        self.good_steps = 0  # finite steps since the scale last changed

    def update(self, grad_finite: bool) -> bool:
        """Record one step's outcome; returns whether its update may be applied.
        An overflow at the smallest scale is a real non-finite gradient: still False, and
        `at_floor` tells the caller so."""
        if not grad_finite:
            self.good_steps = 0
            self.scale = max(self.min_scale, self.scale / self.factor)
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * self.factor)
            self.good_steps = 0
        return True

    @property
    def at_floor(self) -> bool:
        return self.scale <= self.min_scale

    def state(self) -> dict:
        """What a checkpoint keeps, so a resumed run does not relearn the scale."""
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load(self, state: dict | None) -> None:
        if isinstance(state, dict) and math.isfinite(float(state.get("scale", math.nan))):
            self.scale = min(self.max_scale, max(self.min_scale, float(state["scale"])))
            self.good_steps = int(state.get("good_steps", 0))
