"""Qwen3-MoE: the Qwen3 decoder (per-head q/k RMSNorm) with a sparse mixture-of-experts MLP
(models/blocks/moe.py) on the layers transformers makes sparse: not in `mlp_only_layers`
and (i + 1) a multiple of `decoder_sparse_step`; the others keep a dense MLP of
`intermediate_size`. Routing: softmax over all experts, the top k, renormalised only when
`norm_topk_prob`. A window (all layers) only with `use_sliding_window`, as transformers.

Checkpoints: the Hub's per-expert `mlp.experts.N.gate_proj/up_proj/down_proj` (also what
transformers v5's save_pretrained writes) or the fused v5 parameters; both load.
"""

from __future__ import annotations

from lorafit.models.families import llama, qwen3_5


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

# the Hub's per-expert layout (mlp.experts.N.gate_proj/up_proj/down_proj) is Qwen3.5-MoE's:
# the same keys, fused and sliced the same way; the rest as Llama drops it
CHECKPOINT_KEY, convert, stacked = qwen3_5.CHECKPOINT_KEY, qwen3_5.convert, qwen3_5.stacked
sanitize = llama.sanitize
