"""Issue 12: every fault and bad input found in the reliability audit, reproduced."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.config import TrainConfig
from lorafit.core.errors import LorafitError

WORDS = "the quick brown fox jumps over lazy dog hello world tiny corpus tokenizer".split()


# -- 1. fused AdamW resume ---------------------------------------------------------------
def _adamw(device, fused):
    import torch

    from lorafit.backends.torch.optim import TorchAdamW

    params = {"a": torch.nn.Parameter(torch.zeros(3, 2, device=device)),
              "b": torch.nn.Parameter(torch.zeros(4, device=device))}
    return TorchAdamW(params, fused=fused), params


def _saved_state():
    return {"step": np.asarray(7, dtype=np.int64),
            "exp_avg.a": np.full((3, 2), 0.5, np.float32),
            "exp_avg_sq.a": np.full((3, 2), 0.25, np.float32),
            "exp_avg.b": np.ones(4, np.float32), "exp_avg_sq.b": np.ones(4, np.float32)}


def test_1_fused_adamw_restores_step_on_the_parameter_device():
    """Fused AdamW needs `step` on the parameter's device (pytorch#104767); 'meta' stands in
    for a GPU on a CPU-only machine: the restored state must follow the parameters."""
    import torch

    opt, params = _adamw("meta", fused=True)
    opt.load_state_numpy(_saved_state())
    for p in params.values():
        st = opt.opt.state[p]
        assert st["step"].device == p.device, "step must live where the parameter lives"
        assert st["step"].dtype == torch.float32
        assert st["exp_avg"].device == p.device and st["exp_avg_sq"].device == p.device
    assert opt.step_count == 7


def test_1_restore_goes_through_optimizer_load_state_dict_and_resumes_exactly():
    import torch

    calls = []
    ref, ref_params = _adamw("cpu", fused=False)
    for _ in range(3):
        ref.step(ref_params, {k: torch.ones_like(v) for k, v in ref_params.items()}, 1e-2)
    saved = ref.state_to_numpy()
    for fused in (False, True):
        opt, params = _adamw("cpu", fused=fused)
        opt.opt.register_load_state_dict_post_hook(lambda o: calls.append(o))
        with torch.no_grad():
            for k in params:
                params[k].copy_(ref_params[k])
        opt.load_state_numpy(saved)
        st = opt.opt.state[params["a"]]
        assert st["step"].item() == 3 and st["step"].dtype == torch.float32
        opt.step(params, {k: torch.ones_like(v) for k, v in params.items()}, 1e-2)
        r2, r2p = _adamw("cpu", fused=False)
        with torch.no_grad():
            for k in r2p:
                r2p[k].copy_(ref_params[k])
        r2.load_state_numpy(saved)
        r2.step(r2p, {k: torch.ones_like(v) for k, v in r2p.items()}, 1e-2)
        for k in params:
            torch.testing.assert_close(params[k].detach(), r2p[k].detach())
    assert len(calls) == 2
