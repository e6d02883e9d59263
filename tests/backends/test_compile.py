"""`--compile` on torch: the compiled forward trains exactly as eager does."""

from __future__ import annotations

import numpy as np
import pytest

from lorafit.core.errors import LorafitError


def _trainer(folder, backend, compile):
    from lorafit.core import lora
    from lorafit.core.config import TrainConfig
    from lorafit.core.train import Trainer
    from lorafit.models.loader import load_model

    model = load_model(str(folder), backend)
    cfg = TrainConfig(model=str(folder), data="x", rank=4, alpha=8, batch_size=2, seq_len=32,
                      compile=compile)
    lora.attach(model, cfg.lora_config(), seed=0)
    return Trainer(model, cfg, [], run_dir=None)


def _batches():
    from lorafit.core.data import Batch

    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        ids = rng.integers(3, 256, (2, 33))
        out.append(Batch(ids[:, :-1], ids[:, 1:], np.ones((2, 32), np.float32),
                         np.broadcast_to(np.arange(32), (2, 32)).copy()))
    return out


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, torch_backend):
    """Three steps of a 2-layer llama, compiled by inductor and eager: the same losses
    and the same adapter (1e-5). One shape, so one compile."""
    from memory_harness import Case, build_folder

    folder = build_folder(Case("compile", hidden=64, intermediate=128, heads=2, kv_heads=2,
                               vocab=256, seq=32), tmp_path)
    runs = []
    for compile in (False, True):
        tr = _trainer(folder, torch_backend, compile)
        losses = [tr.train_step([b], 1e-2)[0] for b in _batches()]
        runs.append((losses, {k: torch_backend.to_numpy(v) for k, v in tr.trainable.items()}))
    (eager, a_eager), (compiled, a_compiled) = runs
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    for k in a_eager:
        np.testing.assert_allclose(a_compiled[k], a_eager[k], rtol=1e-5, atol=1e-5)


def test_compile_without_a_cpp_compiler_is_one_line(monkeypatch, torch_backend):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(LorafitError, match="needs a C\\+\\+ compiler"):
        torch_backend.compile_forward(lambda x: x)
