"""gpt-oss: attention with q/k/v/o biases and a learned per-head sink logit
(`self_attn.sinks`), sliding and full layers alternating as `layer_types` says, YaRN rope
(with its cos/sin attention factor), and a sparse MoE on every layer: a router with a bias
(the top k logits, then a softmax over those k) and experts with biases and the clamped
SwiGLU (models/blocks/moe.py, `gpt_oss_experts`).

Checkpoints: transformers v5's own layout (dense expert parameters, as save_pretrained
writes), or the Hub's MXFP4 experts (`*_blocks` + `*_scales`), which are dequantized into
the compute dtype while loading (`mxfp4_dequantize`, numpy).
"""

from __future__ import annotations

import re

import numpy as np


def _gpt_oss(cfg: dict) -> dict:
    cfg["attention_bias"] = True
    cfg["o_proj_bias"] = True
    cfg["attention_sinks"] = True
    cfg["gpt_oss_experts"] = True
    cfg["router"] = "topk_softmax"
    n = cfg["num_hidden_layers"]
    if cfg.get("layer_types") is None:  # transformers' default: sliding on even layers
        cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(n)]
    if "sliding_attention" not in cfg["layer_types"]:
        cfg["sliding_window"] = None
    return cfg


CONFIGURE = {"gpt_oss": _gpt_oss}

CHECKPOINT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)_"
                            r"(blocks|scales)$")

# FP4 (e2m1) code points: the low nibble of each byte is the earlier element.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> float32 in transformers' parameter layout. blocks (E, R, G, 16) uint8 hold
    two FP4 values a byte (low nibble first), 32 per group; scales (E, R, G) uint8 are
    biased exponents (value * 2^(scale - 127)). Returns (E, G*32, R): the (E, R, G*32)
    matrix transposed, as transformers' convert_moe_packed_tensors."""
    blocks = np.asarray(blocks, np.uint8)
    exp = np.asarray(scales, np.int32) - 127
    out = np.empty(blocks.shape[:-1] + (blocks.shape[-1] * 2,), np.float32)
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    out = np.ldexp(out, exp[..., None])
    out = out.reshape(*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1] * 2)
    return np.ascontiguousarray(np.swapaxes(out, 1, 2))


def sanitize(weights: dict, args) -> dict:
    return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}


def convert(ops, weights: dict, args) -> dict:
    """Dequantize MXFP4 expert weights (blocks + scales) into the compute dtype."""
    dtype = ops.dtype_name(weights["model.embed_tokens.weight"])
    for key in [k for k in weights if k.endswith("_blocks")]:
        base = key[: -len("_blocks")]
        blocks, scales = weights.pop(key), weights.pop(base + "_scales")
        weights[base] = ops.from_numpy(
            mxfp4_dequantize(ops.to_numpy(blocks), ops.to_numpy(scales)), dtype)
    return weights
