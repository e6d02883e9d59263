"""AdamW with PyTorch's update rule, so MLX and torch runs follow the same trajectory.

mlx.optimizers.AdamW defaults to no bias correction and orders its operations
differently; the rule below is torch.optim.AdamW's, term for term.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


class MLXAdamW:
    shards = 1  # the whole state in this process
    def __init__(self, params: dict, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params = params
        self.b1, self.b2 = betas
        self.eps = eps
        self.wd = weight_decay
        self.m = {k: mx.zeros_like(v) for k, v in params.items()}
        self.v = {k: mx.zeros_like(v) for k, v in params.items()}
        self.step_count = 0

    def step(self, params, grads, lr, grad_scale=1.0):
        self.step_count += 1
        t = self.step_count
        bc1 = 1 - self.b1 ** t
        bc2_sqrt = math.sqrt(1 - self.b2 ** t)
        step_size = lr / bc1
        for name, p in params.items():
            g = grads[name]
            if grad_scale != 1.0:
                g = g * grad_scale
            if self.wd:
                p = p * (1 - lr * self.wd)
            m = self.m[name] * self.b1 + (1 - self.b1) * g
            v = self.v[name] * self.b2 + (1 - self.b2) * (g * g)
            denom = mx.sqrt(v) / bc2_sqrt + self.eps
            params[name] = p - step_size * (m / denom)
            self.m[name], self.v[name] = m, v
        mx.eval(params, self.m, self.v)

    def state_to_numpy(self) -> dict:
        out = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for name in self.params:
            out[f"exp_avg.{name}"] = np.array(self.m[name])
            out[f"exp_avg_sq.{name}"] = np.array(self.v[name])
        return out

    def load_state_numpy(self, state: dict) -> None:
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])
        for name in self.params:
            if f"exp_avg.{name}" in state:
                self.m[name] = mx.array(np.asarray(state[f"exp_avg.{name}"]))
                self.v[name] = mx.array(np.asarray(state[f"exp_avg_sq.{name}"]))
