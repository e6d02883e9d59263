"""The frozen base cut across processes (`--shard`): ZeRO-3 for a functional decoder.

Each decoder layer's frozen arrays become one `ShardedLayer`: per dtype, the layer's
arrays laid end to end as one flat buffer, of which this process keeps its 1/N slice
(padded to a multiple of N). `gather` all-gathers the slices into the whole buffer and
hands back views of it under the arrays' names; nothing else refers to that buffer, so it
is freed once the layer's computation drops its views. The decoder runs a sharded layer
under activation checkpointing (models/decoder.py), so the gathered weights are not kept
for the backward: the recomputation gathers them again, one layer at a time.

FSDP2's `fully_shard` does the same for `nn.Module`s by hooking their calls; lorafit's
decoder is a function over a dict of arrays, so the gather is explicit here. Every process
must gather the same layers in the same order (they run the same forward and backward).

A layer is normally cut while the model loads (`ShardedLayer.read`, from the safetensors
files: this process reads only its slice, so no process ever holds the whole base);
the stacked experts of an MoE checkpoint stored one expert at a time are read the same way,
only the experts (and rows) in this process's range. `shard_layers` cuts what was loaded
whole (layers a model family converts otherwise on loading: gpt-oss's MXFP4 experts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lorafit.backends.base import LAYERS, SHARDED_LAYER
from lorafit.core.errors import LorafitError


class ShardedLayer:
    """One layer's frozen arrays, 1/N of them held by this process."""

    def __init__(self, arrays: dict, rank: int, world: int):
        self.world = world
        self.groups = []  # (flat length per process, [(name, shape, offset, numel)], slice)
        by_dtype: dict = {}
        for name, t in arrays.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise LorafitError(f"--shard: {name} is not a plain floating-point weight "
                                   "(a quantized base is not sharded); drop --shard or "
                                   "--quantize")
            by_dtype.setdefault(t.dtype, []).append((name, t))
        for dtype, items in by_dtype.items():
            entries, at = [], 0
            for name, t in items:
                entries.append((name, tuple(t.shape), at, t.numel()))
                at += t.numel()
            per = -(-at // world)
            start, end = rank * per, (rank + 1) * per
            local = torch.zeros(per, dtype=dtype, device=items[0][1].device)
            for (name, t), (_, _, off, n) in zip(items, entries):
                lo, hi = max(off, start), min(off + n, end)
                if lo < hi:  # this array's part of this process's slice
                    local[lo - start:hi - start] = t.reshape(-1)[lo - off:hi - off]
            self.groups.append((entries, local))

    @classmethod
    def read(cls, sources: list, dtype, rank: int, world: int, device) -> "ShardedLayer":
        """This process's slice of one layer read straight from safetensors files: only the
        bytes of the slice (and of at most one partial row at each end of a stored tensor)
        are read, through memory-mapped `get_slice`, so the whole layer is never in memory.
        sources: (name, shape, pieces) in the layer's layout order, pieces being the
        checkpoint tensors (file, key, shape) whose row-major contents laid end to end are
        the array's: one for an array stored as the model uses it, one per expert and
        projection for experts the family stacks (models/families/moe_checkpoint.py), of
        which only those the slice touches are opened. Every tensor is a floating-point one
        cast to dtype (the same flat buffer `__init__` lays out from the whole arrays)."""
        from safetensors import safe_open

        layer = cls.__new__(cls)
        layer.world = world
        entries, at = [], 0
        for name, shape, _ in sources:
            entries.append((name, tuple(shape), at, _numel(shape)))
            at += _numel(shape)
        per = -(-at // world)
        start, end = rank * per, (rank + 1) * per
        local = torch.zeros(per, dtype=dtype, device=device)
        handles: dict = {}
        try:
            for (_, _, pieces), (_, _, off, _) in zip(sources, entries):
                for path, key, shape in pieces:
                    n = _numel(shape)
                    lo, hi = max(off, start), min(off + n, end)
                    if lo < hi:
                        if path not in handles:
                            handles[path] = safe_open(str(path), framework="pt")
                        part = _flat_range(handles[path], key, shape, lo - off, hi - off)
                        local[lo - start:hi - start] = part.to(dtype)
                    off += n
        finally:
            handles.clear()
        layer.groups = [(entries, local)]
        return layer

    @property
    def nbytes(self) -> int:
        """Bytes this process holds: its slices."""
        return sum(local.numel() * local.element_size() for _, local in self.groups)

    def gather(self) -> dict:
        """The layer's whole arrays (views of freshly all-gathered buffers): a collective."""
        from lorafit.backends.torch import _collective

        out = {}
        for entries, local in self.groups:
            flat = torch.empty(local.numel() * self.world, dtype=local.dtype,
                               device=local.device)
            _collective(dist.all_gather_single, flat, local)
            for name, shape, off, n in entries:
                out[name] = flat[off:off + n].view(shape)
        return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _flat_range(handle, key: str, shape: tuple, a: int, b: int) -> torch.Tensor:
    """Elements [a, b) of an array's row-major flattening, reading whole rows along its
    first axis only (the rows the range touches), never the whole array."""
    if not shape:  # a scalar
        return handle.get_tensor(key).reshape(-1)[a:b]
    if len(shape) == 1:
        return handle.get_slice(key)[a:b]
    row = 1
    for d in shape[1:]:
        row *= int(d)
    r0, r1 = a // row, -(-b // row)
    rows = handle.get_slice(key)[r0:r1]
    return rows.reshape(-1)[a - r0 * row:b - r0 * row]


def shard_layers(params: dict, rank: int, world: int) -> dict:
    """params with each layer's frozen arrays replaced by one ShardedLayer under
    `model.layers.<i>.<SHARDED_LAYER>`; arrays outside the layers and adapter leaves stay
    whole. The whole arrays are released as each layer is cut (the caller drops its own
    references), so the peak is the base plus one layer's slice."""
    out, layers = {}, {}
    for k, v in params.items():
        if isinstance(v, ShardedLayer):  # already cut while loading (models/loader.py)
            out[k] = v
        elif k.startswith(LAYERS) and ".lora_" not in k:
            i, rest = k[len(LAYERS):].split(".", 1)
            layers.setdefault(int(i), {})[rest] = v
        else:
            out[k] = v
    for i in sorted(layers):
        out[f"{LAYERS}{i}.{SHARDED_LAYER}"] = ShardedLayer(layers.pop(i), rank, world)
    return out


def gather_layer(layer: dict) -> dict:
    """A layer's dict with its ShardedLayer replaced by the whole arrays (see Backend)."""
    handle = layer.get(SHARDED_LAYER)
    if handle is None:
        return layer
    whole = handle.gather()
    whole.update((k, v) for k, v in layer.items() if k != SHARDED_LAYER)
    return whole
