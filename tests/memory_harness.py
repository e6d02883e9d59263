"""Measure the real peak of lorafit training steps on small models built on the spot.

Used by tests/core/test_estimate.py and by `python tests/memory_harness.py` (prints a table of
estimate vs measured for the test grid, as in docs/memory.md).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


@dataclass
class Case:
    name: str
    layers: int = 2
    hidden: int = 256
    intermediate: int = 688
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 8000
    tied: bool = False
    batch: int = 2
    seq: int = 128
    rank: int = 8
    targets: str = "q_proj,v_proj"
    grad_checkpoint: bool = False
    pack: bool = False
    dtype: str = "float32"
    model_type: str = "llama"
    dora: bool = False
    quantize: str | None = None
    compile: bool = False  # torch --compile: the decoder layers run inductor's graph
    extra: dict = field(default_factory=dict)

    def config(self) -> dict:
        cfg = dict(model_type=self.model_type, hidden_size=self.hidden,
                   intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                   num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                   vocab_size=self.vocab, tie_word_embeddings=self.tied, rms_norm_eps=1e-5,
                   max_position_embeddings=4096, torch_dtype="float32")
        cfg.update(self.extra)
        return cfg


GRID = [
    Case("base"),
    Case("deeper", layers=4),
    Case("wider", hidden=384, intermediate=1024, heads=6, kv_heads=6),
    Case("gqa", heads=8, kv_heads=2),
    Case("big-vocab", vocab=32000),
    Case("tied", tied=True, vocab=16000),
    Case("batch4", batch=4),
    Case("seq256", seq=256),
    Case("rank32", rank=32),
    Case("all-linear", targets="all-linear", rank=16),
    Case("recompute", grad_checkpoint=True, layers=4),
    Case("recompute-all-linear", grad_checkpoint=True, targets="all-linear", layers=3),
    Case("packed", pack=True, batch=2, seq=128),
    Case("qwen2-bias", model_type="qwen2"),
    Case("bf16", dtype="bfloat16", hidden=128, intermediate=352, seq=64),
    Case("dora", dora=True, targets="q_proj,v_proj,down_proj"),
]
MLX_ONLY = [Case("qlora-4bit", quantize="4bit"), Case("qlora-8bit-all-linear", quantize="8bit",
                                                       targets="all-linear")]
QLORA_4BIT = [Case("qlora-4bit", quantize="4bit"),
              Case("qlora-4bit-all-linear-wide", quantize="4bit", targets="all-linear",
                   hidden=384, intermediate=1024, heads=6, kv_heads=6)]


def build_folder(case: Case, root: Path) -> Path:
    from lorafit.models import parameter_shapes
    from lorafit.models.tiny import char_tokenizer, save_numpy_model

    cfg = case.config()
    rng = np.random.default_rng(0)
    weights = {k: (rng.standard_normal(s) * 0.02).astype(np.float32)
               for k, s in parameter_shapes(cfg).items()}
    return save_numpy_model(root / case.name, cfg, weights, char_tokenizer("abcdefgh "))


def settings_for(case: Case, backend: str, device: str = "cpu"):
    from lorafit.core.estimate import Settings

    return Settings(backend=backend, device=device, dtype=case.dtype, rank=case.rank,
                    targets=case.targets, batch_size=case.batch, seq_len=case.seq,
                    grad_checkpoint=case.grad_checkpoint, pack=case.pack, dora=case.dora,
                    compile=case.compile, quantize_bits={"4bit": 4, "8bit": 8}.get(case.quantize))


# MLX's peak moves from step to step of one run: its CPU encoder counts dispatches per
# scheduler task and the count carries over between steps, so where the task boundaries
# (how far the dispatcher allocates ahead of the worker) fall shifts each step. A user's
# run meets the highest: the random grid (tests/memory_random.py) measures MLX over this
# many steps after the first, torch (whose peak is the same every step) over one.
MLX_MEASURED_STEPS = 5


def measured_steps(backend_name: str) -> int:
    return MLX_MEASURED_STEPS if backend_name == "mlx" else 1


def measure(case: Case, backend_name: str, root: Path, steps: int = 2,
            device: str = "cpu", method: str = "sft", measured: int = 1) -> int:
    """Peak bytes of real training steps: the highest of `measured` steps from the
    `steps`-th on (optimizer state exists by then). One step by default: the cases of
    tests/core/test_estimate.py take seconds a step on MLX (their MLX peaks over 11 steps
    are in docs/memory.md, "MLX measured over several steps").
    method "dpo": case.batch pairs, i.e. 2 x case.batch rows (chosen, then rejected; the
    completion is each row's second half) through the preference trainer, whose step adds
    the reference pass (the adapter off) before the policy's."""
    return max(step_peaks(case, backend_name, root, steps, measured, device, method))


def step_peaks(case: Case, backend_name: str, root: Path, steps: int = 2, measured: int = 1,
               device: str = "cpu", method: str = "sft") -> list[int]:
    """Peak bytes of each of `measured` training steps, from the `steps`-th on."""
    from lorafit.backends import get_backend
    from lorafit.core import lora
    from lorafit.core.config import TrainConfig
    from lorafit.core.data import Batch
    from lorafit.core.train import Trainer
    from lorafit.models.loader import load_model

    folder = root / case.name
    if not folder.exists():
        build_folder(case, root)
    import gc

    gc.collect()  # earlier cases' trainers sit in reference cycles
    B = get_backend(backend_name, device)
    if backend_name == "mlx":
        import mlx.core as mx

        # freed buffers of earlier cases stay in MLX's cache and are handed out again for
        # any request they cover: counted active at their own size, they moved a small
        # case's peak with whatever ran before it
        mx.clear_cache()
    # arrays still alive from earlier cases in this process (MLX's compile cache keeps
    # their constants) are not this case's: count from what is live now
    before = B.memory_stats()["current"] if backend_name == "mlx" else 0
    model = load_model(str(folder), B, case.dtype, case.quantize)
    cfg = TrainConfig(model=str(folder), data="x", rank=case.rank, alpha=16,
                      targets=case.targets, batch_size=case.batch, seq_len=case.seq,
                      grad_checkpoint=case.grad_checkpoint, pack=case.pack, dora=case.dora,
                      compile=case.compile)
    lora.attach(model, cfg.lora_config(), seed=0)
    rows = case.batch * (2 if method == "dpo" else 1)
    if method == "dpo":
        from lorafit.core.examples import ExampleSet
        from lorafit.core.preference_data import PreferenceSet
        from lorafit.core.preference_train import PreferenceTrainer

        cfg.method, cfg.beta = "dpo", 0.1
        trainer = PreferenceTrainer(model, cfg, PreferenceSet("pairs", ExampleSet.from_examples(
            [])), run_dir=None)
    else:
        trainer = Trainer(model, cfg, [], run_dir=None)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, case.vocab, (rows, case.seq + 1))
    seg = None
    pos = np.broadcast_to(np.arange(case.seq), (rows, case.seq)).copy()
    mask = np.ones((rows, case.seq), np.float32)
    if method == "dpo":  # a shared prompt half, the loss on the completion half
        ids[case.batch:, :case.seq // 2] = ids[:case.batch, :case.seq // 2]
        mask[:, :case.seq // 2] = 0
    if case.pack:  # two examples per row
        half = case.seq // 2
        seg = np.zeros((rows, case.seq), np.int32)
        seg[:, half:] = 1
        pos[:, half:] -= half
    batch = Batch(ids[:, :-1], ids[:, 1:], mask, pos, seg)
    for _ in range(steps - 1):  # unmeasured: the profiler slows a torch step several times
        trainer.train_step([batch], 1e-3)
    return [B.measure_peak(lambda: trainer.train_step([batch], 1e-3))[1] - before
            for _ in range(measured)]


def main():
    from lorafit.core.estimate import estimate
    from lorafit.models import memory_shape

    root = Path(tempfile.mkdtemp())
    print("| case | backend | estimate MiB | measured MiB | error % |")
    print("|---|---|---|---|---|")
    for case in GRID:
        for backend in ("torch", "mlx"):
            est = estimate(memory_shape(case.config()), settings_for(case, backend))["total"]
            got = measure(case, backend, root)
            print(f"| {case.name} | {backend}-cpu | {est / 2**20:.1f} | {got / 2**20:.1f} | "
                  f"{100 * (est - got) / got:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
