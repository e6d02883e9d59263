"""The GPU and Metal suite scripts, checked where no GPU is: they parse, and their
--dry-run prints the plan (every part, with its timeout) without installing or running
anything. Not marked `gpu`: this runs in CI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["tests/gpu/run.sh", "tests/gpu/run_metal.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


@pytest.mark.parametrize("script,venv", list(zip(SCRIPTS, [".venv-gpu", ".venv-metal"])))
def test_dry_run_prints_the_plan_and_does_nothing(script, venv):
    before = (ROOT / venv).exists()
    out = subprocess.run(["bash", str(ROOT / script), "--dry-run"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    parts = [line.split()[1] for line in out.splitlines() if line.strip().startswith("part ")]
    assert parts == ["install", "correctness", "benchmark", "report"], out
    assert "tests/benchmarks/bench_train.py" in out and "pytest -m gpu" in out
    timeouts = [int(line.split("timeout ")[1].split("s")[0]) for line in out.splitlines()
                if "timeout " in line]
    assert len(timeouts) == 3 and sum(timeouts) <= 480  # the whole suite within 8 minutes
    assert (ROOT / venv).exists() == before  # nothing installed
    assert not (ROOT / "gpu-results.json").exists() or before


def test_parts_record_ok_failed_and_timed_out():
    """parts.sh (shared by both scripts): each part's outcome is recorded for the report,
    a failing or overrunning part does not stop the suite."""
    script = ("source tests/gpu/parts.sh; part a 5 true; part b 5 false; part c 1 sleep 3; "
              'printf "%s" "$STATUS_LINES"')
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=30, check=True).stdout
    status = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
    assert status["a"].startswith("ok ") and status["b"].startswith("failed rc=1")
    assert status["c"].startswith("timed out"), out


def test_report_tables_tests_and_benchmark(tmp_path):
    """report.py turns the junit file, the benchmark JSON and the parts' status into
    gpu-results.json and a markdown table."""
    (tmp_path / "t.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.gpu.test_cuda" name="test_a" '
        'time="1.5"/><testcase classname="tests.gpu.test_cuda" name="test_b" time="2">'
        '<failure message="boom"/></testcase></testsuite></testsuites>')
    run = {"lorafit": {"tokens_per_s": 9000.0, "peak_mib": 10000.0},
           "ref": {"tokens_per_s": 6000.0, "peak_mib": 20000.0}}
    bench = {"rows": [{"backend": "torch-cuda", "reference": "transformers + PEFT",
                       "speed_ratio": 1.5, "memory_ratio": 0.5, "gemm_share": 0.6,
                       "ref_gemm_share": 0.4, "mfu": 0.5, "ref_mfu": 0.33, **run}],
             "skipped": {"unsloth": "No module named 'unsloth'"}}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    subprocess.run(["python3", str(ROOT / "tests/gpu/report.py"), *(str(tmp_path / n) for n in
                    ("t.xml", "b.json", "r.json", "r.md"))], check=True,
                   env={"STATUS_JSON": "install\tok 90s\nbenchmark\ttimed out 170s",
                        "PATH": "/usr/bin:/bin"})
    result = json.loads((tmp_path / "r.json").read_text())
    assert [t["outcome"] for t in result["tests"]] == ["passed", "failed"]
    assert result["parts"] == {"install": "ok 90s", "benchmark": "timed out 170s"}
    md = (tmp_path / "r.md").read_text()
    assert "| lorafit (torch-cuda) | 9000 | 10000 | 60% | 50% | 1.00 | 1.00 |" in md
    assert "| transformers + PEFT | 6000 | 20000 | 40% | 33% | 0.67 | 2.00 |" in md
    assert "unsloth: not run" in md and "failed: tests.gpu.test_cuda::test_b boom" in md


def test_flops_per_token_counts_the_documented_terms():
    """bench_train's FLOPs per token for a small GQA shape, term by term: frozen matmuls
    4 x params (forward + input gradient), LoRA pairs 6 x r (in + out), causal attention
    6 T Hq D per layer, head 4 V C."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "bench_train", ROOT / "tests/benchmarks/bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = SimpleNamespace(hidden=128, intermediate=256, heads=2, kv_heads=1, vocab=1000,
                        seq=64, layers=2)
    frozen = 128 * 128 * 2 + 128 * 64 * 2 + 128 * 256 * 3  # q o, k v, gate up down
    lora = 16 * (256 * 2 + 192 * 2 + 384 * 3)
    attention = 6 * 64 * 2 * 64
    assert bench.flops_per_token(a) == 2 * (4 * frozen + 6 * lora + attention) + 4 * 1000 * 128
