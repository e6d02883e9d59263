"""Quantized frozen weights: NF4 through bitsandbytes on torch, affine 4/8-bit on MLX."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build_hf_model, random_ids
from lorafit.cli import main
from lorafit.core import adapter_io, lora
from lorafit.core.config import TrainConfig
from lorafit.models.loader import load_model


@pytest.fixture(scope="module")
def q_setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("qlora")
    folder, ref = build_hf_model(root / "model", "mistral", tokenizer, hidden_size=128,
                                 intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2)
    data = root / "train.jsonl"
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog".split()
    data.write_text("\n".join(json.dumps({"prompt": " ".join(rng.choice(words, 3)),
                                          "completion": " " + " ".join(rng.choice(words, 2))})
                              for _ in range(48)))
    return root, folder, ref, data


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_linear_equals_dequantize_then_matmul(mlx_backend, bits):
    import mlx.core as mx

    B = mlx_backend
    rng = np.random.default_rng(0)
    w = B.from_numpy(rng.normal(size=(96, 128)).astype(np.float32))
    x = B.from_numpy(rng.normal(size=(5, 128)).astype(np.float32))
    q, s, b = B.quantize(w, bits, 64)
    ours = B.to_numpy(B.quantized_linear(x, q, s, b, bits, 64))
    ref = np.array(x @ mx.dequantize(q, s, b, group_size=64, bits=bits).T)
    # the quantized kernel and BLAS sum in different orders (float32 rounding only)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
    err = np.abs(B.to_numpy(B.dequantize(q, s, b, bits, 64)) - B.to_numpy(w)).max()
    assert err < (0.5 if bits == 4 else 0.05)  # a real quantization, not a copy


def test_mlx_lm_quantized_folder_loads_directly(q_setup, tmp_path, mlx_backend):
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_load, quantize_model, save_model
    import shutil

    _, folder, _, _ = q_setup
    model, config = mlx_load(folder)
    model, config = quantize_model(model, config, group_size=64, bits=4)
    save_model(tmp_path, model)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in folder.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    ids = random_ids(320)
    expected = np.array(model(mx.array(ids)))
    ours = load_model(str(tmp_path), mlx_backend)
    assert ours.args.quantization["bits"] == 4
    got = mlx_backend.to_numpy(ours.logits(mlx_backend.from_numpy(ids)))
    assert np.abs(got - expected).max() <= 1e-4


def test_nf4_linear_equals_bitsandbytes_dequantize_then_matmul(torch_backend):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    import torch

    B = torch_backend
    rng = np.random.default_rng(0)
    w = B.from_numpy(rng.normal(size=(96, 128)).astype(np.float32))
    x = B.from_numpy(rng.normal(size=(5, 128)).astype(np.float32))
    q, state, _ = B.quantize(w, 4, 64)
    assert state.nested and state.blocksize == 64  # double quantization, block 64
    ref = x @ bnbF.dequantize_4bit(q, state).t()
    assert torch.equal(B.quantized_linear(x, q, state, None, 4, 64), ref)
    assert 0 < (B.dequantize(q, state, None, 4, 64) - w).abs().max() < 0.5


def test_adapter_on_nf4_base_matches_peft_on_transformers_bitsandbytes(q_setup, tmp_path,
                                                                       torch_backend):
    """PEFT's own QLoRA path (transformers + bitsandbytes) on the same base and adapter.
    transformers on CPU does not double-quantize the absmax (lorafit does, as the QLoRA
    paper), so logits agree to quantization noise: max abs diff <= 1e-2 at |logit| ~ 1."""
    pytest.importorskip("bitsandbytes")
    import torch
    import transformers
    from peft import PeftModel

    _, folder, _, _ = q_setup
    B = torch_backend
    model = load_model(str(folder), B, quantize="4bit")
    cfg = lora.LoraConfig(r=4, alpha=8, targets="all-linear")
    names = lora.attach(model, cfg, seed=0)
    rng = np.random.default_rng(0)
    adapter = {k: rng.normal(0, 0.1, B.to_numpy(model.params[k]).shape).astype(np.float32)
               for k in names}
    lora.detach(model)
    lora.attach(model, cfg, adapter)
    adapter_io.save_peft(tmp_path / "ad", adapter, cfg, str(folder), num_layers=2)
    ids = random_ids(320)
    ours = B.to_numpy(model.logits(B.from_numpy(ids)))
    bnb_cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    tm = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=bnb_cfg, device_map="cpu")
    pm = PeftModel.from_pretrained(tm, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.float().numpy()
    assert np.abs(theirs - ours).max() <= 1e-2


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_qlora_run_learns_resumes_exactly_and_merges(q_setup, tmp_path, backend):
    import transformers
    import torch

    from lorafit.commands.export import export_merged
    from test_train import train

    if backend == "torch":
        pytest.importorskip("bitsandbytes")
    root, folder, _, data = q_setup
    base = dict(model=str(folder), data=str(data), backend=backend, quantize="4bit",
                rank=4, alpha=8, targets="all-linear", batch_size=4, lr=3e-3, max_steps=10,
                seq_len=32, seed=0)
    full_t, full, _ = train(TrainConfig(**base, output=str(tmp_path / "full")))
    losses = full.losses()
    assert losses[-3:] and np.mean(losses[-3:]) < np.mean(losses[:3])
    part = TrainConfig(**base, output=str(tmp_path / "part"))
    train(part, stop_at=4)
    resumed_t, second, _ = train(part, resume=True)
    if backend == "torch":
        assert second.losses() == losses[4:]  # bit-identical
    else:
        np.testing.assert_allclose(second.losses(), losses[4:], rtol=1e-5)

    # merged: dequantize, merge, dense; transformers gives the adapted quantized logits
    ids = random_ids(320)
    B = full_t.ops
    ours = B.to_numpy(full_t.model.logits(B.from_numpy(ids)))
    merged = export_merged(tmp_path / "full" / "adapter", tmp_path / "merged", None, backend,
                           quantize="4bit")
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.tensor(ids)).logits.numpy(), ours, atol=1e-4)


def run_cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_bad_quantize_input_is_one_line(capsys, q_setup):
    _, folder, _, data = q_setup
    code, err = run_cli(capsys, "train", "--model", str(folder), "--data", str(data),
                        "--quantize", "3bit")
    assert code == 2 and "choose 4bit or 8bit" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "x",
                        "--backend", "torch", "--quantize", "8bit")
    assert code == 2 and "use --backend mlx" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_dora_on_a_quantized_base_merges_to_the_same_logits(q_setup, backend_name):
    from lorafit.backends import get_backend

    if backend_name == "torch":
        pytest.importorskip("bitsandbytes")
    _, folder, _, _ = q_setup
    B = get_backend(backend_name, "cpu")
    model = load_model(str(folder), B, quantize="4bit")
    cfg = lora.LoraConfig(r=4, alpha=8, targets="all-linear", dora=True)
    names = lora.attach(model, cfg, seed=0)
    rng = np.random.default_rng(1)
    adapter = {k: B.to_numpy(model.params[k]) for k in names}
    adapter = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in adapter.items()}
    lora.detach(model)
    lora.attach(model, cfg, adapter)
    ids = B.from_numpy(random_ids(320))
    unmerged = B.to_numpy(model.logits(ids))
    lora.merge(model)
    assert np.abs(B.to_numpy(model.logits(ids)) - unmerged).max() <= 1e-4


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory, tokenizer):
    """qwen2 with random q/k/v biases of 128 and 64 elements (multiples of the group size)."""
    import torch

    folder, ref = build_hf_model(tmp_path_factory.mktemp("biased") / "model", "qwen2",
                                 tokenizer, hidden_size=128, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.5)
    ref.save_pretrained(str(folder))
    return folder, ref


@pytest.mark.parametrize("backend_name", ["torch", "mlx"])
def test_quantized_base_keeps_projection_biases_dense(biased_model, backend_name):
    """A bias is added after the quantized matmul, never quantized itself (it was when its
    size was a multiple of 64: torch added its packed bytes, a shape error; MLX refused to
    load). Logits equal transformers' on the dequantized weights, biases included."""
    import torch

    from lorafit.backends import get_backend

    if backend_name == "torch":
        pytest.importorskip("bitsandbytes")
    folder, ref = biased_model
    B = get_backend(backend_name, "cpu")
    model = load_model(str(folder), B, quantize="4bit")
    p = model.params
    dequantized = {k: torch.from_numpy(B.to_numpy(B.dequantize(
        p[k], p[k[:-len("weight")] + "scales"], p.get(k[:-len("weight")] + "biases"), 4, 64)))
        for k in p if k.endswith(".weight") and k[:-len("weight")] + "scales" in p}
    assert "model.layers.0.self_attn.q_proj.weight" in dequantized
    assert tuple(B.to_numpy(p["model.layers.0.self_attn.k_proj.bias"]).shape) == (64,)
    ref.load_state_dict(dequantized, strict=False)
    ids = random_ids(320)
    ours = B.to_numpy(model.logits(B.from_numpy(ids)))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
