"""The training objective: token cross-entropy over the positions a batch marks for loss."""

from __future__ import annotations


def batch_loss(B, model, params: dict, batch_arrays: tuple, recompute: bool):
    """(sum of token losses, loss-token count) for one batch of backend arrays."""
    ids, targets, mask, pos, seg = batch_arrays
    fam, args = model.fam, model.args
    h = fam.hidden_states(B, args, params, ids, pos, segment_ids=seg, lora=model.lora,
                          recompute=recompute)
    logits = B.linear(h, fam.output_weight(params))
    n = ids.shape[0] * ids.shape[1]
    return B.cross_entropy(logits.reshape(n, -1), targets.reshape(n), mask.reshape(n))
