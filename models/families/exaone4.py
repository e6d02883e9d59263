"""EXAONE 4.0: OLMo 2's norm placement (each sublayer's output RMS-normed before the
residual add, no input norm) with Qwen 3's per-head q/k RMSNorm; with a sliding window,
the layers listed as sliding use it and only they apply RoPE (the full layers are NoPE)."""

from __future__ import annotations

from lorafit.models.families import llama

sanitize = llama.sanitize  # the same tensors to drop


def _exaone4(cfg: dict) -> dict:
    cfg["post_norms"] = cfg["qk_norm"] = True
    n = cfg["num_hidden_layers"]
    if not cfg.get("sliding_window"):
        cfg["sliding_window"] = None
        cfg["layer_types"] = ["full_attention"] * n
        return cfg
    if cfg.get("layer_types") is None:
        pattern = cfg.get("sliding_window_pattern") or 4
        if isinstance(pattern, str):  # "LLLG": repeats from layer 0, last layer global
            types = ["full_attention" if pattern[i % len(pattern)] == "G" or i == n - 1
                     else "sliding_attention" for i in range(n)]
        else:
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(n)]
        cfg["layer_types"] = types
    cfg["nope_layers"] = [lt != "sliding_attention" for lt in cfg["layer_types"]]
    return cfg


CONFIGURE = {"exaone4": _exaone4}
