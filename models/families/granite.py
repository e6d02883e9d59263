"""Granite (3.x dense): the Llama block with four multipliers, all read from config.json
under their own names: embeddings times `embedding_multiplier`, each sublayer's output times
`residual_multiplier`, attention scores scaled by `attention_multiplier` (not 1/sqrt(d)),
logits divided by `logits_scaling`."""

from __future__ import annotations

from lorafit.models.families import llama

sanitize = llama.sanitize  # the same tensors to drop


def _granite(cfg: dict) -> dict:
    if cfg.get("attention_bias"):  # bias on q, k, v and o alike
        cfg["o_proj_bias"] = True
    cfg.pop("layer_types", None)
    cfg.pop("sliding_window", None)
    return cfg


CONFIGURE = {"granite": _granite}
