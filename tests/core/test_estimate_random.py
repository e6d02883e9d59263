"""The estimator on shapes it was not tuned on: seeded random configurations of every family
(tests/memory_random.py), measured in a fresh subprocess per backend, and one unseeded
configuration per run whose result is printed. The bound is asymmetric: an estimate under
the measured peak is the dangerous direction (a run told it fits runs out of memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]
UNDER, OVER = 0.05, 0.10  # never more than 5 % under the measured peak, at most 10 % over
SEED, COUNT = 0, 40
MLX_REMEASURES = 2  # further runs of the grid while an MLX case is outside the bound

# Mechanisms the estimator does not model yet (docs/memory.md, "Open"): a case these match
# is measured and printed, but its bound is not asserted. Each is (backend, predicate).
def _family(case: str) -> str:
    return case.split()[0]


# Empty since 2026-11-29: the last two (MLX with recompute on a Gated DeltaNet hybrid
# outside the loss phase; qwen3_5_moe_text q,v,o_proj with recompute) are modelled
# (docs/memory.md, "MLX: DeltaNet run-ahead and the lone gated attention layer").
KNOWN_GAPS: dict = {}


def measured(backend: str, draws) -> list[dict]:
    """Run tests/memory_random.py for (seed, count) draws in one subprocess; its JSON lines.
    One thread: the models are tiny, and a second OpenMP thread only spins (on a busy CI
    machine it made each torch op wait for a descheduled thread, 40x slower)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(HERE.parents[1]), os.environ.get("PYTHONPATH")) if p)}
    args = [str(x) for seed_count in draws for x in seed_count]
    out = subprocess.run([sys.executable, str(HERE / "memory_random.py"), backend, *args],
                         capture_output=True, text=True, env=env, timeout=1800)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert lines, out.stderr[-2000:]
    return lines


FRESH_SEED = int.from_bytes(os.urandom(4), "little") or 1  # never the grid's seed
_RESULTS: dict = {}


def results(backend: str) -> tuple[list[dict], list[dict]]:
    """(the seeded grid's lines, the fresh configuration's lines) of one backend, measured
    together in one subprocess the first time either test asks."""
    if backend not in _RESULTS:
        draws = [(SEED, COUNT), (FRESH_SEED, 1)]
        lines = measured(backend, draws)
        for _ in range(MLX_REMEASURES if backend == "mlx" else 0):
            if not any(outside(backend, d) for d in lines):
                break
            # MLX's peak moves between runs by a few per cent (the tape orders the ops
            # within a layer's backward; how far the dispatcher runs ahead of its worker
            # depends on timing): while a case is outside the bound the whole grid is
            # measured again in a new subprocess, and each case's peak is the highest of
            # the runs, the one a user would meet. An estimate under it fails still.
            again = {(d["seed"], d["case"]): d for d in measured(backend, draws)}
            lines = [higher_peak(d, again.get((d["seed"], d["case"]))) for d in lines]
        _RESULTS[backend] = ([d for d in lines if d["seed"] == SEED],
                             [d for d in lines if d["seed"] == FRESH_SEED])
    return _RESULTS[backend]


def outside(backend: str, d: dict) -> bool:
    """A measured case outside the bound that no known gap explains."""
    return "error" in d and not -UNDER <= d["error"] <= OVER and not gap(backend, d["case"])


def higher_peak(d: dict, other: dict | None) -> dict:
    """The line of the two measurements of one case with the higher measured peak."""
    if other is None or "measured" not in other or "measured" not in d:
        return d
    return other if other["measured"] > d["measured"] else d


def gap(backend: str, case: str) -> str | None:
    return next((why for why, hit in KNOWN_GAPS.items() if hit(backend, case)), None)


def check(backend: str, lines: list[dict]) -> list[str]:
    """The cases outside the bound that no known gap explains."""
    bad = []
    for d in lines:
        assert "failed" not in d, f"{d['case']}: {d.get('failed')}"
        ok = -UNDER <= d["error"] <= OVER
        why = gap(backend, d["case"])
        print(f"{backend} {d['error'] * 100:+6.1f}% est {d['estimate'] / 2**20:8.2f} MiB "
              f"measured {d['measured'] / 2**20:8.2f} MiB  {d['case']}"
              f"{'' if ok else '  OUT OF BOUND' + (' (known gap)' if why else '')}")
        if not ok and not why:
            bad.append(f"{d['case']}: {d['error'] * 100:+.1f}%")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_random_configurations_within_the_asymmetric_bound(backend):
    lines = results(backend)[0]
    from memory_random import LATER
    assert len(lines) == COUNT + len(LATER)
    families = {d["case"].split()[0] for d in lines}
    from lorafit.models.families import FAMILIES
    # every family is drawn, but for wrappers whose text tower is drawn under its own type
    # (qwen3_5, qwen3_5_moe, mistral3)
    not_drawn = {"qwen3_5", "qwen3_5_moe", "mistral3"}
    assert families >= set(FAMILIES) - not_drawn, set(FAMILIES) - not_drawn - families
    bad = check(backend, lines)
    errors = sorted(d["error"] for d in lines)
    print(f"{backend}: worst under {errors[0] * 100:+.1f}%, worst over "
          f"{errors[-1] * 100:+.1f}%, median {errors[len(errors) // 2] * 100:+.1f}%")
    assert not bad, f"outside -{UNDER:.0%}..+{OVER:.0%} on {backend}: " + "; ".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_one_fresh_random_configuration(backend):
    """A new configuration each run, measured and logged with its seed (reproduce with
    python tests/memory_random.py BACKEND SEED 1). The estimate and the measurement must
    both succeed; a result outside the bound is a warning in the summary, not a failure,
    so that CI does not fail at random: the seeded grid above is the asserted bound, and a
    warned seed becomes a case to model (docs/memory.md)."""
    seed = FRESH_SEED
    print(f"fresh configuration on {backend}: seed {seed}")
    lines = results(backend)[1]
    assert lines and all(d.get("measured", 0) > 0 or "failed" in d for d in lines)
    bad = check(backend, lines)  # asserts the run itself did not fail
    if bad:
        warnings.warn(f"fresh configuration outside the bound on {backend} (seed {seed}): "
                      + "; ".join(bad))


# Issue 15's families: for one config of each, the measured CPU peak is within 10 % on both
# backends, judged on the seeded grid's own measurements (no new ones).
NEW_FAMILIES = ("gemma4_text", "gemma3_text", "gemma2", "qwen3_5_text", "qwen3_5_moe_text",
                "qwen3_next", "gpt_oss", "ministral3", "olmo3", "olmo2", "phi3", "mixtral",
                "qwen3_moe", "granite", "smollm3", "starcoder2", "glm4", "exaone4")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_each_new_family_has_a_drawn_case_within_ten_percent(backend):
    """Issue 15: for one config per new family, the estimate is within 10 % of the
    measured CPU peak. The seeded grid draws every family (two cases each, most; one of
    qwen3_5_moe_text); its measurements, shared with the test above, are judged here per
    family: at least one case within +-10 %, on both backends, known gaps or not (since
    2026-11-29 every family has one: the MLX recompute, DoRA, MoE and Gemma 4 terms)."""
    lines = results(backend)[0]
    missing, report = [], []
    for fam in NEW_FAMILIES:
        cases = [d for d in lines if _family(d["case"]) == fam and "error" in d]
        assert cases, f"{fam} is not drawn by the seeded grid"
        report.append(f"{backend} {fam}: " + "; ".join(
            f"{d['error'] * 100:+.1f}% {d['case']}" for d in cases))
        if min(abs(d["error"]) for d in cases) > 0.10:
            missing.append(report[-1])
    print("\n".join(report))
    assert not missing, "no case within 10 %: " + " | ".join(missing)
