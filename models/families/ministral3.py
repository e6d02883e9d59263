"""Ministral 3: the Mistral block (a sliding window on every layer when the config sets
one) with YaRN rotary scaling and Llama 4's position-dependent query temperature,
1 + llama_4_scaling_beta * ln(1 + floor(position / original_max_position_embeddings))."""

from __future__ import annotations

from lorafit.models.families import llama
from lorafit.models.families.llama import _mistral

sanitize = llama.sanitize  # the same tensors to drop


def _ministral3(cfg: dict) -> dict:
    cfg = _mistral(cfg)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    beta = rope.get("llama_4_scaling_beta")
    if beta is not None:
        cfg["query_position_scale"] = (float(beta),
                                       int(rope["original_max_position_embeddings"]))
    return cfg


CONFIGURE = {"ministral3": _ministral3}
