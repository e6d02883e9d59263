"""GRPO's loss in backend ops, with TRL 1.16's defaults (GRPOConfig: loss_type "dapo",
beta 0.0, use_bias_correction_kl, scale_rewards "group"), so both backends compute the
numbers TRL does (tests/core/test_grpo.py checks them against TRL's own _compute_loss).

Per completion token, with ratio = exp(logp - stop_gradient(logp)) (1 in value: one
optimisation step per generation batch, so the old policy is the current one and PPO's
clipping never acts):
    loss_t = -ratio * A  +  beta * ratio * (exp(ref - logp) - (ref - logp) - 1)
A is the completion's group-normalised advantage, ref the base model's (adapter off)
log-probability, the second term the k3 estimate of KL(policy || base), multiplied by the
ratio as TRL's use_bias_correction_kl does. "dapo": the sum over every completion token of
the step divided by their count (a token mean over the whole generation batch).
"""

from __future__ import annotations

import numpy as np

from lorafit.models import decoder


def token_logps(ops, model, params: dict, batch, recompute: bool):
    """log p(target) at every position: (rows, T) float32 (padding included: mask it).
    The full logits are formed (v1: completions are short)."""
    h = model.hidden(batch.input_ids, batch.positions, params=params,
                     segment_ids=batch.segment_ids, recompute=recompute)
    logits = decoder.head(ops, model.args, h, decoder.output_weight(params))
    lp = ops.log_softmax(logits)
    return ops.take_along_axis(lp, batch.targets[..., None])[..., 0]


def reference_token_logps(ops, model, frozen: dict, batch):
    """token_logps of the base model (the adapter off), as a constant."""
    with ops.inference():
        return ops.stop_gradient(token_logps(ops, model, frozen, batch, False))


def advantages(rewards: np.ndarray, group: int) -> np.ndarray:
    """(r - group mean) / (group std + 1e-4) per completion, the std with Bessel's
    correction (TRL's scale_rewards "group"); rewards are laid out group by group."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    mean = r.mean(1, keepdims=True)
    std = r.std(1, ddof=1, keepdims=True)
    return ((r - mean) / (std + 1e-4)).reshape(-1).astype(np.float32)


def grpo_terms(ops, logps, ref, adv, mask, beta: float):
    """(masked sum of the per-token losses, masked sum of the per-token KL) over a batch
    of completions. logps, ref, mask (rows, T); adv (rows,)."""
    ratio = ops.exp(logps - ops.stop_gradient(logps))
    per_token = -ratio * adv[:, None]
    if beta:
        d = ref - logps
        kl = ops.exp(d) - d - 1
        per_token = per_token + beta * (kl * ratio)
        kl_sum = ops.stop_gradient((kl * mask).sum())
    else:
        kl_sum = None
    return (per_token * mask).sum(), kl_sum
