"""Memory measurement for torch on the CPU, where PyTorch keeps no allocator statistics.

The peak is the kernel's resident-set high-water mark (VmHWM in /proc/self/status), which
catches short-lived peaks inside a step that sampling would miss; it is reset through
/proc/self/clear_refs. It counts the whole process, so it is reported beside the
baseline taken at reset. Elsewhere (macOS) the current RSS from psutil is sampled.
"""

from __future__ import annotations

import psutil

_STATUS = "/proc/self/status"


def _read_hwm() -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TensorTracker:
    def __init__(self):
        self._proc = psutil.Process()
        self._peak = 0
        self.baseline = self._proc.memory_info().rss

    def reset_peak(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self._peak = 0

    def stats(self) -> dict:
        rss = self._proc.memory_info().rss
        hwm = _read_hwm()
        self._peak = max(self._peak, hwm if hwm is not None else rss)
        return {"peak": self._peak, "current": rss, "rss": rss,
                "source": "process RSS high-water mark" if hwm else "process RSS (psutil)"}
