"""Does watching a run in the TUI slow it down? Same run, headless vs watched.

    python tests/benchmarks/bench_tui.py [--steps 60]

Trains the same small model twice with `lorafit train` (same config and seed): once alone,
once with the TUI attached to its run directory (`LorafitApp(watch=...)`, driven headless
by Textual's test harness in this process, redrawing as it would on screen). Compares the
median tokens/s of the steps from metrics.jsonl and prints the ratio (target >= 0.97).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, a) -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import CORPUS, build_hf_model
    from lorafit.models.tiny import bpe_tokenizer

    tok = bpe_tokenizer(CORPUS, vocab_size=320)
    folder, _ = build_hf_model(root / "model", "llama", tok, num_hidden_layers=4,
                               hidden_size=256, intermediate_size=688, rope_scaling=None)
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": " ".join(CORPUS[i % len(CORPUS)] for i in
                                                           range(k, k + 6))})
                              for k in range(64)))
    return folder, data


def start(folder, data, out, a) -> subprocess.Popen:
    env = dict(os.environ, LORAFIT_NO_REEXEC="1")
    return subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", "--model",
                             str(folder), "--data", str(data), "--output", str(out),
                             "--max-steps", str(a.steps), "--batch-size", "4", "--seq-len",
                             "128", "--backend", "torch", "--targets", "all-linear"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tokens_per_s(out: Path) -> float:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if r["kind"] == "train" and r["step"] > 3]
    return statistics.median(rates)


async def watch(out: Path, proc: subprocess.Popen) -> None:
    from lorafit.tui.app import LorafitApp

    app = LorafitApp(watch=out, runs_root=out.parent)
    async with app.run_test(size=(120, 40)) as pilot:
        while proc.poll() is None:
            await pilot.pause(0.25)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lorafit-bench-tui-"))
    folder, data = build(root, a)
    proc = start(folder, data, root / "headless", a)
    proc.wait()
    proc = start(folder, data, root / "watched", a)
    while not (root / "watched" / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.1)
    asyncio.run(watch(root / "watched", proc))
    alone, watched = tokens_per_s(root / "headless"), tokens_per_s(root / "watched")
    print("| run | median tokens/s |\n|---|---|")
    print(f"| headless | {alone:,.0f} |\n| with the TUI attached | {watched:,.0f} |")
    print(f"\nratio watched / headless: {watched / alone:.3f}")


if __name__ == "__main__":
    main()
