"""Sparse MoE pieces beyond the family runner: the MXFP4 decode of gpt-oss checkpoints, the
router's load-balancing loss, and the fused (transformers v5 in-memory) expert layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_hf_model, random_ids
from lorafit.models.families.gpt_oss import mxfp4_dequantize
from lorafit.models.loader import load_model


def random_mxfp4(rng, shape):
    """blocks (E, R, G, 16) uint8 and scales (E, R, G) uint8 near 2^0."""
    blocks = rng.integers(0, 256, shape + (16,), dtype=np.uint8)
    scales = rng.integers(122, 130, shape, dtype=np.uint8)
    return blocks, scales


def test_mxfp4_decode_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4(np.random.default_rng(0), (3, 10, 2))
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                      dtype=torch.float32).numpy()
    got = mxfp4_dequantize(blocks, scales)
    assert got.shape == (3, 64, 10)
    np.testing.assert_array_equal(got, want)


def test_mxfp4_decode_by_hand():
    # byte 0x21: low nibble 1 -> 0.5, high nibble 2 -> 1.0; scale 128 -> * 2
    blocks = np.full((1, 1, 1, 16), 0x21, np.uint8)
    blocks[0, 0, 0, 0] = 0xF9  # low 9 -> -0.5, high 15 -> -6
    got = mxfp4_dequantize(blocks, np.full((1, 1, 1), 128, np.uint8))[0, :, 0]
    assert got[:4].tolist() == [-1.0, -12.0, 1.0, 2.0] and got.shape == (32,)


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_gpt_oss_mxfp4_checkpoint_loads_as_its_dense_twin(tmp_path, tokenizer, backend_name):
    from safetensors.torch import load_file, save_file

    from lorafit.backends import get_backend

    ops = get_backend(backend_name, "cpu")
    dense, ref = build_hf_model(tmp_path / "dense", "gpt_oss", tokenizer, num_local_experts=4,
                                num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                                sliding_window=5, hidden_size=64)
    rng = np.random.default_rng(1)
    weights = load_file(str(dense / "model.safetensors"))
    packed = dict(weights)
    for key in [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, i, o = weights[key].shape  # (E, in, out): blocks are (E, out, in/32, 16)
        blocks, scales = random_mxfp4(rng, (e, o, i // 32))
        scales = scales - 4  # weights of about 2^-4: a model whose logits stay moderate
        del packed[key]
        packed[key + "_blocks"] = torch.from_numpy(blocks)
        packed[key + "_scales"] = torch.from_numpy(scales)
        weights[key] = torch.from_numpy(mxfp4_dequantize(blocks, scales))
    save_file(weights, str(dense / "model.safetensors"), metadata={"format": "pt"})
    quant = tmp_path / "mxfp4"
    quant.mkdir()
    for f in dense.iterdir():
        if f.name != "model.safetensors":
            (quant / f.name).write_bytes(f.read_bytes())
    save_file(packed, str(quant / "model.safetensors"), metadata={"format": "pt"})
    ids = ops.from_numpy(random_ids(len(tokenizer), (1, 12), seed=3))
    a = ops.to_numpy(load_model(str(dense), ops).logits(ids))
    b = ops.to_numpy(load_model(str(quant), ops).logits(ids))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_equals_transformers(torch_backend):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from lorafit.models.blocks.moe import load_balancing_loss
    from lorafit.models.spec import ModelArgs

    a = ModelArgs("mixtral", 8, 8, 2, 2, 10, num_local_experts=6, num_experts_per_tok=2)
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(2 * 5, 6)).astype(np.float32) for _ in range(2)]
    mask = (rng.random((2, 5)) > 0.3).astype(np.int64)
    for m in (None, mask):
        want = load_balancing_loss_func(tuple(torch.from_numpy(z) for z in logits), 6, 2,
                                        None if m is None else torch.from_numpy(m))
        got = load_balancing_loss(torch_backend, a,
                                  [torch_backend.from_numpy(z) for z in logits], m)
        assert got == pytest.approx(float(want), rel=1e-5)


def test_fused_expert_layout_loads_like_the_per_expert_one(tmp_path, tokenizer, torch_backend):
    """transformers v5 holds mixtral's experts fused (mlp.experts.gate_up_proj); a folder
    with those names (what lorafit's merged export writes) loads to the same model."""
    ops = torch_backend
    folder, ref = build_hf_model(tmp_path / "hub", "mixtral", tokenizer, num_local_experts=4,
                                 num_experts_per_tok=2, intermediate_size=48)
    model = load_model(str(folder), ops)
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (fused / f.name).write_bytes(f.read_bytes())
    ops.save_safetensors(fused / "model.safetensors", model.params)
    assert any(k.endswith("experts.gate_up_proj") for k in model.params)
    ids = ops.from_numpy(random_ids(len(tokenizer), (1, 10), seed=1))
    np.testing.assert_allclose(ops.to_numpy(load_model(str(fused), ops).logits(ids)),
                               ops.to_numpy(model.logits(ids)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_training_forward_router_loss_equals_transformers_aux_loss(tmp_path, tokenizer,
                                                                   backend, model_type):
    """The load-balancing loss lorafit's training forward computes (core.loss, over the
    loss positions) equals transformers' aux_loss with output_router_logits over the same
    positions (its attention mask)."""
    from lorafit.core.data import Batch
    from lorafit.core.loss import batch_loss_with_router

    experts = dict(num_local_experts=4) if model_type == "mixtral" else dict(num_experts=4)
    folder, ref = build_hf_model(tmp_path, model_type, tokenizer, num_experts_per_tok=2,
                                 intermediate_size=48, output_router_logits=True, **experts)
    ids = random_ids(ref.config.vocab_size, (2, 32), seed=3)
    mask = np.ones(ids.shape, np.float32)
    mask[1, 25:] = 0  # a shorter second row: its padding counts in neither
    with torch.no_grad():
        want = float(ref(torch.tensor(ids), attention_mask=torch.tensor(mask).long()).aux_loss)
    model = load_model(str(folder), backend)
    batch = Batch(ids, ids, mask,
                  np.broadcast_to(np.arange(32), ids.shape).copy()).on(backend, 1)
    _, got = batch_loss_with_router(backend, model, dict(model.params), batch, False)
    assert backend.to_float(got) == pytest.approx(want, rel=1e-5)


def test_router_loss_is_reported_and_joins_the_loss_only_when_asked(tmp_path, tokenizer,
                                                                     torch_backend):
    from lorafit.core import events as ev
    from lorafit.core import lora
    from lorafit.core.config import TrainConfig
    from lorafit.core.examples import Example
    from lorafit.core.train import Trainer

    folder, ref = build_hf_model(tmp_path, "qwen3_moe", tokenizer, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=40)
    rng = np.random.default_rng(7)
    examples = [Example(rng.integers(3, ref.config.vocab_size, 20).astype(np.int32),
                        np.ones(20, bool), f"x:{i}") for i in range(8)]
    runs = {}
    for coef in (0.0, 1.0):
        model = load_model(str(folder), torch_backend)
        cfg = TrainConfig(model=str(folder), data="-", rank=4, alpha=8, batch_size=4, lr=5e-2,
                          max_steps=3, seq_len=20, seed=3, router_aux_loss_coef=coef)
        lora.attach(model, cfg.lora_config(), seed=cfg.seed)
        reports = []
        Trainer(model, cfg, examples, sinks=[lambda e: reports.append(e)
                                             if isinstance(e, ev.StepReport) else None]).run()
        runs[coef] = [(r.loss, r.router_aux_loss) for r in reports]
    plain, balanced = runs[0.0], runs[1.0]
    assert all(aux is not None and aux > 0 for _, aux in plain + balanced)
    assert plain[0] == pytest.approx(balanced[0], rel=1e-6)  # the same first forward
    assert plain[-1][1] != pytest.approx(balanced[-1][1], rel=1e-4)  # the aux gradient acted
