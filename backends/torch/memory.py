"""Memory measurement for torch on the CPU, where PyTorch keeps no allocator statistics.

The peak is sampled from the process resident set size (psutil) around each step; it
includes the interpreter and libraries, so callers compare it to a baseline taken before
the model is loaded.
"""

from __future__ import annotations

import psutil


class TensorTracker:
    def __init__(self):
        self._proc = psutil.Process()
        self._peak = 0

    def sample(self) -> int:
        rss = self._proc.memory_info().rss
        self._peak = max(self._peak, rss)
        return rss

    def reset_peak(self):
        self._peak = 0

    def stats(self) -> dict:
        cur = self.sample()
        return {"peak": self._peak, "current": cur, "source": "process RSS (psutil)"}
