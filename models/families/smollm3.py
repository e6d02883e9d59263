"""SmolLM3: the Llama block where every `no_rope_layer_interval`-th layer (or those marked 0
in `no_rope_layers`) applies no rotary embedding (NoPE); with `use_sliding_window`, the
layers listed as sliding in layer_types use the window."""

from __future__ import annotations

from lorafit.models.families import llama

sanitize = llama.sanitize  # the same tensors to drop


def _smollm3(cfg: dict) -> dict:
    n = cfg["num_hidden_layers"]
    uses_rope = cfg.get("no_rope_layers") or [
        int((i + 1) % cfg.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    cfg["nope_layers"] = [not r for r in uses_rope]
    if cfg.get("attention_bias"):  # bias on q, k, v and o alike
        cfg["o_proj_bias"] = True
    if not (cfg.get("use_sliding_window") and cfg.get("sliding_window")):
        cfg.pop("layer_types", None)
        cfg["sliding_window"] = None
    elif cfg.get("layer_types") is None:  # transformers' default: the NoPE layers slide
        cfg["layer_types"] = ["sliding_attention" if not r else "full_attention"
                              for r in uses_rope]
    return cfg


CONFIGURE = {"smollm3": _smollm3}
