"""Serving throughput: 16 concurrent requests over 4 adapters, batched by lorafit's engine,
vs the same requests one at a time, vs transformers + PEFT's mixed-adapter batch inference.

    python tests/benchmarks/bench_serve.py [--rounds 3] [--layers 4] [--hidden 512]
                                           [--new 32] [--json out.json]

One Llama-shaped model (random weights, built here), four PEFT adapters (rank 8 and 16 on
q/k/v/o, random non-zero B), sixteen prompts of 8..38 tokens, each assigned an adapter in
turn, every request generating exactly --new tokens greedily (no end-of-sequence stop):
  lorafit batched      all 16 submitted to one engine (continuous batching, per-row LoRA)
  lorafit one-by-one   the same engine, one request at a time
  PEFT batched         PeftModel.generate(left-padded batch, adapter_names=[...])
Contenders alternate within each round; the table gives medians of tokens/s over rounds and
the ratios. This is the engine's throughput, without HTTP (the server adds tokenisation and
one queue hop per token).

MLX runs on OpenBLAS, as `lorafit serve --backend mlx` does (the CLI preloads it for MLX,
core/blas.py): with --backends mlx the script starts itself again once with it preloaded.
On the reference BLAS that mlx[cpu] links on Linux a 16-row matmul costs 16 single-row ones,
so batching gained nothing there. Torch must not share that process (the preloaded BLAS
takes over torch's and halved its batched rate), so each backend is its own run:
--backends torch (with PEFT, the torch reference) and --backends mlx (PEFT left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ADAPTERS = 4


def build(root: Path, a) -> tuple[Path, list]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden,
                                   intermediate_size=a.hidden * 2, num_hidden_layers=a.layers,
                                   num_attention_heads=a.hidden // 64,
                                   num_key_value_heads=a.hidden // 128,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(root / "model"))
    adapters = []
    for i in range(ADAPTERS):
        r = 8 if i % 2 == 0 else 16
        pm = get_peft_model(transformers.LlamaForCausalLM(cfg).eval(),
                            LoraConfig(r=r, lora_alpha=2 * r,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        pm.save_pretrained(str(root / f"ad{i}"))
        adapters.append(root / f"ad{i}")
    return root / "model", adapters


def requests(a):
    rng = np.random.default_rng(0)
    return [(rng.integers(3, a.vocab, 8 + 2 * i).tolist(), i % ADAPTERS) for i in range(16)]


class Lorafit:
    def __init__(self, folder, adapters, backend):
        from lorafit.backends import get_backend
        from lorafit.core import adapter_io
        from lorafit.core.engine import Engine
        from lorafit.models.loader import load_model

        self.engine = Engine(load_model(str(folder), get_backend(backend, "cpu")),
                             max_batch=16, max_len=128)
        for i, path in enumerate(adapters):
            self.engine.add_adapter(f"ad{i}", *adapter_io.load_any(path))

    def run(self, reqs, new, batched: bool) -> int:
        from lorafit.core.engine import Request

        out = [0]

        def count(t, f):
            out[0] += 1
        for prompt, ad in reqs:
            self.engine.submit(Request(prompt, new, adapter=f"ad{ad}", on_token=count))
            if not batched:
                self.engine.run_until_done()
        self.engine.run_until_done()
        return out[0]


class Peft:
    def __init__(self, folder, adapters):
        import torch
        import transformers
        from peft import PeftModel

        base = transformers.AutoModelForCausalLM.from_pretrained(str(folder),
                                                                 torch_dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="ad0")
        for i, path in enumerate(adapters[1:], 1):
            self.model.load_adapter(str(path), adapter_name=f"ad{i}")
        self.model.eval()

    def run(self, reqs, new) -> int:
        import torch

        width = max(len(p) for p, _ in reqs)
        ids = torch.zeros((len(reqs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(reqs):  # left padding, as generation wants
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0,
                                      adapter_names=[f"ad{ad}" for _, ad in reqs])
        return int((out.shape[1] - width) * len(reqs))


def preload_openblas() -> None:
    """Start again with OpenBLAS preloaded (once), where it is installed."""
    from lorafit.core.blas import REEXEC_FLAG, optimised_blas

    lib = optimised_blas()
    if (not sys.platform.startswith("linux") or lib is None or os.environ.get(REEXEC_FLAG)
            or "openblas" in os.environ.get("LD_PRELOAD", "")):
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip())
    env[REEXEC_FLAG] = "1"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--backends", default="torch", choices=["torch", "mlx"],
                    help="one per run: MLX wants OpenBLAS preloaded, which slows torch")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if "mlx" in a.backends:
        preload_openblas()
    from lorafit.core.blas import current_blas
    print(f"BLAS for MLX: {current_blas()}; load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, adapters = build(Path(tmp), a)
        reqs = requests(a)
        contenders = {}
        for b in a.backends.split(","):
            eng = Lorafit(folder, adapters, b)
            contenders[f"lorafit {b} batched"] = lambda e=eng: e.run(reqs, a.new, True)
            contenders[f"lorafit {b} one-by-one"] = lambda e=eng: e.run(reqs, a.new, False)
        if a.backends == "torch":
            peft = Peft(folder, adapters)
            contenders["PEFT batched (adapter_names)"] = lambda: peft.run(reqs, a.new)
        for fn in contenders.values():  # warm-up
            fn()
        rates = {k: [] for k in contenders}
        for r in range(a.rounds):
            names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in names:
                t = time.perf_counter()
                n = contenders[name]()
                rates[name].append(n / (time.perf_counter() - t))
                print(f"round {r + 1}: {name}: {rates[name][-1]:.1f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    peft_rate = med.get("PEFT batched (adapter_names)", float("nan"))
    print(f"16 requests x {a.new} new tokens, 4 adapters, Llama {a.layers} layers hidden "
          f"{a.hidden}, median of {a.rounds} rounds (tokens/s)")
    print(f"{'contender':34} {'tokens/s':>9} {'vs one-by-one':>14} {'vs PEFT':>8}")
    for k, v in med.items():
        seq = med.get(k.replace("batched", "one-by-one"), v) if k.startswith("lorafit") else v
        vs_peft = f"{v / peft_rate:7.2f}x" if peft_rate == peft_rate else "    n/a"
        print(f"{k:34} {v:9.1f} {v / seq:13.2f}x {vs_peft}")
    print(f"load average at the end {os.getloadavg()}")
    if a.json:
        a.json.write_text(json.dumps({"medians": med, "rounds": rates}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
