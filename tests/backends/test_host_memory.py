"""glibc keeps what a training step frees (backends/host_memory.py)."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from lorafit.backends.host_memory import keep_freed_memory


def _faults_forming(n_arrays: int) -> int:
    """Minor page faults while n_arrays 4 MiB arrays are formed and written."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(1 << 20, np.float32) for _ in range(n_arrays)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del arrays
    return faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_step_formed_again_does_not_fault_its_pages_again(torch_backend):
    """The CPU backend keeps freed memory: forming 200 MiB of arrays a second time (as
    the next step does) takes no new pages from the kernel, where glibc's defaults hand
    much of it back and fault it in again (~25 K faults per round, measured)."""
    assert keep_freed_memory()  # the CPU backends set it; idempotent
    _faults_forming(50)
    assert _faults_forming(50) < 2000
