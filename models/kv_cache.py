"""The engine's preallocated KV cache: per attention layer, k and v buffers
(slots, kv heads, max length, head dim) that rows of a batch write into and attend over.

Rows of one forward are always the contiguous slots `first .. first + n - 1` (the engine
keeps its running rows packed at the front), so what attention reads is a slice of the
buffer, never a gathered copy; `lengths` tells attention where each row's keys end.
"""

from __future__ import annotations

import numpy as np

from lorafit.models.spec import ModelArgs


def batchable(a: ModelArgs) -> bool:
    """Whether rows of different lengths can share a forward over this cache: every layer is
    (full or sliding-window) attention with its own k, v, and rotary tables never switch."""
    return ("linear_attention" not in a.layer_types and not a.kv_shared_layers
            and a.cache_reset_length is None)


class SlotCache:
    def __init__(self, ops, a: ModelArgs, slots: int, max_len: int, dtype: str):
        self.ops, self.slots, self.max_len = ops, slots, max_len
        self.k = [ops.zeros((slots, a.kv_heads_of(i), max_len, a.head_dim_of(i)), dtype)
                  for i in range(a.num_hidden_layers)]
        self.v = [ops.zeros(b.shape, dtype) for b in self.k]

    def nbytes(self) -> int:
        return sum(self.ops.nbytes(b) for b in self.k + self.v)

    def views(self, first: int, starts: np.ndarray, new: int) -> list:
        """Per layer, the cache as one forward sees it: rows first .. first + len(starts) - 1,
        whose `new` tokens go at positions starts[i] ..."""
        ops = self.ops
        n = len(starts)
        ends = np.asarray(starts, np.int64) + new
        ctx = _Step(first, n, int(ends.max()), ops.from_numpy(np.arange(first, first + n)),
                    ops.from_numpy(np.asarray(starts, np.int64)), ops.from_numpy(ends))
        return [_LayerView(self, i, ctx) for i in range(len(self.k))]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Move row src's first `length` positions to row dst (packing the running rows)."""
        ops = self.ops
        rows, starts = ops.from_numpy(np.array([dst])), ops.from_numpy(np.array([0]))
        for bufs in (self.k, self.v):
            for i, b in enumerate(bufs):
                bufs[i] = ops.write_rows(b, rows, starts, b[src:src + 1, :, :length])


class _Step:
    def __init__(self, first, n, end, rows, starts, lengths):
        self.first, self.n, self.end = first, n, end
        self.rows, self.starts, self.lengths = rows, starts, lengths


class _LayerView:
    """What `attention_block` calls in place of a growing [k, v] list."""

    def __init__(self, cache: SlotCache, layer: int, step: _Step):
        self.cache, self.layer, self.step = cache, layer, step

    def update(self, k, v):
        """Write this forward's k, v (n, H, T, D); return the rows' k, v up to the longest
        row, and each row's length."""
        c, s, i = self.cache, self.step, self.layer
        c.k[i] = c.ops.write_rows(c.k[i], s.rows, s.starts, k)
        c.v[i] = c.ops.write_rows(c.v[i], s.rows, s.starts, v)
        rows = slice(s.first, s.first + s.n)
        return c.k[i][rows, :, :s.end], c.v[i][rows, :, :s.end], s.lengths
