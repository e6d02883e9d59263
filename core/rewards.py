"""GRPO reward functions: a user's Python file named on the command line
(`--reward rewards.py:fn`), with TRL's signature fn(prompts, completions, **kw) -> list of
floats, one per completion. The file is the user's own code, run as they ask; nothing is
ever imported from a model folder."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from lorafit.core.errors import LorafitError


def load_reward(spec: str):
    """The callable named by "path/to/file.py:function"; a one-line error otherwise."""
    path, sep, name = str(spec).rpartition(":")
    if not sep or not path or not name:
        raise LorafitError(f"--reward {spec}: expected file.py:function")
    file = Path(path)
    if not file.is_file():
        raise LorafitError(f"--reward {spec}: no file {file}")
    module_spec = importlib.util.spec_from_file_location(f"lorafit_reward_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise LorafitError(f"--reward {spec}: {file} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: say where it failed, in one line
        raise LorafitError(f"--reward {spec}: importing {file} failed: "
                           f"{type(e).__name__}: {' '.join(str(e).split())}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise LorafitError(f"--reward {spec}: {file} has no {name}")
    if not callable(fn):
        raise LorafitError(f"--reward {spec}: {name} in {file} is not callable")
    return fn


def score(fn, prompts: list, completions: list, **kw) -> list:
    """fn's rewards, checked: one finite number per completion."""
    try:
        out = fn(prompts, completions, **kw)
    except Exception as e:
        raise LorafitError(f"the reward function failed: {type(e).__name__}: "
                           f"{' '.join(str(e).split())}") from None
    try:
        out = [float(x) for x in out]
    except (TypeError, ValueError):
        raise LorafitError("the reward function must return a list of numbers, one per "
                           "completion") from None
    if len(out) != len(completions):
        raise LorafitError(f"the reward function returned {len(out)} rewards for "
                           f"{len(completions)} completions")
    if not all(math.isfinite(x) for x in out):
        raise LorafitError("the reward function returned a non-finite reward")
    return out
