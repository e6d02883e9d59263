"""OLMo 2 and OLMo 3: the Llama projections with norms after the sublayers (the attention
and MLP outputs are RMS-normed before the residual add; there is no input norm) and q/k
RMSNorm over the whole projection, before it is split into heads. OLMo 3 adds sliding-window
layers (three of every four by default) and rope scaling (YaRN) on the full layers only."""

from __future__ import annotations

from lorafit.models.families import llama

sanitize = llama.sanitize  # the same tensors to drop


def _olmo2(cfg: dict) -> dict:
    cfg["post_norms"] = cfg["qk_norm_whole"] = True
    if cfg.get("attention_bias"):  # bias on q, k, v and o alike
        cfg["o_proj_bias"] = True
    cfg.pop("layer_types", None)
    cfg.pop("sliding_window", None)
    return cfg


def _olmo3(cfg: dict) -> dict:
    layer_types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
        for i in range(cfg["num_hidden_layers"])]
    window = cfg.get("sliding_window", 4096)  # transformers' default
    cfg = _olmo2(cfg)
    cfg["layer_types"], cfg["sliding_window"] = layer_types, window
    default_theta = 500000.0
    rope = cfg.pop("rope_parameters", None)
    if rope and {"full_attention", "sliding_attention"} & set(rope):  # per layer type
        by_type = {lt: dict(rope.get(lt) or {}) for lt in set(layer_types)}
    else:  # one rope dict (or the old rope_theta / rope_scaling): the scaling is the full
        # layers' only, as transformers' Olmo3Config reads it
        flat = dict(rope or {})
        theta = flat.pop("rope_theta", cfg.get("rope_theta", default_theta))
        scaling = cfg.pop("rope_scaling", None) or flat
        by_type = {"sliding_attention": {"rope_type": "default", "rope_theta": theta},
                   "full_attention": {"rope_theta": theta, **(scaling or {})}}
    for r in by_type.values():
        r.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
        r.setdefault("rope_type", r.pop("type", "default"))
    cfg.pop("rope_scaling", None)
    cfg["rope_theta"] = by_type.get("full_attention", next(iter(by_type.values())))["rope_theta"]
    cfg["rope_by_layer_type"] = by_type
    return cfg


CONFIGURE = {"olmo2": _olmo2, "olmo3": _olmo3}
