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
