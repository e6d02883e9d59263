"""Training throughput and peak memory: lorafit vs the reference on each backend.

    python tests/benchmarks/bench_train.py [--steps 6] [--layers 6] [--hidden 512] [--json out.json]

One Llama-shaped model (random weights, built here), one set of batches, the same LoRA
(rank 16 on all-linear) and AdamW settings for every contender:
  lorafit torch-cpu  vs  transformers + PEFT with a plain training loop (same weights,
                         same batches, same optimizer)
  lorafit mlx-cpu    vs  mlx-lm's LoRA trainer (its own `train` step, compiled)
Each contender runs in its own process, so each peak memory is that process's own: the
resident-set high-water mark above the baseline taken once libraries are imported (torch),
or MLX's peak-memory counter (mlx). Prints a table with lorafit / reference ratios and
writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def build(folder: Path, a) -> None:
    """The model folder (transformers, random init) and the token batches (numpy)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden,
                                   intermediate_size=int(a.hidden * 2.6875) // 32 * 32,
                                   num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                                   num_key_value_heads=a.hidden // 64,
                                   max_position_embeddings=a.seq * 2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder / "model"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, a.vocab, (a.steps + a.warmup, a.batch, a.seq + 1))
    np.save(folder / "batches.npy", ids)


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def lora_targets():
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- contenders (each runs in a child process) ---------------------------------------------

def run_lorafit(folder: Path, a, backend: str) -> dict:
    from lorafit.backends import get_backend
    from lorafit.core import lora
    from lorafit.core.config import TrainConfig
    from lorafit.core.data import Batch
    from lorafit.core.train import Trainer
    from lorafit.models.loader import load_model

    B = get_backend(backend, "cpu")
    base_rss = rss_bytes()
    model = load_model(str(folder / "model"), B, "float32", "4bit" if a.qlora else None)
    lora.attach(model, lora.LoraConfig(r=16, alpha=32, targets="all-linear"), seed=0)
    cfg = TrainConfig(model="x", data="x", rank=16, alpha=32, targets="all-linear",
                      batch_size=a.batch, seq_len=a.seq, lr=1e-4, max_grad_norm=None)
    trainer = Trainer.__new__(Trainer)  # the step only: no data pipeline, no sinks
    trainer.model, trainer.cfg, trainer.ops = model, cfg, B
    trainer.rank, trainer.world_size, trainer.loss_scale = 0, 1, None  # one process, fp32
    names = lora.adapter_leaves(model.params)
    trainer.trainable = {k: model.params[k] for k in names}
    trainer.frozen = {k: v for k, v in model.params.items() if k not in trainer.trainable}
    trainer.optimizer = B.make_optimizer(trainer.trainable)
    trainer.grad_fn = B.compile(B.value_and_grad(trainer._loss))
    from lorafit.core.train import Position
    trainer.pos = Position()
    ids = np.load(folder / "batches.npy")
    batches = []
    for x in ids:
        inp, tgt = x[:, :-1], x[:, 1:]
        batches.append(Batch(input_ids=inp, targets=tgt,
                             loss_mask=np.ones(inp.shape, np.float32),
                             positions=np.broadcast_to(np.arange(a.seq), inp.shape).copy(),
                             segment_ids=None))
    times, losses = [], []
    B.reset_peak_memory()
    reset_peak_rss()
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        loss, _, _ = trainer.train_step([b], 1e-4)
        B.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    peak = B.memory_stats()["peak"] if backend == "mlx" else peak_rss_bytes() - base_rss
    return {"step_times": times, "losses": losses, "peak": peak}


def run_peft(folder: Path, a) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    base_rss = rss_bytes()
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32) if a.qlora else None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder / "model"), torch_dtype=torch.float32, quantization_config=quant,
        device_map="cpu" if a.qlora else None)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_targets(),
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            foreach=True)
    ids = torch.tensor(np.load(folder / "batches.npy"))
    times, losses = [], []
    reset_peak_rss()
    for i, x in enumerate(ids):
        t0 = time.perf_counter()
        out = model(input_ids=x[:, :-1].contiguous(), labels=x[:, :-1].contiguous())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(out.loss))
    return {"step_times": times, "losses": losses, "peak": peak_rss_bytes() - base_rss}


def run_mlx_lm(folder: Path, a) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, config = load_model(folder / "model")
    if a.qlora:
        from mlx_lm.utils import quantize_model
        model, config = quantize_model(model, config, group_size=64, bits=4)
    model.freeze()
    linear_to_lora_layers(model, a.layers, {"rank": 16, "scale": 2.0, "dropout": 0.0,
                                            "keys": [f"self_attn.{m}" for m in lora_targets()[:4]]
                                            + [f"mlp.{m}" for m in lora_targets()[4:]]})
    ids = np.load(folder / "batches.npy")
    # mlx-lm's dataset items are (tokens, prompt offset); its batcher shifts inputs/targets
    dataset = [(list(map(int, row)), 0) for x in ids for row in x]
    times, losses = [], []

    class Clock(TrainingCallback):
        def on_train_loss_report(self, info):
            losses.append(info["train_loss"])
            times.append(1.0 / info["iterations_per_second"])

    mx.reset_peak_memory()
    args = TrainingArgs(batch_size=a.batch, iters=a.steps + a.warmup, steps_per_report=1,
                        steps_per_eval=10**9, steps_per_save=10**9, val_batches=0,
                        max_seq_length=a.seq + 1,
                        adapter_file=str(folder / "mlx_lm_adapters.safetensors"))
    train(model, optim.AdamW(learning_rate=1e-4, weight_decay=0.0), dataset, None, args,
          training_callback=Clock())
    return {"step_times": times[a.warmup:], "losses": losses, "peak": mx.get_peak_memory()}


# -- driver ----------------------------------------------------------------------------------

def child(which: str, folder: Path, a) -> None:
    fn = {"lorafit-torch": lambda: run_lorafit(folder, a, "torch"),
          "peft": lambda: run_peft(folder, a),
          "lorafit-mlx": lambda: run_lorafit(folder, a, "mlx"),
          "mlx-lm": lambda: run_mlx_lm(folder, a)}[which]
    print("RESULT " + json.dumps(fn()))


def spawn(which: str, folder: Path, argv: list[str]) -> dict:
    env = dict(os.environ)
    if "mlx" in which and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    out = subprocess.run([sys.executable, __file__, "--child", which, "--folder", str(folder),
                          *argv], env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")


def summarise(r: dict, tokens_per_step: int) -> dict:
    med = float(np.median(r["step_times"]))
    return {"tokens_per_s": tokens_per_step / med, "step_time_median_s": med,
            "peak_mib": r["peak"] / 2**20, "first_loss": r["losses"][0],
            "last_loss": r["losses"][-1]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", choices=["torch", "mlx"], default=None)
    p.add_argument("--qlora", action="store_true",
                   help="4-bit frozen weights everywhere: lorafit --quantize 4bit vs "
                        "transformers+PEFT+bitsandbytes NF4 and mlx-lm on a 4-bit model")
    p.add_argument("--json", default="bench_train.json")
    p.add_argument("--child", default=None)
    p.add_argument("--folder", default=None)
    a = p.parse_args()
    if a.child:
        return child(a.child, Path(a.folder), a)
    argv = [f"--{k}={getattr(a, k)}" for k in ("layers", "hidden", "vocab", "seq", "batch",
                                                "steps", "warmup")] + (["--qlora"] if a.qlora
                                                                        else [])
    folder = Path(tempfile.mkdtemp(prefix="lorafit-bench-"))
    build(folder, a)
    pairs = [("torch-cpu", "lorafit-torch", "peft", "transformers+PEFT"),
             ("mlx-cpu", "lorafit-mlx", "mlx-lm", "mlx-lm")]
    if a.only:
        pairs = [x for x in pairs if x[0].startswith(a.only)]
    tokens = a.batch * a.seq
    rows = []
    for backend, ours, ref, ref_name in pairs:
        r_ours = summarise(spawn(ours, folder, argv), tokens)
        r_ref = summarise(spawn(ref, folder, argv), tokens)
        rows.append({"backend": backend, "reference": ref_name, "lorafit": r_ours,
                     "ref": r_ref,
                     "speed_ratio": r_ours["tokens_per_s"] / r_ref["tokens_per_s"],
                     "memory_ratio": r_ours["peak_mib"] / r_ref["peak_mib"]})
    print(f"model: Llama {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; batch {a.batch} x "
          f"seq {a.seq}; LoRA r16 all-linear; fp32 compute"
          f"{'; 4-bit frozen weights (QLoRA)' if a.qlora else ''}; {a.steps} timed steps after "
          f"{a.warmup}")
    print()
    print("| backend | reference | lorafit tok/s | ref tok/s | speed ratio | lorafit step (s) "
          "| ref step (s) | lorafit peak MiB | ref peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, f = r["lorafit"], r["ref"]
        print(f"| {r['backend']} | {r['reference']} | {o['tokens_per_s']:.0f} | "
              f"{f['tokens_per_s']:.0f} | {r['speed_ratio']:.2f} | {o['step_time_median_s']:.3f} | "
              f"{f['step_time_median_s']:.3f} | {o['peak_mib']:.0f} | {f['peak_mib']:.0f} | "
              f"{r['memory_ratio']:.2f} |")
    Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
