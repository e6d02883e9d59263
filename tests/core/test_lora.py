"""LoRA against PEFT in both directions, merging, and torch-vs-mlx gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import random_ids, randomize_lora
from lorafit.core import adapter_io, lora
from lorafit.core.errors import LorafitError
from lorafit.core.lora import LoraConfig
from lorafit.models.loader import load_model

CASES = [  # (model_type, lorafit config, PEFT kwargs)
    ("llama", LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]),
     dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("qwen2", LoraConfig(r=8, alpha=16, targets="all-linear", rslora=True),
     dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    ("qwen3", LoraConfig(r=2, alpha=3, targets=["o_proj", "down_proj"], layers=[1]),
     dict(r=2, lora_alpha=3, target_modules=["o_proj", "down_proj"], layers_to_transform=[1])),
]


def peft_model(ref, peft_kwargs, seed=0):
    """A PEFT model over a copy of ref with random (non-zero) A and B."""
    from peft import LoraConfig as PeftConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(ref), PeftConfig(task_type="CAUSAL_LM", **peft_kwargs))
    return randomize_lora(pm, seed)


def peft_logits(pm, ids):
    with torch.no_grad():
        return pm(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("model_type,cfg,peft_kwargs", CASES)
def test_peft_adapter_loads_in_lorafit(tmp_path, tiny_models, backend, model_type, cfg,
                                       peft_kwargs):
    folder, ref = tiny_models[model_type]
    pm = peft_model(ref, peft_kwargs)
    pm.save_pretrained(str(tmp_path))
    ids = random_ids(ref.config.vocab_size)
    expected = peft_logits(pm, ids)

    read_cfg, adapter = adapter_io.load_peft(tmp_path)
    assert read_cfg.scale == pytest.approx(cfg.scale)
    model = load_model(str(folder), backend)
    lora.attach(model, read_cfg, adapter)
    got = backend.to_numpy(model.logits(backend.from_numpy(ids)))
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected - peft_logits(ref, ids)).max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("model_type,cfg,peft_kwargs", CASES)
def test_lorafit_adapter_loads_in_peft(tmp_path, tiny_models, torch_backend, model_type, cfg,
                                       peft_kwargs):
    from peft import PeftModel

    folder, ref = tiny_models[model_type]
    model = load_model(str(folder), torch_backend)
    names = lora.attach(model, cfg, seed=1)
    rng = np.random.default_rng(2)
    adapter = {k: rng.normal(0, 0.2, model.params[k].shape).astype(np.float32) for k in names}
    lora.detach(model)
    lora.attach(model, cfg, adapter)
    adapter_io.save_peft(tmp_path, adapter, cfg, str(folder),
                         num_layers=model.args.num_hidden_layers)
    ids = random_ids(ref.config.vocab_size)
    ours = torch_backend.to_numpy(model.logits(torch_backend.from_numpy(ids)))

    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path))
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file
    saved = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    expected_keys = set(get_peft_model_state_dict(pm).keys())
    assert saved == expected_keys  # no missing, no unexpected keys
    assert np.abs(peft_logits(pm.eval(), ids) - ours).max() <= 1e-4


def test_trainable_summary_matches_peft(tiny_models, torch_backend):
    folder, ref = tiny_models["qwen2"]
    _, cfg, peft_kwargs = CASES[1]
    model = load_model(str(folder), torch_backend)
    lora.attach(model, cfg)
    trainable, total = peft_model(ref, peft_kwargs).get_nb_trainable_parameters()
    assert lora.count_params(model.params) == (trainable, total)
    assert lora.summary(model.params) == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f}")


def test_init_matches_peft_default_distribution(tiny_models, torch_backend):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) like PEFT's kaiming_uniform(a=sqrt(5)); B = 0."""
    folder, ref = tiny_models["llama"]
    model = load_model(str(folder), torch_backend)
    names = lora.attach(model, LoraConfig(r=16, targets="all-linear"), seed=0)
    a = torch_backend.to_numpy(model.params["model.layers.0.mlp.down_proj.lora_A.weight"])
    bound = 1 / np.sqrt(a.shape[1])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert all(not torch_backend.to_numpy(model.params[n]).any() for n in names
               if n.endswith("lora_B.weight"))
    pm = peft_model(ref, dict(r=16, target_modules="all-linear"))
    peft_a = dict(pm.named_parameters())[
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"]
    assert peft_a.shape == a.shape


def test_merge_equals_unmerged_and_unmerge_restores(tiny_models, backend):
    folder, ref = tiny_models["llama"]
    model = load_model(str(folder), backend)
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear")
    names = lora.attach(model, cfg)
    rng = np.random.default_rng(0)
    adapter = {k: rng.normal(0, 0.2, model.params[k].shape).astype(np.float32) for k in names}
    lora.detach(model)
    base_q = backend.to_numpy(model.params["model.layers.0.self_attn.q_proj.weight"])
    lora.attach(model, cfg, adapter)
    ids = backend.from_numpy(random_ids(ref.config.vocab_size))
    unmerged = backend.to_numpy(model.logits(ids))
    lora.merge(model)
    assert not lora.adapter_leaves(model.params)
    merged = backend.to_numpy(model.logits(ids))
    assert np.abs(merged - unmerged).max() <= 1e-4
    lora.unmerge(model, adapter, cfg)
    restored = backend.to_numpy(model.params["model.layers.0.self_attn.q_proj.weight"])
    assert np.abs(restored - base_q).max() <= 1e-5
    assert np.abs(backend.to_numpy(model.logits(ids)) - unmerged).max() <= 1e-4


def test_merge_refuses_non_finite(tiny_models, torch_backend):
    folder, _ = tiny_models["llama"]
    model = load_model(str(folder), torch_backend)
    names = lora.attach(model, LoraConfig(r=2))
    bad = {k: np.full(model.params[k].shape, np.nan, np.float32) for k in names}
    lora.detach(model)
    lora.attach(model, LoraConfig(r=2), bad)
    with pytest.raises(LorafitError, match="non-finite"):
        lora.merge(model)


def test_torch_and_mlx_same_loss_and_lora_grads(tiny_models, torch_backend, mlx_backend):
    from lorafit.core.data import Batch
    from lorafit.core.loss import batch_loss

    folder, ref = tiny_models["qwen3"]
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, ref.config.vocab_size, (2, 16))
    targets = np.roll(ids, -1, axis=1)
    mask = (rng.random((2, 16)) > 0.3).astype(np.float32)
    pos = np.broadcast_to(np.arange(16), (2, 16)).copy()
    results = []
    for B in (torch_backend, mlx_backend):
        model = load_model(str(folder), B)
        names = lora.attach(model, cfg, seed=5)
        # non-zero B so that every gradient is non-trivial
        adapter = {k: np.random.default_rng(1).normal(0, 0.1, model.params[k].shape)
                   .astype(np.float32) for k in names}
        lora.detach(model)
        lora.attach(model, cfg, adapter)
        train = {k: model.params[k] for k in names}
        frozen = {k: v for k, v in model.params.items() if k not in train}
        arrays = Batch(ids, targets, mask, pos).on(B)

        def loss_fn(tr, arr):
            s, n = batch_loss(B, model, {**frozen, **tr}, arr, False)
            return s / n, s
        (loss, _), grads = B.value_and_grad(loss_fn)(train, arrays)
        results.append((B.to_float(loss), {k: B.to_numpy(g) for k, g in grads.items()}))
    (l_t, g_t), (l_m, g_m) = results
    assert l_t == pytest.approx(l_m, rel=1e-4)
    assert set(g_t) == set(g_m)
    for k in g_t:
        np.testing.assert_allclose(g_m[k], g_t[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(np.abs(g).max() > 0 for g in g_t.values())
