"""Llama and its close variants: mistral (the same block), qwen2 (q/k/v biases), qwen3
(per-head q/k RMSNorm). Each is the Llama decoder with a switch or two set."""

from __future__ import annotations


def _llama(cfg: dict) -> dict:
    if cfg.get("attention_bias"):  # llama's attention_bias covers o_proj too
        cfg["o_proj_bias"] = True
    return cfg


def _qwen2(cfg: dict) -> dict:
    cfg["attention_bias"] = True  # q, k, v only
    return cfg


def _qwen3(cfg: dict) -> dict:
    cfg["qk_norm"] = True
    return cfg


CONFIGURE = {"llama": _llama, "mistral": lambda cfg: cfg, "qwen2": _qwen2, "qwen3": _qwen3}


def sanitize(weights: dict, args) -> dict:
    """Drop what checkpoints carry but the model does not use."""
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights
