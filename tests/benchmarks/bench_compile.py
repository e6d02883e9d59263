"""`--compile` vs eager on torch: seconds per training step once compiled, and the compile.

    python tests/benchmarks/bench_compile.py [--layers 4] [--hidden 256] [--seq 256]
                                             [--batch 4] [--steps 10] [--pack]

One Llama-shaped model (random weights, built here), the same batches and LoRA for both
runs; the first step of each run is timed apart (the compiled run's includes torch.compile).
With --pack each row holds examples of several lengths (the packed attention path).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1]))


def batches(a):
    from lorafit.core.data import Batch

    rng = np.random.default_rng(0)
    out = []
    for _ in range(a.steps + 1):
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


def run(folder, a, compile: bool) -> tuple[float, float, list]:
    from lorafit.backends import get_backend
    from lorafit.core import lora
    from lorafit.core.config import TrainConfig
    from lorafit.core.train import Trainer
    from lorafit.models.loader import load_model

    B = get_backend("torch", "cpu")
    model = load_model(str(folder), B)
    cfg = TrainConfig(model=str(folder), data="x", rank=16, alpha=32, targets="all-linear",
                      batch_size=a.batch, seq_len=a.seq, compile=compile)
    lora.attach(model, cfg.lora_config(), seed=0)
    tr = Trainer(model, cfg, [], run_dir=None)
    bs = batches(a)
    t = time.perf_counter()
    losses = [tr.train_step([bs[0]], 1e-3)[0]]
    first = time.perf_counter() - t
    t = time.perf_counter()
    losses += [tr.train_step([b], 1e-3)[0] for b in bs[1:]]
    return first, (time.perf_counter() - t) / a.steps, losses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pack", action="store_true")
    a = p.parse_args()
    from memory_harness import Case, build_folder

    root = Path(tempfile.mkdtemp())
    folder = build_folder(Case("bench", layers=a.layers, hidden=a.hidden,
                               intermediate=int(a.hidden * 2.6875) // 32 * 32,
                               heads=max(1, a.hidden // 64), kv_heads=max(1, a.hidden // 64),
                               vocab=a.vocab, seq=a.seq), root)
    results = {mode: run(folder, a, mode == "compile") for mode in ("eager", "compile")}
    diff = max(abs(x - y) for x, y in zip(results["eager"][2], results["compile"][2]))
    print(f"{'':8} {'first step s':>13} {'s/step':>8}")
    for mode, (first, per, _) in results.items():
        print(f"{mode:8} {first:13.2f} {per:8.3f}")
    print(f"compile / eager per step: {results['compile'][1] / results['eager'][1]:.2f}; "
          f"largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
