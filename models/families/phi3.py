"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama block with q, k, v fused into one `qkv_proj` and
gate, up into one `gate_up_proj` (adapters sit on the fused projections, whose outputs the
decoder splits), LongRoPE with partial rotary (Phi-4-mini rotates 3/4 of each head), and a
sliding window on every layer when the config sets one."""

from __future__ import annotations

from lorafit.models.families import llama

sanitize = llama.sanitize  # the same tensors to drop


def _phi3(cfg: dict) -> dict:
    cfg["fused_qkv"] = cfg["fused_gate_up"] = True
    cfg.pop("layer_types", None)
    if cfg.get("sliding_window"):
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key)
        if not rope:
            continue
        rope = dict(rope)
        kind = rope.get("rope_type", rope.get("type"))
        if kind in ("su", "yarn", "longrope"):  # transformers reads all three as LongRoPE
            rope["rope_type"] = "longrope"
            rope.pop("type", None)
            # the top-level field wins over the one inside the rope dict (transformers)
            rope["original_max_position_embeddings"] = cfg.get(
                "original_max_position_embeddings",
                rope.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
        cfg[key] = rope
    return cfg


CONFIGURE = {"phi3": _phi3}
