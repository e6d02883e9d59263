"""Host memory of the data pipeline: flat in the size of the data set.

Batches are cut from flat token storage on demand, so iterating an epoch of 20M tokens
needs no more memory than one of 5M (a padded epoch used to cost ~28 bytes a token). Each
measurement runs in a fresh interpreter, so memory freed by earlier tests cannot hide
growth; RssAnon is read (anonymous memory: what cannot be given back to the page cache).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MIB = 1 << 20

ITERATE = r"""
import json, sys
import numpy as np
from lorafit.core.data import make_batches
from lorafit.core.examples import ExampleSet

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

n_tokens, pack = int(sys.argv[1]), sys.argv[2] == "pack"
rng = np.random.default_rng(0)
lengths = rng.integers(32, 512, n_tokens // 32)
lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), n_tokens))]
offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
tokens = rng.integers(1, 32000, int(offsets[-1]), dtype=np.int32)
mask = np.ones(tokens.size, bool)
examples = ExampleSet(tokens, mask, offsets, ["gen:{}"], np.zeros(lengths.size, np.int32),
                      np.arange(lengths.size, dtype=np.int64))
base = rss_anon()
peak, seen, count = base, 0, 0
for epoch in range(2):
    for k, batch in enumerate(make_batches(examples, 8, 512, pack, 0, epoch)):
        seen += batch.n_tokens
        count += 1
        if k % 25 == 0:
            peak = max(peak, rss_anon())
print(json.dumps({"tokens": int(tokens.size), "growth": peak - base, "loss_tokens": seen,
                  "batches": count}))
"""


def _growth(n_tokens: int, pack: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", ITERATE, str(n_tokens),
                          "pack" if pack else "rows"],
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("pack", [False, True])
def test_iterating_batches_needs_memory_independent_of_the_data_size(pack):
    small, large = _growth(5_000_000, pack), _growth(20_000_000, pack)
    for run in (small, large):
        # every token seen once an epoch, except the first of each example
        assert run["loss_tokens"] > 2 * 0.9 * run["tokens"]
        # a padded epoch of this set would be ~28 bytes a token: 140 MB and 560 MB
        assert run["growth"] < 48 * MIB, run
    assert large["growth"] - small["growth"] < 16 * MIB, (small, large)
