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


def profiled_peak(fn) -> tuple[object, int | None]:
    """Run fn once under PyTorch's memory profiler; (result, peak bytes of live tensors),
    the peak None when the profiler could not analyse what it recorded.

    The profiler's timeline records every tensor allocation and free (inputs the step
    touches included: weights, adapter, optimizer state), so its peak is the tensor-level
    high-water mark of the step, independent of the C allocator and the interpreter. It
    slows the step down several times, so the trainer measures one step with it. Only the
    timeline's total is read: the categories (gradient, activation, ...) that
    `prof._memory_profile()` also works out, from Python stacks, are skipped (they cost
    more than the rest together and do not change the total).
    """
    import warnings

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler import _memory_profiler as mp

    class TensorTimeline(mp.MemoryProfile):
        """MemoryProfile's data flow (which tensors exist when), without categories."""

        def __init__(self, result):
            self._op_tree = mp.OpTree(result)
            self._data_flow_graph = mp.DataFlowGraph(self._op_tree)
            self._size_map = mp.SizeMap(self._op_tree)
            self._categories = mp.CategoryDict()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=True) as prof:
            result = fn()
        try:
            timeline = mp.MemoryProfileTimeline(TensorTimeline(prof.profiler.kineto_results))
            _, sizes = timeline._coalesce_timeline("cpu")
        except Exception:  # noqa: BLE001 - the profiler's own (private) analysis
            # It matches tensors by storage address and version counter, and can trip over
            # a reused address (seen once, an AssertionError "version mismatch", in a
            # 2-process --shard run): the step ran and stands; it just has no measure.
            return result, None
    peak = max((sum(s) for s in sizes), default=0)
    return result, int(peak)
