"""Gemma specifics the table-driven runner does not reach: the published config.json
layouts read as transformers reads them, and the estimator counting what Gemma adds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorafit.core.estimate import Settings, estimate, loss_buffers
from lorafit.core.loss import logit_chunk_elements
from lorafit.models import memory_shape, model_args, parameter_shapes
from lorafit.models.presets import load_preset


def _hf_inv_freq(model_type: str, cfg: dict, layer_type: str | None):
    import transformers

    cls = transformers.AutoConfig.for_model(model_type).__class__
    c = cls(**{k: v for k, v in cfg.items() if k not in ("source", "hub_id", "note")})
    if model_type == "gemma3_text":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
        rot = Gemma3RotaryEmbedding(c)
        return getattr(rot, f"{layer_type}_inv_freq").numpy(), c
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding
    return Gemma2RotaryEmbedding(c).inv_freq.numpy(), c


@pytest.mark.parametrize("preset", ["gemma-3-1b-it", "gemma-3-27b-it"])
def test_published_gemma3_layout_reads_as_transformers_reads_it(preset):
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern, the keys of
    the published configs, give the RoPE and layer types transformers derives from them."""
    cfg = load_preset(preset)
    a = model_args(cfg)
    for lt in ("sliding_attention", "full_attention"):
        want, c = _hf_inv_freq("gemma3_text", cfg, lt)
        np.testing.assert_allclose(a.ropes[lt].inv_freq, want, rtol=1e-6)
    assert a.layer_types == list(c.layer_types)
    assert a.sliding_window == c.sliding_window
    assert a.query_pre_attn_scalar == c.query_pre_attn_scalar


def test_published_gemma2_layout_reads_as_transformers_reads_it():
    cfg = load_preset("gemma-2-9b")
    a = model_args(cfg)
    want, c = _hf_inv_freq("gemma2", cfg, None)
    np.testing.assert_allclose(a.ropes["full_attention"].inv_freq, want, rtol=1e-6)
    assert a.layer_types == list(c.layer_types)
    assert (a.attn_logit_softcapping, a.final_logit_softcapping) == (50.0, 30.0)


def test_estimator_counts_the_tied_vocabulary_and_four_norms_per_layer():
    cfg = load_preset("gemma-2-2b")
    n = sum(math.prod(s) for s in parameter_shapes(cfg).values())
    assert 2.60e9 < n < 2.62e9  # Gemma 2 2B: 2.614B parameters, head tied to the embedding
    sh = memory_shape(cfg)
    assert sh.tied and sh.layer_vectors == 4 * sh.hidden and sh.attn_softcap and sh.final_softcap
    st = Settings(backend="torch", device="cuda", dtype="bfloat16", seq_len=1024,
                  batch_size=1)
    capped = estimate(sh, st)["breakdown"]
    capped_loss = loss_buffers(sh, st)
    mlx = st.replace(backend="mlx", device="metal")
    capped_mlx_loss = loss_buffers(sh, mlx)
    sh.attn_softcap = sh.final_softcap = False
    plain = estimate(sh, st)["breakdown"]
    # eager soft-capped attention keeps (B, H, T, T) tanh output and probabilities per layer,
    # and on torch k and v repeated from 4 to 8 heads of 256 (bfloat16) for its products,
    # but not its output (8 heads of 256), which no product's vjp reads
    assert capped["activations"] - plain["activations"] == 26 * 8 * 1024 * 1024 * 10 \
        + 26 * 1024 * (2 * (8 - 4) - 8) * 256 * 2
    # torch caps the logits and forms tanh's slope in place: no more (rows, V) buffers, but
    # the capped logits stay beside the probabilities while W's picked rows (rows, C) and
    # their slope-scaled copy form; MLX's one graph keeps tanh and the slope beside the
    # logits and their exp
    rows = min(1024, max(16, logit_chunk_elements("torch") // sh.vocab))
    assert capped_loss == loss_buffers(sh, st) + rows * 2 * sh.hidden * 2
    assert capped_mlx_loss == loss_buffers(sh, mlx) * 2 - (1024 * sh.hidden * 2)


GEMMA4 = dict(head_dim=16, global_head_dim=32, sliding_window=6, num_hidden_layers=4,
              num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
              use_double_wide_mlp=True, hidden_size_per_layer_input=8,
              vocab_size_per_layer_input=512, final_logit_softcapping=3.0)


def test_gemma4_recompute_gives_the_same_gradients(tmp_path, tokenizer, backend):
    """Layers that reuse earlier k, v and per-layer inputs carry gradients across the
    recomputed (checkpointed) layers: gradients equal those of the plain forward."""
    from conftest import build_hf_model, random_ids
    from lorafit.core import lora
    from lorafit.core.lora import LoraConfig
    from lorafit.models import default_positions
    from lorafit.models.loader import load_model

    folder, ref = build_hf_model(tmp_path, "gemma4_text", tokenizer, **GEMMA4)
    ops = backend
    model = load_model(str(folder), ops)
    names = lora.attach(model, LoraConfig(r=2, alpha=4, targets="all-linear"), seed=0)
    rng = np.random.default_rng(0)
    for k in names:  # B non-zero, so every adapter's gradient is
        model.params[k] = ops.from_numpy(rng.normal(0, 0.1, ops.to_numpy(model.params[k]).shape)
                                         .astype(np.float32))
    ids = ops.from_numpy(random_ids(ref.config.vocab_size, (2, 12), seed=1))
    pos = default_positions(ops, (2, 12))
    probe = ops.from_numpy(rng.normal(size=(2, 12, 64)).astype(np.float32))
    frozen = {k: v for k, v in model.params.items() if k not in names}
    out = []
    for recompute in (False, True):
        def f(tr, _):
            h = model.hidden(ids, pos, params={**frozen, **tr}, recompute=recompute)
            return (h * probe).sum(), None
        (loss, _), g = ops.value_and_grad(f)({k: model.params[k] for k in names}, None)
        out.append((ops.to_float(loss), {k: ops.to_numpy(v) for k, v in g.items()}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert any("per_layer_model_projection" in k for k in names)
    for k in names:
        np.testing.assert_allclose(out[1][1][k], out[0][1][k], rtol=1e-4, atol=1e-6)
        assert np.abs(out[0][1][k]).max() > 0, k


def test_gemma4_moe_without_its_sizes_is_a_one_line_error():
    from lorafit.core.errors import LorafitError

    cfg = {"model_type": "gemma4_text", "vocab_size": 320, "hidden_size": 64,
           "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4,
           "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2}
    with pytest.raises(LorafitError, match="enable_moe_block needs .*moe_intermediate_size"):
        model_args(cfg)
    assert model_args({**cfg, "moe_intermediate_size": 40}).experts_beside_mlp
