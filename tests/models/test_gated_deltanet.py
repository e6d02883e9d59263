"""qwen3_5 / qwen3_next specifics beyond the family table: the published vision-language
checkpoint layout loads as its text model, packed examples stay apart through the
linear-attention layers, and a qwen3_5_moe vision-language checkpoint loads its experts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build_hf_model, random_ids
from lorafit.models.loader import load_model

TINY = dict(num_hidden_layers=3, head_dim=32,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
            linear_value_head_dim=8)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, tokenizer):
    return build_hf_model(tmp_path_factory.mktemp("qwen3_5_text"), "qwen3_5_text", tokenizer,
                          **TINY)[0]


def test_vision_language_checkpoint_loads_as_its_text_model(text_model, backend, tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((text_model / "config.json").read_text())
    weights = load_file(str(text_model / "model.safetensors"))
    vl = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
          for k, v in weights.items()}
    vl["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3), np.float32)
    vl["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    save_file(vl, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_5", "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
         "text_config": cfg, "vision_config": {"depth": 1}}))
    ids = random_ids(cfg["vocab_size"], (1, 20), seed=3)
    want = backend.to_numpy(load_model(str(text_model), backend).logits(backend.from_numpy(ids)))
    got = backend.to_numpy(load_model(str(tmp_path), backend).logits(backend.from_numpy(ids)))
    np.testing.assert_array_equal(got, want)


def test_packed_examples_do_not_meet_in_the_linear_attention(text_model, backend):
    ops = backend
    m = load_model(str(text_model), ops)
    a, b = random_ids(m.args.vocab_size, (1, 30), 1), random_ids(m.args.vocab_size, (1, 50), 2)
    pos = np.concatenate([np.arange(30), np.arange(50)])[None]
    seg = np.array([[0] * 30 + [1] * 50], np.int32)
    packed = ops.to_numpy(m.hidden(ops.from_numpy(np.concatenate([a, b], 1)),
                                   ops.from_numpy(pos), segment_ids=ops.from_numpy(seg)))
    for ids, p, sl in ((a, pos[:, :30], slice(0, 30)), (b, pos[:, 30:], slice(30, 80))):
        alone = ops.to_numpy(m.hidden(ops.from_numpy(ids), ops.from_numpy(p)))
        np.testing.assert_allclose(packed[:, sl], alone, rtol=1e-5, atol=1e-5)


def test_qwen3_5_moe_vision_language_checkpoint_loads_as_its_text_model(tmp_path, tokenizer,
                                                                       torch_backend):
    """The published qwen3_5_moe layout: text_config, weights under model.language_model
    with per-expert tensors (transformers' save), besides a vision tower."""
    from safetensors.numpy import load_file, save_file

    text, ref = build_hf_model(tmp_path / "text", "qwen3_5_moe_text", tokenizer, **TINY,
                               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                               shared_expert_intermediate_size=16)
    cfg = json.loads((text / "config.json").read_text())
    weights = load_file(str(text / "model.safetensors"))
    assert any(".mlp.experts.0.gate_proj." in k for k in weights)
    vl = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
          for k, v in weights.items()}
    vl["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3), np.float32)
    (tmp_path / "vl").mkdir()
    save_file(vl, str(tmp_path / "vl" / "model.safetensors"))
    (tmp_path / "vl" / "config.json").write_text(json.dumps(
        {"model_type": "qwen3_5_moe", "tie_word_embeddings": False, "text_config": cfg,
         "vision_config": {"depth": 1}}))
    ops = torch_backend
    ids = random_ids(cfg["vocab_size"], (1, 20), seed=3)
    want = ops.to_numpy(load_model(str(text), ops).logits(ops.from_numpy(ids)))
    m = load_model(str(tmp_path / "vl"), ops)
    assert m.args.num_local_experts == 4 and m.args.shared_expert_size == 16
    np.testing.assert_array_equal(ops.to_numpy(m.logits(ops.from_numpy(ids))), want)
