"""Where the packed examples of a batch lie, for attention that runs example by example.

A packed row holds several examples one after another (segment_ids, core/data.py). Rather
than masking a (T, T) score matrix per row, the backends gather each example into a row of
its own and run plain causal attention over batches of examples of about the same length.
This module works out that layout from the segment ids, in numpy, once per batch.
"""

from __future__ import annotations

import numpy as np


def bucket_length(n: int) -> int:
    """n rounded up to one of 8 steps per power of two (at least a multiple of 8): examples
    of nearby lengths share one attention call, and at most 1/8 of it is padding."""
    step = max(8, (1 << (int(n).bit_length() - 1)) // 8)
    return -(-n // step) * step


def segment_runs(segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat start, length) of every run of equal ids, row by row, over the flattened
    (B * T) tokens. A run never crosses rows."""
    B, T = segment_ids.shape
    change = np.ones((B, T), bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = np.flatnonzero(change)
    lengths = np.diff(np.append(starts, B * T))
    return starts, lengths


def segment_layout(segment_ids: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(groups, order). Each group is an int64 (n, L) array of flat token positions: n
    examples padded at their end to the bucket length L by repeating their last token.
    order (B * T,) picks every token's output back out of the groups' outputs concatenated
    (each flattened to n * L rows)."""
    starts, lengths = segment_runs(np.asarray(segment_ids))
    buckets = np.array([bucket_length(n) for n in lengths])
    order = np.empty(int(lengths.sum()), np.int64)
    groups, offset = [], 0
    for L in np.unique(buckets):
        pick = np.flatnonzero(buckets == L)
        steps = np.arange(L)[None, :]
        index = starts[pick, None] + np.minimum(steps, lengths[pick, None] - 1)
        groups.append(index.astype(np.int64))
        rows = offset + np.arange(len(pick))[:, None] * L + steps
        real = steps < lengths[pick, None]
        order[index[real]] = rows[real]
        offset += len(pick) * int(L)
    return groups, order
