"""torch's float32 CPU causal attention in query blocks of GEMMs (backends/torch/causal_blocks)
against PyTorch's own causal attention, and where the backend takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafit.backends.base import causal_query_blocks, torch_cpu_blocks
from lorafit.backends.torch import causal_blocks
from lorafit.backends.torch.causal_blocks import CausalBlocks


def _qkv(B, Hq, Hk, T, D, seed=0):
    """q, k, v as the models make them: transposed views of (B, T, H, D)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_()
            for H in (Hq, Hk, Hk)]


@pytest.mark.parametrize("B,Hq,Hk,T,D", [(2, 4, 4, 512, 16), (1, 8, 2, 520, 8),
                                         (1, 6, 3, 300, 8), (2, 2, 1, 40, 4)])
def test_blocks_equal_pytorch_causal_attention_and_its_gradients(B, Hq, Hk, T, D):
    """Outputs and the gradients of q, k, v as scaled_dot_product_attention's, for plain and
    grouped heads, a last block shorter than the others (520 = 4 x 128 + 8) and a single
    block (T < 128)."""
    q, k, v = _qkv(B, Hq, Hk, T, D)
    grad = torch.randn(B, Hq, T, D, generator=torch.Generator().manual_seed(1))
    scale = 0.7 / D ** 0.5
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                         enable_gqa=Hq != Hk)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = CausalBlocks.apply(q, k, v, scale)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_blocks_cover_the_causal_triangle_once():
    """Every query row lies in one block, whose keys end at the block's end."""
    for T in (1, 127, 128, 512, 1000, 1024):
        blocks = causal_query_blocks(T)
        assert [s for s, _ in blocks] == [0] + [e for _, e in blocks[:-1]]
        assert blocks[-1][1] == T


def test_the_backend_takes_blocks_only_where_they_pay(torch_backend, monkeypatch):
    """float32 with a gradient at 512..1024 tokens: the blocks; shorter or longer rows, no
    gradient, and packed examples (blocks=False): PyTorch's kernel. Same outputs either way."""
    used = []
    real = CausalBlocks.apply
    monkeypatch.setattr(causal_blocks.CausalBlocks, "apply",
                        staticmethod(lambda *a: used.append(a[0].shape[2]) or real(*a)))
    for T in (256, 512, 1024, 1100):
        q, k, v = _qkv(1, 2, 2, T, 4)
        out = torch_backend.attention(q, k, v, 0.5)
        with torch.no_grad():
            plain = torch_backend.attention(q, k, v, 0.5)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
        torch_backend.attention(q, k, v, 0.5, blocks=False)
    assert used == [T for T in (256, 512, 1024, 1100) if torch_cpu_blocks(T)] == [512, 1024]


def test_a_model_at_512_tokens_trains_the_same_through_the_blocks(tmp_path, tokenizer,
                                                                 torch_backend, monkeypatch):
    """A grouped-query Llama over 512 tokens (the blocks run in every layer): the loss and
    every adapter gradient equal those of PyTorch's kernel, with and without recompute
    (a re-run layer saves what its forward saved)."""
    import numpy as np

    from conftest import build_hf_model, random_ids
    from lorafit.backends import torch as torch_backend_module
    from lorafit.core import lora
    from lorafit.core.lora import LoraConfig
    from lorafit.models import default_positions
    from lorafit.models.loader import load_model

    folder, ref = build_hf_model(tmp_path, "llama", tokenizer, max_position_embeddings=1024)
    ops = torch_backend
    model = load_model(str(folder), ops)
    names = lora.attach(model, LoraConfig(r=2, alpha=4, targets="all-linear"), seed=0)
    rng = np.random.default_rng(0)
    for k in names:  # B non-zero, so every adapter's gradient is
        model.params[k] = ops.from_numpy(
            rng.normal(0, 0.1, ops.to_numpy(model.params[k]).shape).astype(np.float32))
    ids = ops.from_numpy(random_ids(ref.config.vocab_size, (1, 512), seed=1))
    pos = default_positions(ops, (1, 512))
    probe = ops.from_numpy(rng.normal(size=(1, 512, 64)).astype(np.float32))
    frozen = {k: v for k, v in model.params.items() if k not in names}

    def run(recompute):
        def f(tr, _):
            h = model.hidden(ids, pos, params={**frozen, **tr}, recompute=recompute)
            return (h * probe).sum(), None
        (loss, _), g = ops.value_and_grad(f)({k: model.params[k] for k in names}, None)
        return ops.to_float(loss), {k: ops.to_numpy(v) for k, v in g.items()}

    used = []
    real = CausalBlocks.apply
    monkeypatch.setattr(causal_blocks.CausalBlocks, "apply",
                        staticmethod(lambda *a: used.append(1) or real(*a)))
    blocks, blocks_rc = run(False), run(True)
    assert len(used) == 3 * ref.config.num_hidden_layers  # forward, forward + re-run
    monkeypatch.setattr(torch_backend_module, "torch_cpu_blocks", lambda T: False)
    kernel = run(False)
    assert len(used) == 3 * ref.config.num_hidden_layers
    for got in (blocks, blocks_rc):
        assert got[0] == pytest.approx(kernel[0], rel=1e-5)
        for k in names:  # float32 sums over 512 positions in another order
            scale = np.abs(kernel[1][k]).max()
            np.testing.assert_allclose(got[1][k], kernel[1][k], rtol=1e-3, atol=1e-4 * scale)
