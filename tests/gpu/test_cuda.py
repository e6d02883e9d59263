"""The GPU suite: what only a CUDA device can show. Skipped where there is none; run on a
GPU machine with tests/gpu/run.sh, which also prints the benchmark tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import FAMILIES, build_hf_model, random_ids
from lorafit.models.loader import load_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():  # a Metal machine runs the gpu marker too, but not these
    pytest.skip("needs a CUDA device (tests/gpu/run.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def cuda():
    from lorafit.backends import get_backend
    return get_backend("torch", "cuda")


def _loss_and_grads(backend, folder, dtype, ids, quantize=None):
    """lorafit's own training objective on `ids` with a random non-zero LoRA on all-linear:
    (loss per token, {adapter leaf: gradient as float32 numpy})."""
    from lorafit.core import lora
    from lorafit.core.data import Batch
    from lorafit.core.loss import batch_loss

    model = load_model(str(folder), backend, dtype, quantize)
    cfg = lora.LoraConfig(r=8, alpha=16, targets="all-linear")
    adapter = lora.init_adapter(cfg, model.parameter_shapes(), model.linear_modules(), 0)
    rng = np.random.default_rng(1)
    adapter = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.05
               for k, v in adapter.items()}
    names = lora.attach(model, cfg, adapter)
    frozen = {k: v for k, v in model.params.items() if k not in names}
    inp, tgt = ids[:, :-1], ids[:, 1:]
    batch = Batch(input_ids=inp, targets=tgt, loss_mask=np.ones(inp.shape, np.float32),
                  positions=np.broadcast_to(np.arange(inp.shape[1]), inp.shape).copy(),
                  segment_ids=None).on(backend, 1)

    def loss(trainable):
        total, n = batch_loss(backend, model, {**frozen, **trainable}, batch, False)
        return total / n, None

    (value, _), grads = backend.value_and_grad(loss)({k: model.params[k] for k in names})
    return backend.to_float(value), {k: backend.to_numpy(g) for k, g in grads.items()}


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-3), ("bfloat16", 0.08)])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_logits_and_gradients_on_cuda_track_fp32_on_cpu(tmp_path, tokenizer, cuda, model_type,
                                                        dtype, tol):
    """Every family: CUDA logits against transformers on the CPU, and lorafit's loss and
    adapter gradients on CUDA against lorafit's on the CPU in float32 (relative to the
    largest value; bf16 base weights with fp32 adapters get the looser tolerance)."""
    from lorafit.backends import get_backend

    folder, ref = build_hf_model(tmp_path / model_type, model_type, tokenizer)
    ids = random_ids(ref.config.vocab_size, (2, 33))
    with torch.no_grad():
        want = ref(torch.tensor(ids[:, :-1])).logits.numpy()
    model = load_model(str(folder), cuda, dtype)
    got = cuda.to_numpy(model.logits(cuda.from_numpy(ids[:, :-1])))
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())
    cpu_loss, cpu_grads = _loss_and_grads(get_backend("torch", "cpu"), folder, "float32", ids)
    gpu_loss, gpu_grads = _loss_and_grads(cuda, folder, dtype, ids)
    assert gpu_loss == pytest.approx(cpu_loss, rel=tol)
    for k, g in cpu_grads.items():
        assert gpu_grads[k].dtype == np.float32  # fp32 adapter gradients over any base
        assert np.abs(gpu_grads[k] - g).max() <= tol * max(1e-6, np.abs(g).max()), k


def test_qlora_on_cuda_tracks_the_dequantized_model(tmp_path, tokenizer, cuda):
    """NF4 frozen weights on CUDA (bitsandbytes' CUDA kernels): the loss and adapter
    gradients equal the same step on the CPU over the same NF4 weights."""
    from lorafit.backends import get_backend

    folder, ref = build_hf_model(tmp_path / "q", "llama", tokenizer)
    ids = random_ids(ref.config.vocab_size, (2, 33))
    cpu_loss, cpu_grads = _loss_and_grads(get_backend("torch", "cpu"), folder, "float32", ids,
                                          "4bit")
    gpu_loss, gpu_grads = _loss_and_grads(cuda, folder, "float32", ids, "4bit")
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-2)
    for k, g in cpu_grads.items():
        assert np.abs(gpu_grads[k] - g).max() <= 2e-2 * max(1e-6, np.abs(g).max()), k


def test_adamw_is_fused_on_cuda(cuda):
    params = {"a": cuda.from_numpy(np.ones((4, 4), np.float32))}
    assert cuda.make_optimizer(params).opt.defaults["fused"] is True


def test_training_resumes_exactly_with_fused_adamw_on_cuda(tmp_path, tokenizer):
    """The optimizer is fused on CUDA; a resumed run must take its first step (the
    restored `step` state has to live where the fused kernel expects it)."""
    import json

    from lorafit.commands.train import run_training
    from lorafit.core.config import TrainConfig

    folder, _ = build_hf_model(tmp_path / "m", "llama", tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} of the quick brown fox"}) + "\n"
                            for i in range(32)))
    common = dict(model=str(folder), data=str(data), backend="torch", device="cuda",
                  rank=4, batch_size=4, seq_len=32, lr=1e-3, seed=0, save_every=2)
    run_training(TrainConfig(output=str(tmp_path / "full"), max_steps=6, **common), sinks=[],
                 install_signals=False)
    run_training(TrainConfig(output=str(tmp_path / "half"), max_steps=3, **common), sinks=[],
                 install_signals=False)
    status = run_training(TrainConfig(output=str(tmp_path / "half"), max_steps=6, **common),
                          sinks=[], resume=True, install_signals=False)
    assert status == "completed"


@pytest.mark.parametrize("batch,seq,recompute,dtype,quantize", [
    (1, 512, False, "float32", None), (4, 256, True, "float32", None),
    (2, 512, False, "bfloat16", None), (2, 256, False, "bfloat16", "4bit")])
def test_estimate_within_10_percent_of_the_cuda_peak(tmp_path, cuda, batch, seq, recompute,
                                                     dtype, quantize):
    """The estimate against the allocator's own peak for real steps, 4 configs (fp32, with
    recomputation, bf16, QLoRA)."""
    from memory_harness import Case, measure, settings_for

    from lorafit.core.estimate import estimate
    from lorafit.models import memory_shape

    case = Case(f"cuda-{batch}x{seq}-{dtype}-{quantize}", batch=batch, seq=seq,
                grad_checkpoint=recompute, dtype=dtype, quantize=quantize)
    measured = measure(case, "torch", tmp_path, device="cuda")
    predicted = estimate(memory_shape(case.config()),
                         settings_for(case, "torch", device="cuda"))["total"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)
