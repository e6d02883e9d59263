"""GLM-4 (0414): q/k/v with biases, a fused `gate_up_proj`, four norms per layer (the
attention and MLP outputs are normed as well as their inputs), and interleaved RoPE on the
first half of each head (partial_rotary_factor 0.5)."""

from __future__ import annotations

from lorafit.models.families import llama

sanitize = llama.sanitize  # the same tensors to drop


def _glm4(cfg: dict) -> dict:
    cfg["fused_gate_up"] = cfg["sandwich_norms"] = cfg["rope_interleaved"] = True
    cfg.setdefault("attention_bias", True)  # the config class's default (q, k, v only)
    cfg.setdefault("partial_rotary_factor", 0.5)  # the config class's default
    rope = cfg.get("rope_parameters") or {}
    if rope.get("partial_rotary_factor") is not None:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg.pop("layer_types", None)
    cfg.pop("sliding_window", None)
    return cfg


CONFIGURE = {"glm4": _glm4}
