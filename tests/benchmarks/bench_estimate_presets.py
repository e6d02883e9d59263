"""Estimated peak memory of a standard LoRA run for every bundled preset.

    python tests/benchmarks/bench_estimate_presets.py [--backend torch --device cuda]

Standard case: bf16 base, LoRA rank 16 on all-linear, batch 1, seq 2048, gradient
checkpointing, AdamW. Prints a markdown table (the one in README.md and docs/memory.md).
"""

from __future__ import annotations

import argparse

from lorafit.core.estimate import Settings, estimate, fmt_bytes
from lorafit.models import memory_shape
from lorafit.models.presets import list_presets, load_preset


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="torch")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    st = Settings(backend=a.backend, device=a.device, dtype="bfloat16", rank=16,
                  targets="all-linear", batch_size=1, seq_len=2048, grad_checkpoint=True)
    print(f"backend {a.backend}-{a.device}: bf16 base, r16 all-linear, batch 1, seq 2048, "
          "gradient checkpointing, AdamW\n")
    print("| preset | base weights | adapter + grads + AdamW | activations + loss | total |")
    print("|---|---|---|---|---|")
    for name in list_presets():
        e = estimate(memory_shape(load_preset(name)), st)
        b = e["breakdown"]
        adapter = b["adapter weights"] + b["adapter gradients"] + b["optimizer state"]
        rest = e["total"] - b["base weights"] - adapter
        print(f"| {name} | {fmt_bytes(b['base weights'])} | {fmt_bytes(adapter)} | "
              f"{fmt_bytes(rest)} | **{fmt_bytes(e['total'])}** |")


if __name__ == "__main__":
    main()
