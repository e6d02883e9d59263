"""Qwen3.5 (dense): a hybrid of Gated DeltaNet linear-attention layers
(models/blocks/gated_deltanet.py) and full-attention layers whose q_proj also makes an
output gate, with per-head q/k RMSNorm and RoPE on the first quarter of each head
(partial_rotary_factor). Every RMSNorm but the DeltaNet's gated one scales by (1 + w).

The published checkpoints are the vision-language model (model_type qwen3_5, the text
model under text_config, weights under model.language_model.*); lorafit trains its text
model, as transformers' Qwen3_5ForCausalLM does: the vision tower and the multi-token-
prediction head are dropped. qwen3_5_text is the text model's own config.

qwen3_5_moe(_text) is the same hybrid with a sparse MoE on every layer: many small routed
experts plus a gated shared expert (models/blocks/moe.py). Its experts load from the
per-expert layout (what transformers writes) or the fused 3D parameters.
"""

from __future__ import annotations

import re

from lorafit.models.families import llama, moe_checkpoint


def _qwen3_5_text(cfg: dict) -> dict:
    cfg["qk_norm"] = True
    cfg["norm_offset"] = 1.0  # (1 + w) in float32
    cfg["attention_output_gate"] = True
    if cfg.get("attention_bias"):  # o_proj has a bias too
        cfg["o_proj_bias"] = True
    if cfg.get("layer_types") is None:  # transformers' default: every 4th layer is full
        every = cfg.get("full_attention_interval", 4)
        cfg["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                              for i in range(cfg["num_hidden_layers"])]
    rope = cfg.get("rope_parameters") or {}
    if "partial_rotary_factor" not in cfg and "partial_rotary_factor" not in rope:
        cfg["partial_rotary_factor"] = 0.25  # transformers' default for this family
    return cfg


def _qwen3_5(cfg: dict) -> dict:
    """The vision-language config: its text_config, with the top-level tying."""
    text = dict(cfg.get("text_config") or {})
    text.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    text["model_type"] = cfg["model_type"]
    return _qwen3_5_text(text)


def shared_expert_moe(cfg: dict, sparse: list) -> dict:
    """The MoE switches of qwen3_next and qwen3_5_moe: `num_experts` routed experts of
    `moe_intermediate_size` on the `sparse` layers (softmax, top k, renormalised when
    `norm_topk_prob`) and a shared expert of `shared_expert_intermediate_size` with its
    sigmoid gate (models/blocks/moe.py)."""
    cfg["num_local_experts"] = cfg.get("num_experts") or 0
    cfg["moe_layers"] = sparse
    cfg["router"] = "softmax_topk"
    cfg["shared_expert_size"] = cfg.get("shared_expert_intermediate_size") or 0
    cfg.setdefault("intermediate_size", cfg.get("moe_intermediate_size"))  # no dense MLP
    return cfg


def _qwen3_5_moe_text(cfg: dict) -> dict:
    """Every layer sparse; transformers' router always renormalises the top k."""
    cfg["norm_topk_prob"] = True
    cfg["moe_linear_only"] = True  # PEFT maps no expert names for qwen3_5_moe
    return shared_expert_moe(_qwen3_5_text(cfg), list(range(cfg["num_hidden_layers"])))


def _qwen3_5_moe(cfg: dict) -> dict:
    return _qwen3_5_moe_text(_qwen3_5(cfg))


CONFIGURE = {"qwen3_5_text": _qwen3_5_text, "qwen3_5": _qwen3_5,
             "qwen3_5_moe_text": _qwen3_5_moe_text, "qwen3_5_moe": _qwen3_5_moe}


# the vision-language checkpoints' text-model prefixes (transformers', mlx-lm's)
PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
            ("language_model.lm_head.", "lm_head."))


def rename(name: str) -> str:
    """A checkpoint tensor's name under transformers' causal-LM names (the text model's
    tensors of a vision-language checkpoint lose their language_model prefix; the vision
    tower's and the multi-token-prediction head's keep names the model does not have)."""
    for old, new in PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


CHECKPOINT_KEY = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.")
_EXPERT = re.compile(r"(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)"
                     r"\.weight")


def convert(ops, weights: dict, args) -> dict:
    """Per-expert MoE tensors fused into the stacked experts (none on a dense model)."""
    return moe_checkpoint.fuse_experts(ops, weights, args, _EXPERT,
                                       gate="gate_proj", up="up_proj", down="down_proj")


def stacked(name: str, shape: tuple) -> list | None:
    """The per-expert tensors a stacked expert array is made of (--shard reads slices)."""
    return moe_checkpoint.expert_pieces(name, shape, "mlp.experts.{e}.{proj}.weight",
                                        gate="gate_proj", up="up_proj", down="down_proj")


sanitize = llama.sanitize  # the same tensors to drop
