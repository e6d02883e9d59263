"""AdamW for the adapter parameters, with a state that round-trips through numpy.

The state is restored through `torch.optim.Optimizer.load_state_dict`, which places each
value where the optimizer's kernels expect it: `step` on the parameter's device for fused
and capturable AdamW (pytorch#104767), a CPU float32 scalar otherwise; moments on the
parameter's device in its dtype.
"""

from __future__ import annotations

import numpy as np
import torch


class TorchAdamW:
    shards = 1  # the whole state in this process
    def __init__(self, params: dict, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 fused: bool | None = None):
        self.names = list(params)
        self.params = params
        on_cuda = next(iter(params.values())).device.type == "cuda"
        fused = on_cuda if fused is None else fused
        self.opt = torch.optim.AdamW(list(params.values()), lr=0.0, betas=betas, eps=eps,
                                     weight_decay=weight_decay,
                                     foreach=None if fused else not on_cuda,
                                     fused=fused)
        self.step_count = 0

    @torch.no_grad()
    def step(self, params, grads, lr, grad_scale=1.0):
        for name in self.names:
            g = grads[name]
            self.params[name].grad = g.mul_(grad_scale) if grad_scale != 1.0 else g
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for p in self.params.values():
            p.grad = None
        self.step_count += 1

    def state_to_numpy(self) -> dict:
        out = {"step": np.asarray(self.step_count, dtype=np.int64)}
        for name, p in self.params.items():
            st = self.opt.state.get(p)
            if not st:
                continue
            out[f"exp_avg.{name}"] = st["exp_avg"].detach().cpu().numpy()
            out[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].detach().cpu().numpy()
        return out

    def load_state_numpy(self, state: dict) -> None:
        self.step_count = int(np.asarray(state["step"]).reshape(-1)[0])
        sd = self.opt.state_dict()  # param_groups with the parameters' indices
        restored = {}
        for i, name in enumerate(self.names):
            if f"exp_avg.{name}" not in state:
                continue
            restored[i] = {
                "step": torch.tensor(float(self.step_count), dtype=torch.float32),
                "exp_avg": torch.from_numpy(np.array(state[f"exp_avg.{name}"])),
                "exp_avg_sq": torch.from_numpy(np.array(state[f"exp_avg_sq.{name}"])),
            }
        self.opt.load_state_dict({"state": restored, "param_groups": sd["param_groups"]})
