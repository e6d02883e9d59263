"""The Metal suite: MLX on an Apple GPU against MLX on the CPU. Skipped where there is no
Metal device; run on a Mac with tests/gpu/run_metal.sh, which also runs the benchmark."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from conftest import build_hf_model, random_ids  # noqa: E402
from lorafit.models.loader import load_model  # noqa: E402

pytestmark = pytest.mark.gpu
if not mx.metal.is_available():
    pytest.skip("needs a Metal device (tests/gpu/run_metal.sh)", allow_module_level=True)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-3), ("bfloat16", 0.08)])
def test_metal_logits_track_the_cpu(tmp_path, tokenizer, dtype, tol):
    from lorafit.backends import get_backend

    folder, ref = build_hf_model(tmp_path / "m", "llama", tokenizer)
    ids = random_ids(ref.config.vocab_size, (2, 32))
    cpu = get_backend("mlx", "cpu")
    want = cpu.to_numpy(load_model(str(folder), cpu, "float32").logits(cpu.from_numpy(ids)))
    metal = get_backend("mlx", "metal")
    got = metal.to_numpy(load_model(str(folder), metal, dtype).logits(metal.from_numpy(ids)))
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


def test_training_on_metal_lowers_the_loss(tmp_path, tokenizer):
    import json

    from lorafit.commands.train import run_training
    from lorafit.core.config import TrainConfig

    folder, _ = build_hf_model(tmp_path / "m", "llama", tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "the quick brown fox jumps"}) + "\n"
                            for _ in range(16)))
    status = run_training(TrainConfig(model=str(folder), data=str(data), backend="mlx",
                                      device="metal", rank=4, batch_size=4, seq_len=32,
                                      lr=3e-3, max_steps=8, output=str(tmp_path / "o")),
                          sinks=[], install_signals=False)
    assert status == "completed"
