"""DPO training throughput and peak memory: lorafit vs the reference on each backend.

    python tests/benchmarks/bench_dpo.py [--rounds 2] [--steps 4] [--layers 4] [--hidden 256]

One Llama-shaped model (random weights, built by bench_train.build), the same pairs (B
pairs of prompt + completion, chosen and rejected sharing the prompt), LoRA rank 16 on
all-linear, AdamW, beta 0.1, sigmoid loss:
  lorafit torch-cpu  vs  TRL's DPOTrainer + PEFT (its `_compute_loss`: policy forward and
                         the reference with the adapter disabled; the same AdamW loop)
  lorafit mlx-cpu    vs  the DPO formula run through mlx-lm's model and LoRA layers (the
                         reference with every LoRA scale set to 0), nn.value_and_grad
Each contender runs in its own process, alternating over rounds; a contender's step time is
the median over all its timed steps. Peak: RSS growth (torch), MLX's peak counter (mlx).
Tokens counted: both rows of every pair (what the policy pass trains on).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import (build, lora_targets, peak_rss_bytes, reset_peak_rss,  # noqa: E402
                         rss_bytes, spawn)


def pairs(folder: Path):
    """(chosen ids, rejected ids, prompt length): (steps, B, seq + 1) each."""
    ids = np.load(folder / "batches.npy")
    rej = np.load(folder / "rejected.npy")
    return ids, rej, ids.shape[-1] // 2


def make_pairs(folder: Path, a) -> None:
    ids = np.load(folder / "batches.npy")
    rej = ids.copy()
    half = ids.shape[-1] // 2
    rej[..., half:] = np.random.default_rng(1).integers(3, a.vocab, rej[..., half:].shape)
    np.save(folder / "rejected.npy", rej)


def run_lorafit(folder: Path, a, backend: str) -> dict:
    from lorafit.backends import get_backend
    from lorafit.core import lora
    from lorafit.core.config import TrainConfig
    from lorafit.core.examples import ExampleSetBuilder
    from lorafit.core.preference_data import PreferenceSet, _batch
    from lorafit.core.preference_train import PreferenceTrainer
    from lorafit.models.loader import load_model

    ops = get_backend(backend, "cpu")
    base_rss = rss_bytes()
    model = load_model(str(folder / "model"), ops, "float32")
    lora.attach(model, lora.LoraConfig(r=16, alpha=32, targets="all-linear"), seed=0)
    chosen, rejected, prompt = pairs(folder)
    build_ = ExampleSetBuilder()
    for c_step, r_step in zip(chosen, rejected):
        for c, r in zip(c_step, r_step):
            mask = np.arange(c.size) >= prompt
            build_.add(c, mask, "bench")
            build_.add(r, mask, "bench")
    pset = PreferenceSet("pairs", build_.finish())
    cfg = TrainConfig(model="x", data="x", rank=16, alpha=32, targets="all-linear",
                      batch_size=a.batch, seq_len=a.seq + 1, lr=1e-4, max_grad_norm=None,
                      method="dpo", beta=0.1)
    trainer = PreferenceTrainer(model, cfg, pset)
    times, losses = [], []
    ops.reset_peak_memory()
    reset_peak_rss()
    for i in range(chosen.shape[0]):
        b = _batch(pset, list(range(i * a.batch, (i + 1) * a.batch)))
        t0 = time.perf_counter()
        loss, _, _ = trainer.train_step([b], 1e-4)
        ops.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    peak = ops.memory_stats()["peak"] if backend == "mlx" else peak_rss_bytes() - base_rss
    return {"step_times": times, "losses": losses, "peak": peak}


def run_trl(folder: Path, a) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    base_rss = rss_bytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder / "model"),
                                                              torch_dtype=torch.float32)
    from lorafit.models.tiny import bpe_tokenizer

    tok = bpe_tokenizer(["a b c d"] * 4, vocab_size=64)  # TRL tokenizes its (unused) set
    ds = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " a"}] * 2)
    args = DPOConfig(output_dir=str(folder / "trl"), report_to=[], use_cpu=True, beta=0.1,
                     per_device_train_batch_size=a.batch, gradient_checkpointing=False)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=lora_targets())
    trl = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                     peft_config=peft)
    pm = trl.model
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4,
                            foreach=True)
    chosen, rejected, prompt = pairs(folder)
    times, losses = [], []
    reset_peak_rss()
    for i in range(chosen.shape[0]):
        ids = torch.tensor(np.concatenate([chosen[i], rejected[i]]))
        comp = torch.zeros_like(ids)
        comp[:, prompt:] = 1
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "completion_mask": comp}
        t0 = time.perf_counter()
        loss = trl._compute_loss(pm, inputs, False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"step_times": times, "losses": losses, "peak": peak_rss_bytes() - base_rss}


def run_mlx_formula(folder: Path, a) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(folder / "model")
    model.freeze()
    linear_to_lora_layers(model, a.layers, {"rank": 16, "scale": 2.0, "dropout": 0.0,
                                            "keys": [f"self_attn.{m}" for m in lora_targets()[:4]]
                                            + [f"mlp.{m}" for m in lora_targets()[4:]]})
    loras = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    chosen, rejected, prompt = pairs(folder)

    def logps(ids):
        logits = model(ids[:, :-1]).astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = mx.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
        return tok[:, prompt - 1:].sum(axis=1)

    def loss_fn(model, ids, ref):
        pol = logps(ids)
        n = ids.shape[0] // 2
        delta = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
        return -nn.log_sigmoid(0.1 * delta).mean()

    vg = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.0)
    times, losses = [], []
    mx.reset_peak_memory()
    for i in range(chosen.shape[0]):
        ids = mx.array(np.concatenate([chosen[i], rejected[i]]))
        t0 = time.perf_counter()
        for m in loras:
            m.scale = 0.0
        ref = mx.stop_gradient(logps(ids))
        mx.eval(ref)
        for m in loras:
            m.scale = 2.0
        loss, grads = vg(model, ids, ref)
        opt.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), opt.state)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"step_times": times, "losses": losses, "peak": mx.get_peak_memory()}


def child(which: str, folder: Path, a) -> None:
    fn = {"lorafit-torch": lambda: run_lorafit(folder, a, "torch"),
          "trl": lambda: run_trl(folder, a),
          "lorafit-mlx": lambda: run_lorafit(folder, a, "mlx"),
          "mlx-formula": lambda: run_mlx_formula(folder, a)}[which]
    print("RESULT " + json.dumps(fn()))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8000)
    # bench_train.build's other widths: its defaults (intermediate ~2.69 x hidden, heads of 64)
    p.set_defaults(intermediate=None, heads=None, kv_heads=None)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", choices=["torch", "mlx"], default=None)
    p.add_argument("--json", default="bench_dpo.json")
    p.add_argument("--child", default=None)
    p.add_argument("--folder", default=None)
    a = p.parse_args()
    a.qlora = False  # bench_train.build's model, full precision
    if a.child:
        return child(a.child, Path(a.folder), a)
    argv = [f"--{k}={getattr(a, k)}" for k in ("layers", "hidden", "vocab", "seq", "batch",
                                                "steps", "warmup")]
    folder = Path(tempfile.mkdtemp(prefix="lorafit-bench-dpo-"))
    build(folder, a)
    make_pairs(folder, a)
    contenders = [("torch-cpu", "lorafit-torch", "trl", "TRL DPOTrainer + PEFT"),
                  ("mlx-cpu", "lorafit-mlx", "mlx-formula", "DPO formula on mlx-lm")]
    if a.only:
        contenders = [c for c in contenders if c[0].startswith(a.only)]
    tokens = 2 * a.batch * a.seq
    rows = []
    for backend, ours, ref, ref_name in contenders:
        got = {ours: [], ref: []}
        peaks = {ours: [], ref: []}
        for k in range(a.rounds):  # alternate which goes first
            for which in ((ours, ref) if k % 2 == 0 else (ref, ours)):
                r = spawn(which, folder, argv, __file__)
                got[which] += r["step_times"]
                peaks[which].append(r["peak"])
        med = {w: float(np.median(t)) for w, t in got.items()}
        peak = {w: float(np.median(v)) / 2**20 for w, v in peaks.items()}
        rows.append({"backend": backend, "reference": ref_name,
                     "lorafit_tokens_per_s": tokens / med[ours],
                     "ref_tokens_per_s": tokens / med[ref],
                     "speed_ratio": med[ref] / med[ours],
                     "lorafit_peak_mib": peak[ours], "ref_peak_mib": peak[ref],
                     "memory_ratio": peak[ours] / peak[ref]})
    print(f"model: Llama {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; {a.batch} "
          f"pairs x seq {a.seq} (prompt half shared); LoRA r16 all-linear; fp32; "
          f"{a.rounds} rounds x {a.steps} timed steps after {a.warmup}")
    print()
    print("| backend | reference | lorafit tok/s | ref tok/s | speed ratio | lorafit peak MiB "
          "| ref peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['reference']} | {r['lorafit_tokens_per_s']:.0f} | "
              f"{r['ref_tokens_per_s']:.0f} | {r['speed_ratio']:.2f} | "
              f"{r['lorafit_peak_mib']:.0f} | {r['ref_peak_mib']:.0f} | "
              f"{r['memory_ratio']:.2f} |")
    Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
