"""Qwen3-Next: the qwen3_5 hybrid (Gated DeltaNet and gated full-attention layers, partial
rotary, (1 + w) norms) with the DeltaNet's input projections fused per key head
(in_proj_qkvz, in_proj_ba) and mixture-of-experts MLPs.

Only configs whose MLPs are all dense load here (num_experts 0, or every layer in
mlp_only_layers): the experts need the MoE block, which is not in this family yet, so a
config with expert layers is a one-line error, never a silently dense model.
"""

from __future__ import annotations

from lorafit.core.errors import LorafitError
from lorafit.models.families.qwen3_5 import _qwen3_5_text, rename, sanitize  # noqa: F401


def _qwen3_next(cfg: dict) -> dict:
    n, dense = cfg["num_hidden_layers"], set(cfg.get("mlp_only_layers") or [])
    experts, step = cfg.get("num_experts", 0) or 0, cfg.get("decoder_sparse_step", 1) or 1
    sparse = [i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0]
    if sparse:
        raise LorafitError(f"qwen3_next with mixture-of-experts MLPs ({len(sparse)} of {n} "
                           f"layers) is not supported yet; only its dense-MLP configs load")
    cfg["linear_fused_projections"] = True
    return _qwen3_5_text(cfg)


CONFIGURE = {"qwen3_next": _qwen3_next}
