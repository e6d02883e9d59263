"""The training objective: token cross-entropy over the positions a batch marks for loss."""

from __future__ import annotations


def batch_loss(B, model, params: dict, batch_arrays: tuple, recompute: bool):
    """(sum of token losses, loss-token count) for one batch of backend arrays."""
    ids, targets, mask, pos, seg = batch_arrays
    fam, args = model.fam, model.args
    h = fam.hidden_states(B, args, params, ids, pos, segment_ids=seg, lora=model.lora,
                          recompute=recompute)
    n = ids.shape[0] * ids.shape[1]
    weight = fam.output_weight(params)
    return B.linear_cross_entropy(h.reshape(n, -1), weight, targets.reshape(n),
                                  mask.reshape(n), chunk_rows(weight.shape[0]))


LOGIT_CHUNK_ELEMENTS = 2**22


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits formed at once by the fused head + loss: ~16 MiB of float32."""
    return max(16, LOGIT_CHUNK_ELEMENTS // vocab_size)
