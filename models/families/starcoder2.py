"""StarCoder 2: LayerNorm with bias (eps `norm_epsilon`), a plain MLP c_fc -> gelu (tanh)
-> c_proj, biases on every projection when `use_bias`, a sliding window on every layer
when the config sets one."""

from __future__ import annotations

from lorafit.models.families import llama
from lorafit.models.families.llama import _mistral

sanitize = llama.sanitize  # the same tensors to drop


def _starcoder2(cfg: dict) -> dict:
    cfg = _mistral(cfg)
    cfg["layer_norm"] = cfg["plain_mlp"] = True
    cfg["rms_norm_eps"] = cfg.get("norm_epsilon", 1e-5)
    bias = cfg.get("use_bias", True)
    cfg["attention_bias"] = cfg["o_proj_bias"] = cfg["mlp_bias"] = bias
    return cfg


CONFIGURE = {"starcoder2": _starcoder2}
