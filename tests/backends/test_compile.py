"""`--compile` on torch: the compiled layers train exactly as eager ones do, and one compiled
layer serves every layer and every batch length."""

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
    """Three batches of three lengths (unpacked batches are as long as their longest row)."""
    from lorafit.core.data import Batch

    rng = np.random.default_rng(0)
    out = []
    for t in (32, 24, 20):
        ids = rng.integers(3, 256, (2, t + 1))
        out.append(Batch(ids[:, :-1], ids[:, 1:], np.ones((2, t), np.float32),
                         np.broadcast_to(np.arange(t), (2, t)).copy()))
    return out


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, torch_backend):
    """Three steps of a 4-layer llama, its layers compiled by inductor and eager: the same
    losses and the same adapter (1e-5). Dynamo traces one graph in all, which layers 2-4
    share (the first layer, whose input carries no gradient, runs eagerly) with the batch's
    sizes symbolic: neither depth nor the other lengths compile anything more, nor the
    last step's recomputed layers (--grad-checkpoint runs the same compiled layer)."""
    import torch
    from torch._dynamo.utils import counters
    from memory_harness import Case, build_folder

    folder = build_folder(Case("compile", layers=4, hidden=64, intermediate=128, heads=2,
                               kv_heads=2, vocab=256, seq=32), tmp_path)
    runs = []
    torch._dynamo.reset()
    counters.clear()
    for compile in (False, True):
        tr = _trainer(folder, torch_backend, compile)
        losses = []
        for step, b in enumerate(_batches()):
            tr.cfg.grad_checkpoint = step == 2  # the last step recomputes its layers
            losses.append(tr.train_step([b], 1e-2)[0])
        runs.append((losses, {k: torch_backend.to_numpy(v) for k, v in tr.trainable.items()}))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["frames"] == {"total": 1, "ok": 1}, dict(counters["frames"])
    (eager, a_eager), (compiled, a_compiled) = runs
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    for k in a_eager:
        np.testing.assert_allclose(a_compiled[k], a_eager[k], rtol=1e-5, atol=1e-5)


def test_compile_without_a_cpp_compiler_is_one_line(monkeypatch, torch_backend):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(LorafitError, match="needs a C\\+\\+ compiler"):
        torch_backend.compile_forward(lambda x: x)


@pytest.mark.slow
def test_compiled_layers_take_the_query_blocks_eagerly(tmp_path, torch_backend, monkeypatch):
    """At 512 tokens causal attention runs in query blocks (backends/torch/causal_blocks),
    eagerly between a compiled layer's two graphs: the same losses and adapter as eager,
    with the blocks taken in every layer, recompute included."""
    import torch
    from lorafit.backends.torch import causal_blocks
    from lorafit.core.data import Batch
    from memory_harness import Case, build_folder

    folder = build_folder(Case("compile-blocks", layers=3, hidden=64, intermediate=128,
                               heads=2, kv_heads=1, vocab=256, seq=512), tmp_path)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(2):
        ids = rng.integers(3, 256, (1, 513))
        batches.append(Batch(ids[:, :-1], ids[:, 1:], np.ones((1, 512), np.float32),
                             np.arange(512)[None].copy()))
    calls = []
    real = causal_blocks.CausalBlocks.apply
    monkeypatch.setattr(causal_blocks.CausalBlocks, "apply",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    torch._dynamo.reset()
    runs = []
    for compile in (False, True):
        tr = _trainer(folder, torch_backend, compile)
        losses = []
        for step, b in enumerate(batches):
            tr.cfg.grad_checkpoint = step == 1  # the second step re-runs its layers
            losses.append(tr.train_step([b], 1e-2)[0])
        runs.append((losses, {k: torch_backend.to_numpy(v) for k, v in tr.trainable.items()}))
    assert len(calls) == 2 * 3 * (1 + 2)  # eager and compiled: 3 layers, step 2 re-run
    (eager, a_eager), (compiled, a_compiled) = runs
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    for k in a_eager:
        np.testing.assert_allclose(a_compiled[k], a_eager[k], rtol=1e-5, atol=1e-5)
