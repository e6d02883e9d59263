"""`--compile` on torch: the loss's forward through torch.compile (inductor).

Inductor writes C++ kernels for the CPU and needs a C++ compiler for them; without one the
first step would fail deep inside torch, so the absence is one line up front instead.
"""

from __future__ import annotations

import os
import shutil


def cpp_compiler() -> str | None:
    """The compiler inductor would use on the CPU ($CXX, else g++ or clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def compiled(fn, device: str):
    """torch.compile(fn) with dynamic shapes: batches of every length (and packing
    layout) share one compiled graph instead of compiling once per shape."""
    import torch

    if device == "cpu" and cpp_compiler() is None:
        from lorafit.core.errors import LorafitError
        raise LorafitError("--compile on the CPU needs a C++ compiler (g++ or clang++, or "
                           "set CXX); install one or train without --compile")
    return torch.compile(fn, dynamic=True)
