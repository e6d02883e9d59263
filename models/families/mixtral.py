"""Mixtral: the Mistral decoder with a sparse mixture-of-experts MLP in every layer
(models/blocks/moe.py): softmax over all experts, the top k, renormalised.

Checkpoints come in the Hub's per-expert layout (`block_sparse_moe.experts.N.w1/w2/w3`,
which transformers v5's save_pretrained also writes) or fused as transformers v5 holds them
in memory (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`); both load.
"""

from __future__ import annotations

import re

from lorafit.models.families import moe_checkpoint


def _mixtral(cfg: dict) -> dict:
    cfg.pop("layer_types", None)
    if cfg.get("sliding_window"):
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
    cfg["router"] = "softmax_topk"
    cfg["norm_topk_prob"] = True
    return cfg


CONFIGURE = {"mixtral": _mixtral}

# Hub layout: model.layers.L.block_sparse_moe.{gate.weight, experts.N.w1/w3 (F, C), w2 (C, F)}
CHECKPOINT_KEY = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.")
_EXPERT = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def rename(name: str) -> str:
    """The router, stored as block_sparse_moe.gate, is the model's mlp.gate."""
    return name.replace(".block_sparse_moe.gate.", ".mlp.gate.")


def sanitize(weights: dict, args) -> dict:
    return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}


def convert(ops, weights: dict, args) -> dict:
    """Stack the per-expert w1/w3 (gate, up) and w2 (down) into transformers v5's fused
    3D parameters, one layer at a time."""
    return moe_checkpoint.fuse_experts(ops, weights, args, _EXPERT,
                                       gate="w1", up="w3", down="w2")


def stacked(name: str, shape: tuple) -> list | None:
    """The per-expert tensors a stacked expert array is made of (--shard reads slices)."""
    return moe_checkpoint.expert_pieces(name, shape, "block_sparse_moe.experts.{e}.{proj}.weight",
                                        gate="w1", up="w3", down="w2")
