"""Issue 12 item 12: float16 base weights train with dynamic loss scaling; bfloat16 is
preferred where the device has it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from lorafit.core import events as ev
from lorafit.core.config import TrainConfig
from lorafit.core.loss_scale import DynamicLossScale


def test_the_scale_halves_on_overflow_and_grows_after_a_streak():
    s = DynamicLossScale(scale=1024, growth_interval=3, min_scale=1.0, max_scale=4096)
    assert s.update(False) is False and s.scale == 512
    assert [s.update(True) for _ in range(2)] == [True, True] and s.scale == 512
    assert s.update(True) and s.scale == 1024  # the third finite step in a row
    s.update(True), s.update(False)  # an overflow restarts the streak
    assert s.scale == 512 and s.good_steps == 0
    for _ in range(30):
        s.update(True)
    assert s.scale == 4096  # capped
    for _ in range(20):
        s.update(False)
    assert s.scale == 1.0 and s.at_floor
    t = DynamicLossScale()
    t.load({"scale": 64.0, "good_steps": 5})
    assert t.state() == {"scale": 64.0, "good_steps": 5}
    t.load({"scale": "nan"})  # a damaged state keeps the current scale
    assert t.scale == 64.0


@pytest.fixture(scope="module")
def small_head(tmp_path_factory, tokenizer):
    """A model whose output layer is 1e-5 of its usual size: every gradient reaching the
    float16 layers is below float16's smallest subnormal (6e-8)."""
    from safetensors.numpy import load_file, save_file

    from conftest import build_hf_model, write_prompt_completion_data

    root = tmp_path_factory.mktemp("ls")
    folder, _ = build_hf_model(root / "model", "llama", tokenizer, num_hidden_layers=2,
                               hidden_size=32, intermediate_size=64, rope_scaling=None)
    w = load_file(folder / "model.safetensors")
    w["lm_head.weight"] = (w["lm_head.weight"] * 1e-5).astype(np.float32)
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})
    return root, folder, write_prompt_completion_data(root / "train.jsonl", 16)


def _trainer(setup, out, **kw):
    from lorafit.commands.train import build_trainer

    root, folder, data = setup
    base = dict(model=str(folder), data=str(data), output=str(root / out), device="cpu",
                rank=4, alpha=8, batch_size=4, lr=1e-3, max_steps=4, seq_len=32,
                targets="q_proj,v_proj")
    base.update(kw)
    return build_trainer(TrainConfig(**base), [], report=lambda t: None)


def _first_grad_norm(trainer) -> float:
    try:
        loss, gnorm, applied = trainer.train_step(trainer._next_micro_batches(), 1e-3)
        assert applied and math.isfinite(loss)
        return gnorm
    finally:
        trainer.lock.release()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_float16_gradients_underflow_without_scaling_and_survive_with_it(small_head, backend):
    ref = _first_grad_norm(_trainer(small_head, f"{backend}-32", backend=backend,
                                    dtype="float32"))
    unscaled = _trainer(small_head, f"{backend}-16u", backend=backend, dtype="float16")
    assert unscaled.loss_scale is not None  # float16 weights get a scaler by default
    unscaled.loss_scale = None
    scaled = _trainer(small_head, f"{backend}-16s", backend=backend, dtype="float16")
    assert ref > 1e-7
    assert _first_grad_norm(unscaled) == 0.0  # every gradient lost
    assert _first_grad_norm(scaled) == pytest.approx(ref, rel=0.1)
    fp32 = _trainer(small_head, f"{backend}-32b", backend=backend, dtype="float32")
    fp32.lock.release()
    assert fp32.loss_scale is None


def test_an_overflow_is_skipped_and_the_scale_halved_without_stopping_the_run(tiny_run):
    """A scale far too large: the first steps overflow in float16; each is skipped (not
    counted as a bad step even with max_nonfinite=1), the scale halves until the steps
    apply, and a checkpoint keeps the scale for a resume."""
    root, folder, data = tiny_run

    class Recorder(list, ev.Sink):
        def __call__(self, e):
            self.append(e)

    rec = Recorder()
    cfg = TrainConfig(model=str(folder), data=str(data), output=str(root / "overflow"),
                      backend="torch", device="cpu", rank=4, alpha=8, batch_size=4,
                      lr=1e-3, max_steps=14, seq_len=32, dtype="float16", max_nonfinite=1)
    from lorafit.commands.train import build_trainer

    trainer = build_trainer(cfg, [rec], report=lambda t: None)
    trainer.loss_scale = DynamicLossScale(scale=2.0 ** 24)
    try:
        assert trainer.run() == "completed"
    finally:
        for s in trainer.sinks:
            s.close()
    skipped = [e for e in rec if isinstance(e, ev.StepSkipped)]
    applied = [e for e in rec if isinstance(e, ev.StepReport)]
    assert skipped and all("overflow" in e.reason and e.in_a_row == 0 for e in skipped)
    assert applied and all(math.isfinite(e.grad_norm) for e in applied)
    assert trainer.loss_scale.scale == 2.0 ** 24 / 2 ** len(skipped)
    import json

    from lorafit.core import rundir

    state = json.loads((rundir.checkpoint_path(root / "overflow", 14) /
                        "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] == trainer.loss_scale.scale
    resumed = build_trainer(cfg, [], resume=True, report=lambda t: None)
    resumed.lock.release()
    assert resumed.loss_scale.scale == trainer.loss_scale.scale


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    from conftest import build_hf_model, write_prompt_completion_data

    root = tmp_path_factory.mktemp("ls-run")
    folder, _ = build_hf_model(root / "model", "llama", tokenizer, num_hidden_layers=2,
                               hidden_size=32, intermediate_size=64, rope_scaling=None)
    return root, folder, write_prompt_completion_data(root / "train.jsonl", 16)


def test_training_prefers_bf16_to_fp16_where_the_device_has_it():
    from lorafit.models.loader import training_dtype

    fp16_ckpt = SimpleNamespace(torch_dtype="float16")
    gpu = SimpleNamespace(device="cuda", bf16_native=True)
    old_gpu = SimpleNamespace(device="cuda", bf16_native=False)  # e.g. a T4 or V100
    cpu = SimpleNamespace(device="cpu", bf16_native=False)
    assert training_dtype(gpu, fp16_ckpt) == "bfloat16"
    assert training_dtype(old_gpu, fp16_ckpt) == "float16"  # then the loss is scaled
    assert training_dtype(cpu, fp16_ckpt) == "float32"
    assert training_dtype(gpu, SimpleNamespace(torch_dtype="float32")) == "bfloat16"


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_bf16_base_trains_fp32_adapters_and_fp32_optimizer_state(tiny_run, backend):
    """Mixed precision as documented (docs/architecture.md, Precision): the frozen base in
    bfloat16, the adapter's master weights, its gradients and AdamW's moments in float32,
    no loss scale; one step moves the adapter."""
    trainer = _trainer(tiny_run, f"{backend}-bf16", backend=backend, dtype="bfloat16",
                       max_steps=1)
    try:
        ops = trainer.ops
        assert trainer.loss_scale is None
        assert {ops.dtype_name(v) for v in trainer.frozen.values()
                if ops.dtype_name(v) not in ("int32", "int64", "bool")} == {"bfloat16"}
        assert {ops.dtype_name(v) for v in trainer.trainable.values()} == {"float32"}
        before = {k: ops.to_numpy(v).copy() for k, v in trainer.trainable.items()}
        loss, gnorm, applied = trainer.train_step(trainer._next_micro_batches(), 1e-3)
        assert applied and math.isfinite(loss) and gnorm > 0
        state = trainer.optimizer.state_to_numpy()
        moments = [v for k, v in state.items() if k.startswith("exp_avg")]
        assert moments and {v.dtype for v in moments} == {np.dtype(np.float32)}
        assert {ops.dtype_name(v) for v in trainer.trainable.values()} == {"float32"}
        assert any(np.abs(ops.to_numpy(trainer.trainable[k]) - before[k]).max() > 0
                   for k in before)
    finally:
        trainer.lock.release()
