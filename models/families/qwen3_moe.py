"""Qwen3-MoE: the Qwen3 decoder (per-head q/k RMSNorm) with a sparse mixture-of-experts MLP
(models/blocks/moe.py) on the layers transformers makes sparse: not in `mlp_only_layers`
and (i + 1) a multiple of `decoder_sparse_step`; the others keep a dense MLP of
`intermediate_size`. Routing: softmax over all experts, the top k, renormalised only when
`norm_topk_prob`. A window (all layers) only with `use_sliding_window`, as transformers.

Checkpoints: the Hub's per-expert `mlp.experts.N.gate_proj/up_proj/down_proj` (also what
transformers v5's save_pretrained writes) or the fused v5 parameters; both load.
"""

from __future__ import annotations

import re

from lorafit.models.families import moe_checkpoint


def _qwen3_moe(cfg: dict) -> dict:
    cfg["qk_norm"] = True
    n = cfg["num_hidden_layers"]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    cfg["num_local_experts"] = experts
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
    cfg["moe_layers"] = [i for i in range(n)
                         if experts and i not in dense and (i + 1) % step == 0]
    cfg["router"] = "softmax_topk"
    cfg["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    cfg.pop("layer_types", None)
    if not cfg.get("use_sliding_window"):
        cfg["sliding_window"] = None
    if cfg.get("sliding_window"):
        cfg["layer_types"] = ["sliding_attention"] * n
    return cfg


CONFIGURE = {"qwen3_moe": _qwen3_moe}

CHECKPOINT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.")
_EXPERT = re.compile(r"(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)"
                     r"\.weight")


def sanitize(weights: dict, args) -> dict:
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


def convert(ops, weights: dict, args) -> dict:
    return moe_checkpoint.fuse_experts(ops, weights, args, _EXPERT,
                                       gate="gate_proj", up="up_proj", down="down_proj")


def stacked(name: str, shape: tuple) -> list | None:
    """The per-expert tensors a stacked expert array is made of (--shard reads slices)."""
    return moe_checkpoint.expert_pieces(name, shape, "mlp.experts.{e}.{proj}.weight",
                                        gate="gate_proj", up="up_proj", down="down_proj")
