"""Gemma 2, Gemma 3 (text) and Gemma 4 (text): the Llama decoder with Gemma's switches.

Both: RMSNorm in float32 times (1 + w); a norm after attention (`post_attention_layernorm`
normalises the attention *output*, unlike Llama's) and norms before and after the MLP;
embeddings times sqrt(hidden_size), rounded to the compute dtype as transformers does; GeGLU
(gelu_pytorch_tanh); attention scaled by query_pre_attn_scalar^-0.5; sliding and full
layers alternating as `layer_types` says; tied embeddings.
Gemma 2 soft-caps attention scores and the final logits. Gemma 3 adds (1 + w) RMSNorm over
each head of q and k and gives sliding layers their own RoPE (`rope_local_base_freq`, or
`rope_parameters.sliding_attention` in the transformers-5 layout); its full layers may
scale RoPE linearly. transformers' Gemma 3 applies the final-logit cap when the config sets
one but never caps attention scores, so neither does lorafit. Gemma 4: see _gemma4_text.
"""

from __future__ import annotations

from lorafit.core.errors import LorafitError


def _common(cfg: dict) -> dict:
    if cfg.get("use_bidirectional_attention"):
        raise LorafitError("use_bidirectional_attention models (embedding models) are not "
                           "causal language models; lorafit trains causal ones only")
    cfg["hidden_act"] = cfg.get("hidden_activation") or cfg.get("hidden_act") \
        or "gelu_pytorch_tanh"
    cfg.setdefault("head_dim", 256)
    cfg.setdefault("query_pre_attn_scalar", 256)
    cfg.setdefault("tie_word_embeddings", True)
    cfg.setdefault("rms_norm_eps", 1e-6)
    if cfg.get("attention_bias"):  # on q, k, v and o
        cfg["o_proj_bias"] = True
    cfg.update(norm_offset=1.0, embed_scale=True, feedforward_norms=True)
    return cfg


def _layer_types(cfg: dict, pattern: int) -> None:
    """transformers' default when the config does not list them: every `pattern`-th layer
    full, the others sliding."""
    if cfg.get("layer_types") is None:
        cfg["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                              for i in range(cfg["num_hidden_layers"])]
    if "sliding_attention" in cfg["layer_types"] and not cfg.get("sliding_window"):
        cfg["sliding_window"] = 4096


def _gemma2(cfg: dict) -> dict:
    _common(cfg)
    _layer_types(cfg, 2)
    cfg.setdefault("attn_logit_softcapping", 50.0)
    cfg.setdefault("final_logit_softcapping", 30.0)
    return cfg


def _gemma3_text(cfg: dict) -> dict:
    _common(cfg)
    _layer_types(cfg, cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
                 or 6)
    cfg["qk_norm"] = True
    cfg["attn_logit_softcapping"] = None  # transformers' Gemma 3 never caps attention
    cfg.setdefault("final_logit_softcapping", None)
    cfg.setdefault("max_position_embeddings", 131072)
    rope = cfg.pop("rope_parameters", None)
    if rope and ("full_attention" in rope or "sliding_attention" in rope):  # transformers 5
        full = dict(rope.get("full_attention") or {})
        local = dict(rope.get("sliding_attention") or {})
    else:  # the published layout: rope_theta, rope_local_base_freq, rope_scaling
        full = dict(rope or {})
        full.update(cfg.get("rope_scaling") or {})
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        local = {"rope_type": "default",
                 "rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    full.setdefault("rope_theta", 1_000_000.0)
    local.setdefault("rope_theta", 10_000.0)
    for p in (full, local):
        if "type" in p and "rope_type" not in p:
            p["rope_type"] = p.pop("type")
        p.setdefault("rope_type", "default")
    cfg["rope_by_layer_type"] = {"full_attention": full, "sliding_attention": local}
    cfg["rope_theta"] = full["rope_theta"]
    cfg["rope_scaling"] = None
    return cfg


CONFIGURE = {"gemma2": _gemma2, "gemma3_text": _gemma3_text}


def sanitize(weights: dict, args) -> dict:
    """Drop what checkpoints carry but the model does not use (a tied head, RoPE buffers)."""
    weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


def _gemma4_text(cfg: dict) -> dict:
    """Gemma 4 (text): plain-w RMSNorm in float32, norms on q, k and (without weight) v,
    attention scale 1, sliding layers with their RoPE and full layers with a wider head
    (global_head_dim) and proportional partial RoPE, optionally k = v on full layers, the
    last num_kv_shared_layers layers reusing earlier k, v (with a double-wide MLP if
    use_double_wide_mlp), per-layer input embeddings, a stored scalar per layer, and with
    enable_moe_block routed experts beside every layer's MLP (models/blocks/moe.py)."""
    if cfg.get("use_bidirectional_attention") == "all":
        raise LorafitError("use_bidirectional_attention='all' models are not causal language "
                           "models; lorafit trains causal ones only")
    cfg["use_bidirectional_attention"] = None
    _common(cfg)
    cfg.setdefault("sliding_window", 512)
    cfg.setdefault("max_position_embeddings", 131072)
    _layer_types(cfg, 6)
    cfg["layer_types"] = list(cfg["layer_types"])
    cfg["layer_types"][-1] = "full_attention"  # transformers forces it
    cfg.update(norm_offset=0.0, qk_norm=True, v_norm=True, query_pre_attn_scalar=1.0,
               layer_scalar=True, attn_logit_softcapping=None)
    cfg.setdefault("final_logit_softcapping", None)
    rope = cfg.pop("rope_parameters", None) or {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                           "rope_theta": 1_000_000.0}}
    cfg["rope_by_layer_type"] = {t: dict(p) for t, p in rope.items()}
    cfg["rope_scaling"] = None
    cfg["k_eq_v"] = bool(cfg.get("attention_k_eq_v"))
    # full layers' head dim and kv heads: transformers 5 saves them as per_layer_config
    # {layer: overrides}; the published configs as global_head_dim / num_global_key_value_heads
    overrides = cfg.get("per_layer_config")
    if overrides is None:
        o = {"head_dim": cfg.get("global_head_dim") or 512}
        if cfg["k_eq_v"] and cfg.get("num_global_key_value_heads"):
            o["num_key_value_heads"] = cfg["num_global_key_value_heads"]
        overrides = {i: o for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"}
    by_type = {}
    for i, t in enumerate(cfg["layer_types"]):
        o = overrides.get(str(i), overrides.get(i, {})) if isinstance(overrides, dict) else {}
        if by_type.setdefault(t, o) != o:
            raise LorafitError(f"per_layer_config gives {t} layers different shapes; lorafit "
                               "supports one shape per layer type")
    unknown = {k for o in by_type.values() for k in o} - {"head_dim", "num_key_value_heads"}
    if unknown:
        raise LorafitError(f"per_layer_config overrides {', '.join(sorted(unknown))}, which "
                           "lorafit does not support")
    cfg["layer_head_dim"] = {t: o["head_dim"] for t, o in by_type.items() if "head_dim" in o}
    cfg["layer_kv_heads"] = {t: o["num_key_value_heads"] for t, o in by_type.items()
                             if "num_key_value_heads" in o}
    cfg["kv_shared_layers"] = cfg.get("num_kv_shared_layers") or 0
    cfg["double_wide_mlp"] = bool(cfg.get("use_double_wide_mlp"))
    cfg["per_layer_input_size"] = cfg.get("hidden_size_per_layer_input", 256) or 0
    cfg["per_layer_vocab"] = cfg.get("vocab_size_per_layer_input") or cfg["vocab_size"]
    if cfg.get("enable_moe_block"):  # every layer: the MLP plus experts beside it
        if not (cfg.get("num_experts") and cfg.get("top_k_experts")
                and cfg.get("moe_intermediate_size")):
            raise LorafitError("enable_moe_block needs num_experts, top_k_experts and "
                               "moe_intermediate_size in config.json")
        # softmax, top k, renormalised (then times per_expert_scale); PEFT has no expert
        # names for gemma4, so all-linear adapts nn.Linear modules only (router.proj too)
        cfg.update(num_local_experts=cfg["num_experts"], num_experts_per_tok=cfg["top_k_experts"],
                   experts_beside_mlp=True, moe_linear_only=True, router="softmax_topk",
                   norm_topk_prob=True)
    return cfg


CONFIGURE["gemma4_text"] = _gemma4_text


def _gemma4_published(cfg: dict) -> dict:
    """transformers 5 saves the full layers' head dim and kv heads as per_layer_config
    only; the published checkpoints (and mlx-lm, which reads nothing else) have
    global_head_dim and num_global_key_value_heads: write those too (transformers reads
    per_layer_config first, so its reading is unchanged)."""
    out = dict(cfg)
    overrides = out.get("per_layer_config")
    if not isinstance(overrides, dict) or not overrides:
        return out
    types = out.get("layer_types") or []
    full = [o for i, o in overrides.items()
            if int(i) < len(types) and types[int(i)] == "full_attention"]
    if not full:
        return out
    first = full[0]
    if "head_dim" in first:
        out.setdefault("global_head_dim", first["head_dim"])
    if "num_key_value_heads" in first:
        out.setdefault("num_global_key_value_heads", first["num_key_value_heads"])
    return out


PUBLISHED = {"gemma4_text": _gemma4_published}
