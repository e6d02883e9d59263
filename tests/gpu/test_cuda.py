"""The GPU suite: what only a CUDA device can show. Skipped where there is none; run on a
GPU machine with tests/gpu/run.sh, which also prints the benchmark tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_hf_model, random_ids
from lorafit.models.loader import load_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():  # a Metal machine runs the gpu marker too, but not these
    pytest.skip("needs a CUDA device (tests/gpu/run.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def cuda():
    from lorafit.backends import get_backend
    return get_backend("torch", "cuda")


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_bf16_logits_on_cuda_track_fp32_on_cpu(tmp_path, tokenizer, cuda, model_type):
    folder, ref = build_hf_model(tmp_path / model_type, model_type, tokenizer)
    ids = random_ids(ref.config.vocab_size, (2, 32))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    model = load_model(str(folder), cuda, "bfloat16")
    got = cuda.to_numpy(model.logits(cuda.from_numpy(ids)))
    assert np.abs(got - want).max() <= 0.05 * max(1.0, np.abs(want).max())


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


@pytest.mark.parametrize("batch,seq,recompute", [(1, 512, False), (4, 256, True)])
def test_estimate_within_10_percent_of_the_cuda_peak(tmp_path, cuda, batch, seq, recompute):
    """The CUDA overhead constants (context, allocator slack) checked against the
    allocator's own peak for real steps."""
    from memory_harness import Case, measure, settings_for

    from lorafit.core.estimate import estimate
    from lorafit.models import memory_shape

    case = Case(f"cuda-{batch}x{seq}", batch=batch, seq=seq, grad_checkpoint=recompute)
    measured = measure(case, "torch", tmp_path, device="cuda")
    predicted = estimate(memory_shape(case.config()),
                         settings_for(case, "torch", device="cuda"))["total"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)
