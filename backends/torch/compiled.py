"""`--compile` on torch: regional compilation of the repeated decoder layer (inductor).

Compiling the whole loss traced every layer into one graph (6 layers: six copies of the
same kernels to generate and compile), split wherever dynamo met something it cannot trace
(first of all the lock of a cached_property, ModelArgs.ropes), and at the benchmark shape
did not finish in 20 minutes. Here only the layer is compiled: one graph per layer *kind*
(models/decoder.layer_kind: what the layer's code reads of its index), traced once with
the layer's weights as inputs and reused by every layer of that kind, so the compile costs
one layer however deep the model is. The head + loss stays eager (already one fused
autograd Function); so does the first layer (see _batch_sizes_dynamic).

Shapes: the batch's sizes (B, T) are marked dynamic from the first call, so batches of
every length (unpacked batches are as long as their longest row) reuse the one graph.

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


def require_compiler(device: str) -> None:
    if device == "cpu" and cpp_compiler() is None:
        from lorafit.core.errors import LorafitError
        raise LorafitError("--compile on the CPU needs a C++ compiler (g++ or clang++, or "
                           "set CXX); install one or train without --compile")


class LayerCompiler:
    """The compiled layer functions of one compiled loss, one per layer kind."""

    def __init__(self, device: str):
        require_compiler(device)
        self.layers: dict = {}

    def layer(self, kind, fn):
        """The compiled function of `kind`: fn compiled the first time the kind is met
        (later layers' fn are the same code with another layer index, which the kind says
        changes nothing, so theirs is not looked at)."""
        compiled = self.layers.get(kind)
        if compiled is None:
            import torch

            compiled = self.layers[kind] = _batch_sizes_dynamic(
                fn, torch.compile(fn, dynamic=None))
        return compiled


def _batch_sizes_dynamic(fn, compiled):
    """compiled(weights, x, *rest) with the batch's sizes left open: every dimension of x
    (B, T, C) but the last, and each dimension of the other activations of size B or T, is
    traced as a symbol (sizes 0 and 1 stay specialised), so batches of every length share
    one graph instead of one compile per length. A layer whose input carries no gradient
    while gradients are on (the first: its input is the frozen embedding's output) runs fn
    eagerly: compiling that variant too would double the compile for one layer in L."""
    import torch

    def run(weights, x, *rest):
        if torch.is_grad_enabled() and not x.requires_grad:
            return fn(weights, x, *rest)
        sizes = set(x.shape[:-1])
        for t in (x, *rest):
            if isinstance(t, torch.Tensor):
                for d in range(t.dim()):
                    if t.shape[d] in sizes and (t is not x or d < t.dim() - 1):
                        torch._dynamo.maybe_mark_dynamic(t, d)
        return compiled(weights, x, *rest)
    return run
