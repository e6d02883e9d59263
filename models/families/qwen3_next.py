"""Qwen3-Next: the qwen3_5 hybrid (Gated DeltaNet and gated full-attention layers, partial
rotary, (1 + w) norms) with the DeltaNet's input projections fused per key head
(in_proj_qkvz, in_proj_ba) and mixture-of-experts MLPs: routed experts plus a gated shared
expert (models/blocks/moe.py) on the layers transformers makes sparse (not in
`mlp_only_layers`, (i + 1) a multiple of `decoder_sparse_step`), dense MLPs of
`intermediate_size` on the others.
"""

from __future__ import annotations

from lorafit.models.families import qwen3_5
from lorafit.models.families.qwen3_5 import _qwen3_5_text, shared_expert_moe

# Qwen3.5's checkpoint layout: its converted keys, their conversion, renames and drops
CHECKPOINT_KEY, convert, rename, sanitize, stacked = (
    qwen3_5.CHECKPOINT_KEY, qwen3_5.convert, qwen3_5.rename, qwen3_5.sanitize, qwen3_5.stacked)


def _qwen3_next(cfg: dict) -> dict:
    n, dense = cfg["num_hidden_layers"], set(cfg.get("mlp_only_layers") or [])
    experts, step = cfg.get("num_experts", 0) or 0, cfg.get("decoder_sparse_step", 1) or 1
    sparse = [i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0]
    cfg["linear_fused_projections"] = True
    cfg["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", True))
    return shared_expert_moe(_qwen3_5_text(cfg), sparse)


CONFIGURE = {"qwen3_next": _qwen3_next}
