"""bench_train --family builds the named family's model (no timing here): a tiny one per
family, read by lorafit, and by mlx-lm from the copy it is given, with transformers'
logits (so each contender trains the same model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_train", ROOT / "tests/benchmarks/bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _settings(family, **kw):
    return SimpleNamespace(family=family, vocab=320, hidden=64, intermediate=None, heads=None,
                           kv_heads=None, layers=2, seq=16, batch=1, steps=1, warmup=0, **kw)


# family -> (model_type written, a config key its quirk sets)
FAMILIES = {"gemma4_text": ("gemma4_text", "hidden_size_per_layer_input"),
            "qwen3_5": ("qwen3_5_text", "linear_num_value_heads"),
            "qwen3_moe": ("qwen3_moe", "num_experts_per_tok")}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_that_model_for_every_contender(tmp_path, family):
    import torch
    import transformers

    from lorafit.backends import get_backend
    from lorafit.models.loader import load_model

    bench = _bench()
    a = _settings(family)
    bench.build(tmp_path, a)
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    model_type, quirk = FAMILIES[family]
    assert cfg["model_type"] == model_type and cfg.get(quirk)
    assert np.load(tmp_path / "batches.npy").shape == (1, 1, 17)

    ids = np.random.default_rng(0).integers(3, 320, (1, 16))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    ops = get_backend("torch")
    got = ops.to_numpy(load_model(str(tmp_path / "model"), ops).logits(ops.from_numpy(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))

    path = bench.mlx_lm_folder(tmp_path, a)
    if model_type in bench.NO_MLX_LM:
        assert path is None
        return
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(path)
    out = np.array(model(mx.array(ids)).astype(mx.float32))
    np.testing.assert_allclose(out, want, atol=1e-4 * max(1.0, np.abs(want).max()))


def test_a_family_lorafit_does_not_train_is_its_error():
    from lorafit.core.errors import LorafitError

    with pytest.raises(LorafitError, match="bert"):
        _bench().family_config(_settings("bert"))
