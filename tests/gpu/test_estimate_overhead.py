"""The estimator's CUDA overhead constants against a real device: the CUDA context and the
caching allocator's rounding (core/estimate.py FRAMEWORK_OVERHEAD, ALLOCATOR_SLACK). On the
CPU these terms are zero and the tensor terms are checked by tests/core; only a GPU can show
these two. Prints what it measured so tests/gpu/run.sh's log can be recorded in
docs/memory.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (tests/gpu/run.sh)", allow_module_level=True)


def test_cuda_context_and_allocator_slack_are_covered(tmp_path):
    from lorafit.backends import get_backend
    from lorafit.core.estimate import (ALLOCATOR_SLACK, FRAMEWORK_OVERHEAD, estimate)
    from lorafit.models import memory_shape
    from memory_harness import Case, measure, settings_for

    case = Case("cuda-overhead", layers=4, hidden=1024, intermediate=2816, heads=16,
                kv_heads=4, vocab=32000, batch=4, seq=512, rank=16, targets="all-linear",
                dtype="bfloat16")
    get_backend("torch", "cuda")
    torch.cuda.synchronize()
    free0, total = torch.cuda.mem_get_info()
    context = total - free0 - torch.cuda.memory_reserved()  # driver + context, no tensors
    torch.cuda.reset_peak_memory_stats()
    allocated = measure(case, "torch", tmp_path, device="cuda")
    reserved = torch.cuda.max_memory_reserved()
    st = settings_for(case, "torch", device="cuda")
    est = estimate(memory_shape(case.config()), st)
    tensors = est["total"] - est["breakdown"]["framework overhead"]
    slack = reserved / allocated - 1
    ctx_est, slack_est = FRAMEWORK_OVERHEAD["torch-cuda"], ALLOCATOR_SLACK["torch-cuda"]
    print(f"CUDA context {context / 2**20:.0f} MiB (estimate {ctx_est / 2**20:.0f}); "
          f"allocator slack {slack * 100:.1f}% (estimate {slack_est * 100:.0f}%); "
          f"tensors estimated {tensors / 2**20:.0f} MiB, max allocated {allocated / 2**20:.0f} MiB")
    assert context <= FRAMEWORK_OVERHEAD["torch-cuda"]
    assert slack <= ALLOCATOR_SLACK["torch-cuda"]
    # the whole estimate covers what the process holds on the device at the peak
    assert est["total"] >= 0.95 * (context + reserved)
