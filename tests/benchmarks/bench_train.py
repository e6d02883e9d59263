"""Training throughput and peak memory: lorafit vs the reference on each backend.

    python tests/benchmarks/bench_train.py [--rounds 3] [--steps 4] [--layers 6] [--json out.json]

One Llama-shaped model (random weights, built here; --family F builds that model_type
instead, at the same widths with the family's quirks on: see FAMILY_QUIRKS), one set of batches, the same LoRA
(rank 16 on all-linear) and AdamW settings for every contender:
  lorafit torch-cpu  vs  transformers + PEFT with a plain training loop (same weights,
                         same batches, same optimizer)
  lorafit mlx-cpu    vs  mlx-lm's LoRA trainer (its own `train` step, compiled)
Each contender runs in its own process, so each peak memory is that process's own: the
resident-set high-water mark above the baseline taken once libraries are imported (torch),
or MLX's peak-memory counter (mlx).

The machine may be shared, so the contenders alternate over --rounds rounds (each round
runs every contender once, in turn) and the table reports medians over rounds; the speed
ratio is the median of the per-round ratios, each taken between runs seconds apart. Each
round also measures the machine's fp32 GEMM rate (a child process per framework, the
model's largest per-layer matmul: tokens x hidden @ hidden x intermediate), so lorafit's
share of it is taken under the same load. FLOPs per token come from the shape
(`flops_per_token`): a frozen base needs no weight gradients, so each frozen matmul costs
its forward and its input gradient, 4 * params; a LoRA pair 6 * r * (in + out) (forward,
input gradient, weight gradients); causal attention 6 * T * Hq * D per layer (scores and
values, forward 2, backward 4, over T / 2 keys on average); the head 4 * V * C (logits and
dL/dh; no weight gradient). Adding a contender is one entry in CONTENDERS.

On a GPU (tests/gpu/run.sh, run_metal.sh): --device cuda|metal --dtype bfloat16, the
model's widths (--hidden --intermediate --heads --kv-heads --vocab), --contenders to pick
(TRL's SFTTrainer and Unsloth there; one that is not installed is reported as skipped).
Peaks are then the allocator's (torch.cuda.max_memory_allocated, MLX's counter), and MFU
is also given against the device's nominal dense bf16 peak where it is known.
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
    cfg = family_config(a)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(folder / "model"))
    from lorafit.models.tiny import bpe_tokenizer  # TRL loads one; the batches are token ids
    bpe_tokenizer(["a tokenizer only for the trainers that insist on one"],
                  vocab_size=300).save_pretrained(str(folder / "model"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, a.vocab, (a.steps + a.warmup, a.batch, a.seq + 1))
    np.save(folder / "batches.npy", ids)


# -- families (--family): the bench-sized shape of each, its quirks switched on ------------

def _gemma4_text(a) -> dict:
    """Gemma 4 (E2B/E4B layout): sliding layers (window seq/4) and wider full layers with
    proportional partial RoPE, per-layer input embeddings, GeGLU, (1 + w) norms."""
    return dict(head_dim=64, global_head_dim=128, sliding_window=max(a.seq // 4, 1),
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                             for i in range(a.layers)],
                hidden_size_per_layer_input=64, num_kv_shared_layers=0,
                tie_word_embeddings=True)


def _qwen3_5_text(a) -> dict:
    """Qwen3.5 dense: Gated DeltaNet layers alternating with gated full attention."""
    return dict(head_dim=64, layer_types=["linear_attention" if i % 2 == 0 else
                                          "full_attention" for i in range(a.layers)],
                linear_num_key_heads=heads(a), linear_num_value_heads=2 * heads(a),
                linear_key_head_dim=64, linear_value_head_dim=64)


def _qwen3_moe(a) -> dict:
    """Qwen3-MoE: 8 experts (top 2) of a quarter of the dense width on every layer."""
    return dict(head_dim=64, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                moe_intermediate_size=max(intermediate(a) // 4, 8), norm_topk_prob=True)


FAMILY_QUIRKS = {"gemma4_text": _gemma4_text, "qwen3_5_text": _qwen3_5_text,
                 "qwen3_moe": _qwen3_moe}
FAMILY_ALIASES = {"qwen3_5": "qwen3_5_text"}  # the text tower of the Qwen3.5 checkpoints
# mlx-lm has Qwen3.5 only as the VL wrapper (qwen3_5, qwen3_5_moe), no text-only model
NO_MLX_LM = ("qwen3_5_text", "qwen3_5_moe_text")


def family_of(a) -> str:
    f = getattr(a, "family", None) or "llama"  # bench_dpo's settings have none
    return FAMILY_ALIASES.get(f, f)


def family_config(a):
    """The transformers config of the benchmark's model: Llama's widths (--hidden ...) in
    the family's shape; a model_type lorafit does not support is its one-line error."""
    import transformers

    from lorafit.models import model_args

    family = family_of(a)
    kw = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=intermediate(a),
              num_hidden_layers=a.layers, num_attention_heads=heads(a),
              num_key_value_heads=a.kv_heads or heads(a), max_position_embeddings=a.seq * 2,
              tie_word_embeddings=False)
    kw.update(FAMILY_QUIRKS.get(family, lambda a: {})(a))
    if family == "llama":
        return transformers.LlamaConfig(**kw)
    cfg = transformers.AutoConfig.for_model(family, **kw)
    model_args(cfg.to_dict())  # raises lorafit's error for what it cannot train
    return cfg


def mlx_lm_folder(folder: Path, a) -> Path | None:
    """The model as mlx-lm reads it, or None where mlx-lm has no such family. Same weights;
    where mlx-lm reads the Hub's older config keys (top-level rope_theta, num_experts,
    global_head_dim) or per-expert weights, a copy gets those too."""
    import safetensors.numpy

    family = family_of(a)
    if family in NO_MLX_LM:
        return None
    if family not in ("gemma4_text", "qwen3_moe"):  # read as saved (or the contender fails)
        return folder / "model"
    out = folder / "mlx_lm_model"
    if out.exists():
        return out
    out.mkdir()
    cfg = json.loads((folder / "model" / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    if family == "qwen3_moe":
        cfg.setdefault("num_experts", cfg.get("num_local_experts"))
    if family == "gemma4_text":
        overrides = [o for o in (cfg.get("per_layer_config") or {}).values() if "head_dim" in o]
        cfg.setdefault("global_head_dim", overrides[0]["head_dim"] if overrides
                       else cfg["head_dim"])
    (out / "config.json").write_text(json.dumps(cfg))
    weights = {}
    for f in sorted((folder / "model").glob("*.safetensors")):
        weights.update(safetensors.numpy.load_file(str(f)))
    if family == "qwen3_moe":  # transformers' stacked gate_up -> mlx-lm's switch_mlp
        for k in [k for k in weights if k.endswith(".mlp.experts.gate_up_proj")]:
            gu = weights.pop(k)
            base = k[: -len("experts.gate_up_proj")] + "switch_mlp."
            f = gu.shape[1] // 2
            weights[base + "gate_proj.weight"] = np.ascontiguousarray(gu[:, :f])
            weights[base + "up_proj.weight"] = np.ascontiguousarray(gu[:, f:])
            weights[base + "down_proj.weight"] = weights.pop(
                k[: -len("gate_up_proj")] + "down_proj")
    safetensors.numpy.save_file(weights, str(out / "model.safetensors"))
    return out


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

    B = get_backend(backend, a.device if a.device != "metal" or backend == "mlx" else "mps")
    base_rss = rss_bytes()
    model = load_model(str(folder / "model"), B, a.dtype, "4bit" if a.qlora else None)
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
    peak = (B.memory_stats()["peak"] if backend == "mlx" or a.device == "cuda"
            else peak_rss_bytes() - base_rss)
    return {"step_times": times, "losses": losses, "peak": peak}


def run_peft(folder: Path, a) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    base_rss = rss_bytes()
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32) if a.qlora else None
    dtype = getattr(torch, a.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder / "model"), torch_dtype=dtype, quantization_config=quant,
        device_map=a.device if a.qlora or a.device == "cuda" else None)
    targets = lora_targets() if family_of(a) == "llama" else "all-linear"
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    if a.device == "cuda" and not a.qlora:
        model.to("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            **({"fused": True} if a.device == "cuda" else {"foreach": True}))
    return torch_loop(model, opt, folder, a, base_rss)


def torch_loop(model, opt, folder: Path, a, base_rss: int) -> dict:
    """The plain training loop of the torch references: forward with labels, backward,
    step; timed per step, synchronised on a GPU."""
    import torch

    cuda = a.device == "cuda"
    ids = torch.tensor(np.load(folder / "batches.npy"))
    times, losses = [], []
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, x in enumerate(ids):
        x = x.to(a.device)
        t0 = time.perf_counter()
        out = model(input_ids=x[:, :-1].contiguous(), labels=x[:, :-1].contiguous())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss)  # synchronises
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - base_rss
    return {"step_times": times, "losses": losses, "peak": peak}


def run_trl(folder: Path, a) -> dict:
    """TRL's SFTTrainer with its fast options: bf16 on a GPU, Liger kernels when installed,
    no gradient checkpointing, the batches already tokenized (no packing: the same rows)."""
    import importlib.util

    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    base_rss = rss_bytes()
    ids = np.load(folder / "batches.npy")
    rows = [list(map(int, r[:-1])) for x in ids for r in x]
    times, losses = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    cfg = SFTConfig(output_dir=str(folder / "trl"), max_steps=a.steps + a.warmup,
                    per_device_train_batch_size=a.batch, learning_rate=1e-4, logging_steps=1,
                    save_strategy="no", report_to=[], max_length=a.seq, packing=False,
                    bf16=a.dtype == "bfloat16", use_cpu=a.device == "cpu",
                    gradient_checkpointing=False, dataloader_num_workers=0,
                    use_liger_kernel=importlib.util.find_spec("liger_kernel") is not None,
                    model_init_kwargs={"torch_dtype": a.dtype}, max_grad_norm=0.0,
                    weight_decay=0.0, lr_scheduler_type="constant", optim="adamw_torch_fused"
                    if a.device == "cuda" else "adamw_torch")
    trainer = SFTTrainer(model=str(folder / "model"), args=cfg,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                target_modules=lora_targets(),
                                                task_type="CAUSAL_LM"),
                         callbacks=[Clock()])
    reset_peak_rss()
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if a.device == "cuda"
            else peak_rss_bytes() - base_rss)
    return {"step_times": times[a.warmup:], "losses": losses or [float("nan")], "peak": peak}


def run_unsloth(folder: Path, a) -> dict:
    """Unsloth's LoRA (its fused kernels; no gradient checkpointing), the plain loop."""
    import unsloth  # noqa: F401  (patches transformers first)
    import torch
    from unsloth import FastLanguageModel

    base_rss = rss_bytes()
    model, _ = FastLanguageModel.from_pretrained(str(folder / "model"), max_seq_length=a.seq,
                                                 dtype=getattr(torch, a.dtype),
                                                 load_in_4bit=a.qlora)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=lora_targets(),
                                             use_gradient_checkpointing=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=a.device == "cuda")
    return torch_loop(model, opt, folder, a, base_rss)


def run_mlx_lm(folder: Path, a) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    path = mlx_lm_folder(folder, a)
    if path is None:
        raise RuntimeError(f"mlx-lm has no {family_of(a)} model")
    model, config = load_model(path)
    if a.qlora:
        from mlx_lm.utils import quantize_model
        model, config = quantize_model(model, config, group_size=64, bits=4)
    model.freeze()
    keys = [f"self_attn.{m}" for m in lora_targets()[:4]] + \
        [f"mlp.{m}" for m in lora_targets()[4:]] if family_of(a) == "llama" else None
    linear_to_lora_layers(model, a.layers, {"rank": 16, "scale": 2.0, "dropout": 0.0,
                                            "keys": keys})  # None: every linear (mlx-lm's)
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


# -- the machine's GEMM rate (each in a child process, alternating with the contenders) -----

def gemm_shape(a) -> tuple[int, int, int]:
    """(rows, inner, cols) of the model's largest per-layer matmul, at the benchmark's batch."""
    return a.batch * a.seq, a.hidden, intermediate(a)


def run_gemm(a, framework: str) -> dict:
    """FLOP/s of one (m, k) @ (k, n) matmul in the benchmark's dtype, median over repeats."""
    m, k, n = gemm_shape(a)
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n)))
    if framework == "torch":
        import torch
        dev = a.device if a.device != "metal" else "mps"
        x, w = (torch.from_numpy(z).to(dev, getattr(torch, a.dtype)) for z in (x, w))
        cuda = dev == "cuda"
        mm, sync = (lambda: x @ w), (lambda y: torch.cuda.synchronize() if cuda else None)
    else:
        import mlx.core as mx
        x, w = (mx.array(z).astype(getattr(mx, a.dtype)) for z in (x, w))
        mx.set_default_device(mx.gpu if a.device == "metal" else mx.cpu)
        mm, sync = (lambda: x @ w), mx.eval
    times = []
    for i in range(12 if a.device == "cpu" else 50):
        t0 = time.perf_counter()
        sync(mm())
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"flops_per_s": 2.0 * m * k * n / float(np.median(times))}


def flops_per_token(a) -> float | None:
    """Training FLOPs per token of the benchmark's model with LoRA r16 on all-linear and a
    frozen base (see the module docstring for each term); None for other families than
    Llama (their GEMM-share columns then read n/a)."""
    if family_of(a) != "llama":
        return None
    C, F, V, T, L, r = a.hidden, intermediate(a), a.vocab, a.seq, a.layers, 16
    H, KV, D = heads(a), a.kv_heads or heads(a), a.hidden // heads(a)
    # q k v o gate up down
    modules = [(C, H * D), (C, KV * D), (C, KV * D), (H * D, C), (C, F), (C, F), (F, C)]
    frozen = sum(i * o for i, o in modules)
    lora_pairs = sum(r * (i + o) for i, o in modules)
    per_layer = 4 * frozen + 6 * lora_pairs + 6 * T * H * D
    return L * per_layer + 4 * V * C


def intermediate(a) -> int:
    return a.intermediate or int(a.hidden * 2.6875) // 32 * 32


def heads(a) -> int:
    return a.heads or a.hidden // 64


# dense bf16 peak FLOP/s by device name, for MFU (the GEMM share above needs no table)
NOMINAL_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12}


def nominal_peak(a) -> float | None:
    if a.device != "cuda" or a.dtype == "float32":
        return None
    import torch
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in NOMINAL_PEAK.items() if k in name), None)


# -- driver ----------------------------------------------------------------------------------

# name: (row group, label, lorafit's own?, framework of the GEMM it is compared with, run)
CONTENDERS = {
    "lorafit-torch": ("torch-cpu", "lorafit", True, "torch",
                      lambda f, a: run_lorafit(f, a, "torch")),
    "peft": ("torch-cpu", "transformers + PEFT, plain loop", False, "torch", run_peft),
    "lorafit-mlx": ("mlx-cpu", "lorafit", True, "mlx", lambda f, a: run_lorafit(f, a, "mlx")),
    "mlx-lm": ("mlx-cpu", "mlx-lm LoRA trainer", False, "mlx", run_mlx_lm),
    "trl": ("torch-cpu", "TRL SFTTrainer (PEFT LoRA)", False, "torch", run_trl),
    "unsloth": ("torch-cpu", "Unsloth", False, "torch", run_unsloth),
}
DEFAULT_CONTENDERS = "lorafit-torch,peft,lorafit-mlx,mlx-lm"


def child(which: str, folder: Path, a) -> None:
    if which.startswith("gemm-"):
        out = run_gemm(a, which[5:])
    else:
        out = CONTENDERS[which][4](folder, a)
    if which == "gemm-torch" or CONTENDERS.get(which, ("",) * 4)[3] == "torch":
        out["nominal_peak"] = nominal_peak(a)
    print("RESULT " + json.dumps(out))


def spawn(which: str, folder: Path, argv: list[str], script: str = __file__) -> dict:
    """Run one contender in a child process of `script` (`--child which`), MLX ones with
    OpenBLAS preloaded (torch ones without: it would take over torch's BLAS); its RESULT."""
    env = dict(os.environ)
    if "mlx" in which and os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    out = subprocess.run([sys.executable, script, "--child", which, "--folder", str(folder),
                          *argv], env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")


def summarise(r: dict, tokens_per_step: int) -> dict:
    med = float(np.median(r["step_times"]))
    return {"nominal_peak": r.get("nominal_peak"), "tokens_per_s": tokens_per_step / med,
            "step_time_median_s": med,
            "peak_mib": r["peak"] / 2**20, "first_loss": r["losses"][0],
            "last_loss": r["losses"][-1]}


def percent(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def median_of(runs: list[dict], key: str):
    if not isinstance(runs[0][key], (int, float)):
        return runs[0][key]
    return float(np.median([r[key] for r in runs]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="llama",
                   help="the model's family (a model_type lorafit trains: gemma4_text, "
                        "qwen3_5_text (or qwen3_5), qwen3_moe, ...), built at these widths")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--heads", type=int, default=None, help="default hidden / 64")
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "metal"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS,
                   help="comma-separated names from: " + ", ".join(CONTENDERS))
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3,
                   help="every contender runs once per round, in turn; medians over rounds")
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
    argv = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in (
        "family", "layers", "hidden", "vocab", "seq", "batch", "steps", "warmup", "device",
        "dtype")]
    argv += [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in (
        "intermediate", "heads", "kv_heads") if getattr(a, k)] + (["--qlora"] if a.qlora else [])
    folder = Path(tempfile.mkdtemp(prefix="lorafit-bench-"))
    from lorafit.core.errors import LorafitError
    try:
        build(folder, a)
    except (LorafitError, ValueError, KeyError) as e:  # unknown to transformers or lorafit
        p.error(f"--family {a.family}: {str(e).splitlines()[0]}")
    wanted = [n.strip() for n in a.contenders.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; "
                f"choose from {', '.join(CONTENDERS)}")
    names = [n for n in wanted if not a.only or CONTENDERS[n][0].startswith(a.only)]
    skipped = {}
    frameworks = sorted({CONTENDERS[n][3] for n in names})
    tokens = a.batch * a.seq
    runs = {n: [] for n in names}
    gemm = {fw: [] for fw in frameworks}
    for rnd in range(a.rounds):
        for fw in frameworks:
            gemm[fw].append(spawn(f"gemm-{fw}", folder, argv)["flops_per_s"])
        for n in [n for n in names if n not in skipped]:
            try:
                runs[n].append(summarise(spawn(n, folder, argv), tokens))
            except RuntimeError as e:
                if CONTENDERS[n][2]:
                    raise  # lorafit itself must run
                skipped[n] = str(e).strip().splitlines()[-1][:200]  # e.g. not installed
                print(f"{n} skipped: {skipped[n]}", file=sys.stderr, flush=True)
                continue
            print(f"round {rnd + 1}/{a.rounds} {n}: {runs[n][-1]['tokens_per_s']:.0f} tok/s, "
                  f"peak {runs[n][-1]['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
            # what has run so far, should the run be cut short (the table is written last)
            Path(a.json).write_text(json.dumps({"partial": True, "runs": runs, "gemm": gemm}))
    fpt = flops_per_token(a)
    rows = []
    names = [n for n in names if n not in skipped]
    for ours in [n for n in names if CONTENDERS[n][2]]:
        group, fw = CONTENDERS[ours][0], CONTENDERS[ours][3]
        rate = float(np.median(gemm[fw]))
        mine = {k: median_of(runs[ours], k) for k in runs[ours][0]}
        peak = runs[ours][0].get("nominal_peak")
        share = fpt and float(np.median([r["tokens_per_s"] * fpt / g
                                         for r, g in zip(runs[ours], gemm[fw])]))
        for ref in [n for n in names if CONTENDERS[n][0] == group and not CONTENDERS[n][2]]:
            theirs = {k: median_of(runs[ref], k) for k in runs[ref][0]}

            def ratio(key):  # per round: ours and the reference ran seconds apart
                return float(np.median([o[key] / f[key]
                                        for o, f in zip(runs[ours], runs[ref])]))
            rows.append({"backend": group.replace("cpu", a.device),
                         "reference": CONTENDERS[ref][1], "lorafit": mine,
                         "ref": theirs, "speed_ratio": ratio("tokens_per_s"),
                         "memory_ratio": ratio("peak_mib"), "gemm_gflops": rate / 1e9,
                         "gemm_share": share,
                         "mfu": peak and fpt and mine["tokens_per_s"] * fpt / peak,
                         "ref_mfu": peak and fpt and theirs["tokens_per_s"] * fpt / peak,
                         "ref_gemm_share": fpt and float(np.median(
                             [r["tokens_per_s"] * fpt / g
                              for r, g in zip(runs[ref], gemm[fw])])),
                         "rounds": {"lorafit": runs[ours], "ref": runs[ref]}})
    m, k, n = gemm_shape(a)
    print(f"model: {family_of(a)} {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; batch {a.batch} x "
          f"seq {a.seq}; LoRA r16 all-linear; {a.dtype} on {a.device}"
          f"{'; 4-bit frozen weights (QLoRA)' if a.qlora else ''}; {a.steps} timed steps after "
          f"{a.warmup}, {a.rounds} alternating rounds (medians)")
    print((f"training FLOPs per token {fpt / 1e6:.1f} M; " if fpt else "") +
          f"{a.dtype} GEMM rate measured on "
          f"({m}x{k})@({k}x{n}): " + ", ".join(f"{fw} {np.median(g) / 1e9:.1f} GFLOP/s"
                                              for fw, g in gemm.items()))
    print()
    print("| backend | reference | lorafit tok/s | ref tok/s | speed ratio | lorafit peak MiB "
          "| ref peak MiB | memory ratio | lorafit % of GEMM rate | ref % of GEMM rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, f = r["lorafit"], r["ref"]
        print(f"| {r['backend']} | {r['reference']} | {o['tokens_per_s']:.0f} | "
              f"{f['tokens_per_s']:.0f} | {r['speed_ratio']:.2f} | {o['peak_mib']:.0f} | "
              f"{f['peak_mib']:.0f} | {r['memory_ratio']:.2f} | {percent(r['gemm_share'])} | "
              f"{percent(r['ref_gemm_share'])} |")
    for n, why in skipped.items():
        print(f"{n}: not run ({why})")
    Path(a.json).write_text(json.dumps({"settings": vars(a), "flops_per_token": fpt,
                                        "gemm_flops_per_s": gemm, "rows": rows,
                                        "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
