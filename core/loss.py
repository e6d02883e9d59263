"""The training objective: token cross-entropy over the positions a batch marks for loss."""

from __future__ import annotations

LOGIT_CHUNK_ELEMENTS = 2**22  # logits formed at once by the fused head + loss (16 MiB fp32):
# 131 rows at a 32k vocabulary. 2**24 made torch's head + loss ~1.4x faster on 2 CPU threads
# (longer GEMMs), but MLX chains its chunks one after another (backends/mlx) and about two of
# them are alive at once, so larger chunks would cost MLX memory: one size serves both for now


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits formed at once by the fused head + loss."""
    return max(16, LOGIT_CHUNK_ELEMENTS // vocab_size)


def batch_loss(ops, model, params: dict, batch, recompute: bool):
    """(sum of token losses, loss-token count) for one `core.data.Batch` of backend arrays."""
    h = model.hidden(batch.input_ids, batch.positions, params=params,
                     segment_ids=batch.segment_ids, recompute=recompute)
    n = batch.input_ids.shape[0] * batch.input_ids.shape[1]
    weight = model.output_weight(params)
    return ops.linear_cross_entropy(h.reshape(n, -1), weight, batch.targets.reshape(n),
                                    batch.loss_mask.reshape(n), chunk_rows(weight.shape[0]),
                                    softcap=model.args.final_logit_softcapping)


def batch_loss_with_router(ops, model, params: dict, batch, recompute: bool):
    """batch_loss plus the router load-balancing loss of that forward over its loss
    positions (models/blocks/moe.py; None for a model without experts)."""
    from lorafit.models.blocks import moe

    if not model.args.num_local_experts:
        return batch_loss(ops, model, params, batch, recompute), None
    with moe.recording_router_logits() as router:
        out = batch_loss(ops, model, params, batch, recompute)
    if not router:
        return out, None
    mask = batch.loss_mask.reshape(-1)  # the positions that carry loss (never padding)
    return out, moe.load_balancing_loss_ops(ops, model.args, router, mask)
