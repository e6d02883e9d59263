"""`--compile` vs eager on torch: the compile (first step) and seconds per training step.

    python tests/benchmarks/bench_compile.py [--layers 6] [--hidden 512] [--seq 512]
                                             [--batch 4] [--rounds 5] [--steps 2] [--pack]

The shape defaults are bench_train.py's (Llama, 6 layers, hidden 512, vocab 32000, seq 512,
batch 4, rank 16 on all-linear). One model (random weights, built here), two trainers on
it, eager and compiled, the same LoRA and batches. Each first step is timed apart (the
compiled one's includes compiling the layer: CPU seconds of this thread plus the C++
compiler's child processes, and wall seconds; inductor's on-disk cache is pointed at an
empty folder so nothing is reused from an earlier run). Then --rounds rounds, each running
--steps steps of each trainer, the order alternating round by round; a step is timed in
this thread's CPU seconds (time.thread_time, one torch thread), so other processes on a
shared machine slow neither contender's figure, and the table gives medians over rounds.
Both trainers see the same batches in the same order: their losses are compared too.
With --pack each row holds examples of several lengths (the packed attention path).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))


def batches(a, n):
    from lorafit.core.data import Batch

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(3, a.vocab, (a.batch, a.seq + 1))
        pos = np.broadcast_to(np.arange(a.seq), (a.batch, a.seq)).copy()
        seg = None
        if a.pack:  # three examples per row, lengths drawn per batch
            cuts = np.sort(rng.choice(np.arange(8, a.seq - 8), 2, replace=False))
            seg = np.zeros((a.batch, a.seq), np.int32)
            for s, c in enumerate(cuts, 1):
                seg[:, c:] = s
                pos[:, c:] = np.arange(a.seq - c)
        out.append(Batch(ids[:, :-1], ids[:, 1:], np.ones((a.batch, a.seq), np.float32), pos,
                         seg))
    return out


def trainer(folder, a, compile: bool):
    from lorafit.backends import get_backend
    from lorafit.core import lora
    from lorafit.core.config import TrainConfig
    from lorafit.core.train import Trainer
    from lorafit.models.loader import load_model

    model = load_model(str(folder), get_backend("torch", "cpu"))
    cfg = TrainConfig(model=str(folder), data="x", rank=16, alpha=32, targets="all-linear",
                      batch_size=a.batch, seq_len=a.seq, compile=compile)
    lora.attach(model, cfg.lora_config(), seed=0)
    return Trainer(model, cfg, [], run_dir=None)


def cpu_seconds() -> float:
    """This thread's CPU time plus that of finished child processes (the C++ compiler)."""
    t = os.times()
    return time.thread_time() + t.children_user + t.children_system


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps per contender per round")
    p.add_argument("--pack", action="store_true")
    a = p.parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # compile from scratch
    import torch

    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1  # compile in this process: its CPU is counted
    from memory_harness import Case, build_folder

    folder = build_folder(Case("bench", layers=a.layers, hidden=a.hidden,
                               intermediate=int(a.hidden * 2.6875) // 32 * 32,
                               heads=max(1, a.hidden // 64), kv_heads=max(1, a.hidden // 64),
                               vocab=a.vocab, seq=a.seq), Path(tempfile.mkdtemp()))
    modes = ("eager", "compile")
    trainers = {m: trainer(folder, a, m == "compile") for m in modes}
    data = batches(a, 1 + a.rounds * a.steps)
    losses = {m: [] for m in modes}
    first = {}
    for m in modes:
        cpu, wall = cpu_seconds(), time.perf_counter()
        losses[m].append(trainers[m].train_step([data[0]], 1e-3)[0])
        first[m] = (cpu_seconds() - cpu, time.perf_counter() - wall)
    per_step = {m: [] for m in modes}
    for r in range(a.rounds):
        part = data[1 + r * a.steps:1 + (r + 1) * a.steps]
        for m in (modes if r % 2 == 0 else modes[::-1]):
            t = time.thread_time()
            losses[m] += [trainers[m].train_step([b], 1e-3)[0] for b in part]
            per_step[m].append((time.thread_time() - t) / a.steps)
    med = {m: statistics.median(v) for m, v in per_step.items()}
    ratios = [c / e for e, c in zip(per_step["eager"], per_step["compile"])]
    diff = max(abs(x - y) for x, y in zip(losses["eager"], losses["compile"]))
    print(f"shape: {a.layers} layers, hidden {a.hidden}, seq {a.seq}, batch {a.batch}, "
          f"vocab {a.vocab}{', packed' if a.pack else ''}; {a.rounds} rounds x {a.steps} "
          f"steps, one thread")
    print(f"{'':8} {'first step cpu s':>17} {'wall s':>8} {'s/step (median)':>16}")
    for m in modes:
        print(f"{m:8} {first[m][0]:17.2f} {first[m][1]:8.2f} {med[m]:16.3f}")
    print(f"compile / eager per step: {statistics.median(ratios):.3f} (median of rounds; "
          f"each round {', '.join(f'{x:.3f}' for x in ratios)}); "
          f"largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
