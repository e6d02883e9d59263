"""gpu-results.json and gpu-results.md from what tests/gpu/run.sh (or run_metal.sh) left:
the pytest junit file, the benchmark's JSON and each part's status (STATUS_JSON, one
`name<TAB>status` line per part). Standard library only: it must run even when a part
failed to install anything.

    python tests/gpu/report.py TESTS.xml BENCH.json OUT.json OUT.md
"""

from __future__ import annotations

import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


def read_tests(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (el.get("message") or "")[:200]
                break
        else:
            reason = ""
        out.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                    "seconds": float(case.get("time") or 0), "reason": reason})
    return out


def read_parts(text: str) -> dict:
    return dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)


def markdown(result: dict) -> str:
    lines = [f"# GPU suite, {result['date']}", "", "| part | status |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(result["parts"].items())]
    tests = result["tests"]
    if tests:
        counts = {o: sum(t["outcome"] == o for t in tests) for o in
                  ("passed", "failed", "error", "skipped")}
        lines += ["", "tests: " + ", ".join(f"{n} {o}" for o, n in counts.items() if n)]
        lines += [f"- {t['outcome']}: {t['test']} {t['reason']}" for t in tests
                  if t["outcome"] in ("failed", "error")]
    bench = result.get("benchmark") or {}
    if bench.get("rows"):
        lines += ["", "| contender | tok/s | peak MiB | % of GEMM rate | MFU | vs lorafit speed "
                  "| vs lorafit memory |", "|---|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            o, f = r["lorafit"], r["ref"]
            if r is bench["rows"][0]:
                lines.append(f"| lorafit ({r['backend']}) | {o['tokens_per_s']:.0f} | "
                             f"{o['peak_mib']:.0f} | {100 * r['gemm_share']:.0f}% | "
                             f"{_pct(r.get('mfu'))} | 1.00 | 1.00 |")
            lines.append(f"| {r['reference']} | {f['tokens_per_s']:.0f} | {f['peak_mib']:.0f} | "
                         f"{100 * r['ref_gemm_share']:.0f}% | {_pct(r.get('ref_mfu'))} | "
                         f"{1 / r['speed_ratio']:.2f} | {1 / r['memory_ratio']:.2f} |")
        for name, why in (bench.get("skipped") or {}).items():
            lines.append(f"\n{name}: not run ({why})")
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def main(argv: list[str]) -> None:
    tests_xml, bench_json, out_json, out_md = map(Path, argv)
    bench = json.loads(bench_json.read_text()) if bench_json.exists() else None
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "parts": read_parts(os.environ.get("STATUS_JSON", "")),
              "tests": read_tests(tests_xml), "benchmark": bench}
    out_json.write_text(json.dumps(result, indent=2))
    out_md.write_text(markdown(result))


if __name__ == "__main__":
    main(sys.argv[1:])
