"""Recompute (--grad-checkpoint) on MLX with one backward schedule, layer after layer.

`mx.checkpoint` re-runs a function on `depends(primals, outputs)`: the re-run waits for
the forward's outputs only, and since forward, loss and backward are one lazy graph, MLX's
tape may place it anywhere after the forward. How many layers' re-run sets were alive at
once then varied with the graph (the step's peak moved by tens of percent between shapes
of one model), and the estimate could only guess.

`layer_checkpoint` fixes the order the way torch's checkpoint runs it: a layer is re-run
once the gradient it receives exists (the layer above is done), and every gradient it
returns waits for all of them, so the layer below starts only when this layer's adapter
gradients are formed and its re-run set is free. The values are the same as
`mx.checkpoint`'s: the re-run is the same function on the same inputs.
"""

from __future__ import annotations

import mlx.core as mx


def layer_checkpoint(fn):
    """fn(*args) -> an array or a tuple of arrays, args arrays or trees of arrays (the
    adapter leaves, the layer's input, ...); frozen weights closed over. Only the inputs
    are kept for the backward; see the module docstring for the order."""

    @mx.custom_function
    def run(*args):
        return fn(*args)

    @run.vjp
    def run_vjp(primals, cotangents, outputs):
        single = not isinstance(cotangents, (tuple, list))
        cots = [cotangents] if single else list(cotangents)
        leaves, rebuild = _flatten(tuple(primals))
        # the re-run's inputs wait for the incoming gradient: distinct arrays too, so
        # mx.compile cannot merge the re-run with the forward
        leaves = mx.depends(leaves, _flatten(cots)[0])

        def flat(*xs):
            out = fn(*rebuild(xs))
            return [out] if single else list(out)

        _, grads = mx.vjp(flat, leaves, cots)
        # every gradient leaves together: the layer below waits for this layer's adapter
        # gradients, whose inputs (the re-run set) are then freed
        return rebuild(mx.depends(grads, grads))

    return run


def _flatten(tree):
    """(the arrays of a tree of dicts, lists and tuples in order, a function that puts a
    list of that many arrays back in the same structure)."""
    leaves = []

    def walk(t):
        if isinstance(t, dict):
            return {k: walk(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(walk(v) for v in t)
        leaves.append(t)
        return None

    skeleton = walk(tree)

    def rebuild(xs):
        it = iter(xs)

        def fill(t):
            if isinstance(t, dict):
                return {k: fill(v) for k, v in t.items()}
            if isinstance(t, (list, tuple)):
                return type(t)(fill(v) for v in t)
            return next(it)
        return fill(skeleton)

    return leaves, rebuild
