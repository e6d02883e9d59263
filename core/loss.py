"""The training objective: token cross-entropy over the positions a batch marks for loss."""

from __future__ import annotations

LOGIT_CHUNK_ELEMENTS = 2**22  # logits formed at once by the fused head + loss (16 MiB fp32):
# 131 rows at a 32k vocabulary. The default, and MLX's: MLX chains its chunks one after
# another in one lazy graph (backends/mlx) and about two of them are alive at once, so
# larger chunks cost it memory without a gain.
LOGIT_CHUNK_BY_BACKEND = {"torch": 2**24}  # 524 rows at 32k: longer GEMMs made torch's
# head + loss ~1.4x faster on the CPU (one chunk alive at a time, freed before the next)


def logit_chunk_elements(backend: str) -> int:
    """Logits one chunk of the fused head + loss holds on `backend` (the estimator and the
    backends' `logit_chunk_elements` both read this)."""
    return LOGIT_CHUNK_BY_BACKEND.get(backend, LOGIT_CHUNK_ELEMENTS)


def chunk_rows(vocab_size: int, elements: int = LOGIT_CHUNK_ELEMENTS) -> int:
    """Rows of logits formed at once by the fused head + loss (`elements` per chunk: pass
    the backend's `logit_chunk_elements`)."""
    return max(16, elements // vocab_size)


def batch_loss(ops, model, params: dict, batch, recompute: bool):
    """(sum of token losses, loss-token count) for one `core.data.Batch` of backend arrays."""
    h = model.hidden(batch.input_ids, batch.positions, params=params,
                     segment_ids=batch.segment_ids, recompute=recompute)
    n = batch.input_ids.shape[0] * batch.input_ids.shape[1]
    weight = model.output_weight(params)
    rows = chunk_rows(weight.shape[0], ops.logit_chunk_elements)
    return ops.linear_cross_entropy(h.reshape(n, -1), weight, batch.targets.reshape(n),
                                    batch.loss_mask.reshape(n), rows,
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
