"""Llama and its close variants: mistral (the same block, every layer sliding when the
config has a window), qwen2 (q/k/v biases), qwen3 (per-head q/k RMSNorm); the Qwens slide
the layers from `max_window_layers` on when `use_sliding_window` is set. Each is the Llama
decoder with a switch or two set."""

from __future__ import annotations


def _llama(cfg: dict) -> dict:
    if cfg.get("attention_bias"):  # llama's attention_bias covers o_proj too
        cfg["o_proj_bias"] = True
    cfg.pop("layer_types", None)
    cfg.pop("sliding_window", None)
    return cfg


def _mistral(cfg: dict) -> dict:
    cfg.pop("layer_types", None)
    if cfg.get("sliding_window"):
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    return cfg


def _qwen_windows(cfg: dict) -> dict:
    """transformers' rule: a window only with use_sliding_window, on layers past
    max_window_layers, unless the config lists its layer_types itself."""
    if not cfg.get("use_sliding_window"):
        cfg["sliding_window"] = None
    if cfg.get("layer_types") is None:
        n, first = cfg["num_hidden_layers"], cfg.get("max_window_layers", cfg["num_hidden_layers"])
        cfg["layer_types"] = ["sliding_attention" if cfg.get("sliding_window") and i >= first
                              else "full_attention" for i in range(n)]
    return cfg


def _qwen2(cfg: dict) -> dict:
    cfg["attention_bias"] = True  # q, k, v only
    return _qwen_windows(cfg)


def _qwen3(cfg: dict) -> dict:
    cfg["qk_norm"] = True
    return _qwen_windows(cfg)


CONFIGURE = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}


def sanitize(weights: dict, args) -> dict:
    """Drop what checkpoints carry but the model does not use."""
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights
