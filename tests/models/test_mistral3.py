"""The text tower of a Mistral 3 vision-language checkpoint, loaded for text-only training:
built by transformers (Mistral3ForConditionalGeneration with a tiny Pixtral tower and a
ministral3 text model), its text logits are transformers' on both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_ids
from lorafit.core import lora
from lorafit.core.lora import LoraConfig
from lorafit.models.loader import load_model


def build_mistral3(folder, vocab_size: int, tie: bool):
    import transformers

    torch.manual_seed(0)
    text = dict(model_type="ministral3", vocab_size=vocab_size, hidden_size=64,
                intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                tie_word_embeddings=False, rope_parameters=dict(
                    rope_type="yarn", rope_theta=1e4, factor=4.0,
                    original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0,
                    mscale=1.0, mscale_all_dim=0.5, llama_4_scaling_beta=0.1))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=48,
                  num_hidden_layers=1, num_attention_heads=2, head_dim=16, image_size=32,
                  patch_size=8)
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision,
                                      tie_word_embeddings=tie)
    model = transformers.Mistral3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_mistral3_text_tower_logits_equal_transformers(tmp_path, backend, tie):
    ref = build_mistral3(tmp_path, 320, tie)
    ids = random_ids(320, (2, 24), seed=11)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.float().numpy()
    model = load_model(str(tmp_path), backend)
    assert model.args.tie_word_embeddings == tie
    assert model.args.model_type == "mistral3" and model.args.query_position_scale
    assert not any("vision" in k or "projector" in k for k in model.params)
    got = backend.to_numpy(model.logits(backend.from_numpy(ids)))
    scale = max(1.0, float(np.abs(want).max()))
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * scale
    lora.attach(model, LoraConfig(r=4, alpha=8, targets="all-linear"))  # trains as a text LM


def test_mistral3_adapters_are_peft_adapters_of_the_wrapper(tmp_path, torch_backend):
    """lorafit's adapter loads in PEFT over Mistral3ForConditionalGeneration with exactly
    PEFT's keys (text layers under model.language_model., nothing on the vision tower) and
    gives lorafit's logits; PEFT's own adapter of the wrapper loads back in lorafit."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    from conftest import peft_logits_checking_keys, randomize_lora
    from lorafit.core import adapter_io

    ref = build_mistral3(tmp_path / "m", 320, tie=False)
    ids = random_ids(320, (1, 12), seed=3)
    model = load_model(str(tmp_path / "m"), torch_backend, "float32")
    cfg = LoraConfig(r=4, alpha=8, targets="all-linear", layers=[1])
    names = lora.attach(model, cfg, seed=1)
    rng = np.random.default_rng(0)
    adapter = {k: rng.normal(0, 0.2, model.params[k].shape).astype(np.float32) for k in names}
    lora.detach(model)
    lora.attach(model, cfg, adapter)
    ours = torch_backend.to_numpy(model.logits(torch_backend.from_numpy(ids)))
    adapter_io.save_peft(tmp_path / "ad", adapter, cfg, str(tmp_path / "m"), 2)
    peft = peft_logits_checking_keys(ref, tmp_path / "ad", ids)
    assert np.abs(peft - ours).max() <= 1e-4 * np.abs(ours).max()
    assert np.abs(peft - ref(input_ids=torch.tensor(ids)).logits.detach().numpy()).max() > 1e-3

    pm = randomize_lora(get_peft_model(ref, PeftConfig(
        r=4, lora_alpha=8, target_modules=r"model\.language_model\..*\.(q_proj|down_proj)")))
    pm.save_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids)).logits.numpy()
    lora.detach(model)
    lora.attach(model, *adapter_io.load_peft(tmp_path / "theirs"))
    got = torch_backend.to_numpy(model.logits(torch_backend.from_numpy(ids)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
