"""Preference losses (DPO and its IPO/hinge variants, ORPO, KTO) in backend ops, with TRL's
definitions, so that both backends compute the same numbers TRL does (tests/core/
test_preference.py checks them against TRL's own code).

Sequence log-probability: the sum of the completion's token log-probabilities (TRL's
default for DPO and KTO); ORPO uses their mean. The reference is the base model, i.e. the
same weights with the adapter leaves left out of the params (no second copy); its
log-probabilities are computed without a graph and passed in as constants.
"""

from __future__ import annotations

from lorafit.core.loss import chunk_rows


def row_logps(ops, model, params: dict, batch, recompute: bool):
    """Sum of log p(target) over each row's loss positions: (rows,) array. Every row of the
    batch (chosen and rejected) goes through one fused head + cross-entropy pass, chunked as
    the SFT loss is, which keeps each token's loss: no logits are kept, and the head runs
    as a few long products instead of one short one per row."""
    h = model.hidden(batch.input_ids, batch.positions, params=params,
                     segment_ids=batch.segment_ids, recompute=recompute)
    weight = model.output_weight(params)
    rows, width = batch.input_ids.shape
    n = rows * width
    tokens, _ = ops.linear_cross_entropy(h.reshape(n, -1), weight, batch.targets.reshape(n),
                                         batch.loss_mask.reshape(n),
                                         chunk_rows(weight.shape[0], ops.logit_chunk_elements),
                                         softcap=model.args.final_logit_softcapping,
                                         per_token=True)
    return -tokens.reshape(rows, width).sum(1)


def reference_logps(ops, model, frozen: dict, batch):
    """row_logps of the base model (the adapter off), as a constant."""
    with ops.inference():
        return ops.stop_gradient(row_logps(ops, model, frozen, batch, False))


def _halves(x):
    n = x.shape[0] // 2
    return x[:n], x[n:]


def dpo(ops, logps, ref_logps, counts, beta: float, loss_type: str = "sigmoid"):
    """(per-pair losses, chosen rewards, rejected rewards) for rows [chosen..., rejected...]
    (TRL's DPOTrainer._compute_loss with f_divergence reverse_kl). counts: completion
    tokens per row (IPO averages the log-ratios over them)."""
    c, r = _halves(logps)
    rc, rr = _halves(ref_logps)
    chosen_lr, rejected_lr = c - rc, r - rr
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        losses = -ops.log_sigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = ops.relu(1 - beta * delta)
    elif loss_type == "ipo":
        nc, nr = _halves(counts)
        d = chosen_lr / nc - rejected_lr / nr
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return losses, ops.stop_gradient(beta * chosen_lr), ops.stop_gradient(beta * rejected_lr)


def orpo(ops, logps, counts, lam: float):
    """(per-pair odds-ratio terms -lam * log sigmoid(log odds), chosen rewards, rejected
    rewards) from summed log-probs: ORPO works on the mean token log-prob of each
    completion (TRL's ORPOTrainer.odds_ratio_loss); its rewards are lam * those means.
    The NLL of the chosen completions is added by the caller (it is a token mean)."""
    mean = logps / counts
    c, r = _halves(mean)
    log_odds = (c - r) - (ops.log1m_exp(c) - ops.log1m_exp(r))
    return -lam * ops.log_sigmoid(log_odds), ops.stop_gradient(lam * c), \
        ops.stop_gradient(lam * r)


def kto(ops, logps, ref_logps, desirable, kl, beta: float, desirable_weight: float,
        undesirable_weight: float):
    """(per-completion weighted losses, rewards) of TRL's KTO (loss_type "kto"): a desirable
    completion's loss is 1 - sigmoid(beta (log-ratio - kl)), an undesirable one's
    1 - sigmoid(beta (kl - log-ratio)). desirable: 1.0 / 0.0 per row; kl: the batch's
    clamped, constant estimate from mismatched completions."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - ops.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - ops.sigmoid(beta * (kl - ratio)))
    return desirable * good + (1 - desirable) * bad, ops.stop_gradient(beta * ratio)
