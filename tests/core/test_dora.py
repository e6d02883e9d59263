"""DoRA against PEFT's use_dora: logits, gradients, merging, and the adapter formats."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import mlx_lm_logits, peft_logits_checking_keys, random_ids
from lorafit.core import adapter_io, lora
from lorafit.core.data import Batch
from lorafit.core.loss import batch_loss
from lorafit.models.loader import load_model

PEFT_KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
               use_dora=True)


def make_peft_dora(tiny_models, tmp_path_factory, model_type):
    """A PEFT DoRA model with random A, B and perturbed magnitudes, saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    folder, ref = tiny_models[model_type]
    pm = get_peft_model(copy.deepcopy(ref), LoraConfig(task_type="CAUSAL_LM", **PEFT_KW))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("peft-dora")
    pm.save_pretrained(str(out))
    return folder, pm.eval(), out


@pytest.fixture(scope="module")
def peft_dora(tiny_models, tmp_path_factory):
    """qwen2: its q/k/v biases exercise DoRA's bias handling."""
    return make_peft_dora(tiny_models, tmp_path_factory, "qwen2")


@pytest.fixture(scope="module")
def peft_dora_mistral(tiny_models, tmp_path_factory):
    """mistral: mlx-lm reads this family's transformers-v5 config exactly (for qwen2 it
    falls back to another rope_theta, so its own base logits differ by ~2e-3)."""
    return make_peft_dora(tiny_models, tmp_path_factory, "mistral")


def peft_loss_and_grads(pm, ids, targets, mask):
    pm.zero_grad()
    logits = pm(torch.tensor(ids)).logits
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               torch.tensor(targets).reshape(-1),
                                               reduction="none")
    m = torch.tensor(mask).reshape(-1)
    loss = (losses * m).sum() / m.sum()
    loss.backward()
    grads = {}
    for name, p in pm.named_parameters():
        if p.grad is not None:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            grads[key] = p.grad.numpy().copy()
    return float(loss), grads


def test_peft_dora_adapter_gives_the_same_logits_and_gradients(peft_dora, backend):
    folder, pm, saved = peft_dora
    cfg, adapter = adapter_io.load_peft(saved)
    assert cfg.dora and any(k.endswith("lora_magnitude_vector") for k in adapter)
    model = load_model(str(folder), backend)
    names = lora.attach(model, cfg, adapter)
    rng = np.random.default_rng(0)
    ids = random_ids(pm.config.vocab_size, (2, 12))
    targets = np.roll(ids, -1, axis=1)
    mask = (rng.random(ids.shape) > 0.2).astype(np.float32)
    with torch.no_grad():
        expected = pm(torch.tensor(ids)).logits.numpy()
    B = backend
    got = B.to_numpy(model.logits(B.from_numpy(ids)))
    assert np.abs(got - expected).max() <= 1e-4

    ref_loss, ref_grads = peft_loss_and_grads(pm, ids, targets, mask)
    train = {k: model.params[k] for k in names}
    frozen = {k: v for k, v in model.params.items() if k not in train}
    pos = np.broadcast_to(np.arange(12), ids.shape).copy()
    arrays = Batch(ids, targets, mask, pos).on(B)

    def loss_fn(tr, arr):
        s, n = batch_loss(B, model, {**frozen, **tr}, arr, False)
        return s / n, s
    (loss, _), grads = B.value_and_grad(loss_fn)(train, arrays)
    assert B.to_float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads)
    for k, g in grads.items():
        np.testing.assert_allclose(B.to_numpy(g), ref_grads[k], rtol=1e-3, atol=1e-6,
                                   err_msg=k)


def test_merged_dora_equals_unmerged(peft_dora, backend):
    folder, pm, saved = peft_dora
    cfg, adapter = adapter_io.load_peft(saved)
    model = load_model(str(folder), backend)
    lora.attach(model, cfg, adapter)
    ids = backend.from_numpy(random_ids(pm.config.vocab_size))
    unmerged = backend.to_numpy(model.logits(ids))
    lora.merge(model)
    assert np.abs(backend.to_numpy(model.logits(ids)) - unmerged).max() <= 1e-4


def test_lorafit_dora_adapter_loads_in_peft_and_mlx_lm(peft_dora_mistral, tmp_path):

    from lorafit.backends import get_backend
    from lorafit.commands.export import export_adapter

    folder, pm, saved = peft_dora_mistral
    cfg, adapter = adapter_io.load_peft(saved)
    out = adapter_io.save_peft(tmp_path / "ours", adapter, cfg, str(folder), num_layers=2)
    ids = random_ids(pm.config.vocab_size)
    B = get_backend("torch")
    model = load_model(str(folder), B)
    lora.attach(model, cfg, adapter)
    ours = B.to_numpy(model.logits(B.from_numpy(ids)))

    np.testing.assert_allclose(peft_logits_checking_keys(pm.get_base_model(), out, ids), ours,
                               atol=1e-4)

    mlx_dir = export_adapter(out, tmp_path / "mlx", "mlx-lm", None)
    np.testing.assert_allclose(mlx_lm_logits(folder, mlx_dir, ids), ours, atol=1e-4)
    back_cfg, back = adapter_io.load_any(mlx_dir)
    assert back_cfg.dora and all(np.array_equal(back[k], adapter[k]) for k in adapter)


def test_dora_flag_and_weights_that_disagree_are_one_line_errors(peft_dora, tmp_path, capsys):
    import json
    import shutil

    from lorafit.cli import main

    folder, _, saved = peft_dora
    bad = tmp_path / "bad"
    shutil.copytree(saved, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = False  # says plain LoRA, holds magnitudes
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    code = main(["generate", "--model", str(folder), "--adapter", str(bad), "--prompt", "x",
                 "--backend", "torch"])
    err = capsys.readouterr().err
    assert code == 2 and "use_dora=False" in err and "lora_magnitude_vector" in err
    # an mlx-lm adapter that claims DoRA but carries no magnitudes
    c, adapter = adapter_io.load_peft(saved)
    plain = {k: v for k, v in adapter.items() if not k.endswith("lora_magnitude_vector")}
    out = adapter_io.save_mlx_lm(tmp_path / "mlx", plain, lora.LoraConfig(r=c.r, alpha=c.alpha,
                                 targets=c.targets), num_layers=2)
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["fine_tune_type"] = "dora"
    (out / "adapter_config.json").write_text(json.dumps(meta))
    code = main(["generate", "--model", str(folder), "--adapter", str(out), "--prompt", "x",
                 "--backend", "torch"])
    err = capsys.readouterr().err
    assert code == 2 and "lack DoRA magnitudes" in err and len(err.strip().splitlines()) <= 2
