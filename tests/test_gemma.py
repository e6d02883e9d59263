"""Gemma specifics the table-driven runner does not reach: the published config.json
layouts read as transformers reads them, and the estimator counting what Gemma adds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorafit.core.estimate import Settings, estimate
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
        np.testing.assert_allclose(a.rope_of(lt), want, rtol=1e-6)
    assert a.layer_types == list(c.layer_types)
    assert a.sliding_window == c.sliding_window
    assert a.query_pre_attn_scalar == c.query_pre_attn_scalar


def test_published_gemma2_layout_reads_as_transformers_reads_it():
    cfg = load_preset("gemma-2-9b")
    a = model_args(cfg)
    want, c = _hf_inv_freq("gemma2", cfg, None)
    np.testing.assert_allclose(a.inv_freq, want, rtol=1e-6)
    assert a.layer_types == list(c.layer_types)
    assert (a.attn_logit_softcapping, a.final_logit_softcapping) == (50.0, 30.0)


def test_estimator_counts_the_tied_vocabulary_and_four_norms_per_layer():
    cfg = load_preset("gemma-2-2b")
    n = sum(math.prod(s) for s in parameter_shapes(cfg).values())
    assert 2.60e9 < n < 2.62e9  # Gemma 2 2B: 2.614B parameters, head tied to the embedding
    sh = memory_shape(cfg)
    assert sh.tied and sh.norms_per_layer == 4 and sh.attn_softcap and sh.final_softcap
    st = Settings(backend="torch", device="cuda", dtype="bfloat16", seq_len=1024,
                  batch_size=1)
    capped = estimate(sh, st)["breakdown"]
    sh.attn_softcap = sh.final_softcap = False
    plain = estimate(sh, st)["breakdown"]
    # eager soft-capped attention keeps (B, H, T, T) tanh output and probabilities per layer
    assert capped["activations"] - plain["activations"] == 26 * 8 * 1024 * 1024 * 10
    assert capped["logits and loss"] > plain["logits and loss"]
