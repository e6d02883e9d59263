"""The training loop for preference tuning (--method dpo|orpo|kto): core/train.Trainer with
batches of pairs and a preference loss; everything else (the step loop, checkpoints and
exact resume, control, evaluation cadence, several processes) is the SFT trainer's.

A step's loss is a mean over the step's pairs (ORPO adds the NLL of the chosen
completions, a mean over their tokens), so each micro-batch's sums are divided by the
counts of the whole step, known in advance from the numpy masks: accumulation equals one
big batch. The reference log-probabilities (DPO) come from the same model with the adapter
leaves left out, computed without a graph before the policy's forward and backward.
"""

from __future__ import annotations

import math

import numpy as np

from lorafit.core import preference_loss as pl
from lorafit.core.data import Batch
from lorafit.core.errors import LorafitError
from lorafit.core.launch import shard
from lorafit.core.preference_data import LabelledBatch, PreferenceSet, preference_batches
from lorafit.core.train import _LOSS, Trainer

_STATS = "\0rewards"  # reward sums travel with the gradients (no adapter key looks like it)


class PreferenceTrainer(Trainer):
    shards_base = True  # --shard cuts the frozen base too (every rank runs the same passes)

    def __init__(self, model, cfg, train: PreferenceSet, val: PreferenceSet | None = None,
                 *args, **kwargs):
        kind = "labelled" if cfg.method == "kto" else "pairs"
        if train.kind != kind:
            raise LorafitError(f"--method {cfg.method} needs "
                               f"{'prompt/completion/label' if kind == 'labelled' else 'prompt/chosen/rejected'} records")
        if cfg.method == "kto" and cfg.batch_size < 2:
            raise LorafitError("--method kto needs --batch-size 2 or more: its KL estimate "
                               "pairs each prompt with another completion of the batch")
        self.pref, self.pref_val = train, val
        self._rewards: dict | None = None  # the last step's reward statistics (StepReport)
        super().__init__(model, cfg, train.examples, () if val is None else val.examples,
                         *args, **kwargs)

    # -- data -----------------------------------------------------------------------------
    def _data_counts(self) -> tuple[int, int, str]:
        """Pairs, not their two rows each (KTO: labelled completions, one row each)."""
        val = len(self.pref_val) if self.pref_val is not None else 0
        return len(self.pref), val, "pairs" if self.pref.kind == "pairs" else "completions"

    def _epoch_batches(self, epoch: int) -> list[Batch]:
        return preference_batches(self.pref, self.cfg.batch_size, self.cfg.seed, epoch)

    @staticmethod
    def _counts(b) -> tuple[int, int]:
        """(pairs, completion tokens of the chosen rows) of a numpy batch; KTO:
        (completions, 0)."""
        if isinstance(b, LabelledBatch):
            return b.input_ids.shape[0], 0
        half = b.input_ids.shape[0] // 2
        return half, int(np.asarray(b.loss_mask[:half]).sum())

    @staticmethod
    def _stats(b, rc, rr) -> np.ndarray:
        """[chosen reward sum, count, rejected reward sum, count, pairs ranked right,
        pairs] of one micro-batch (KTO: desirable and undesirable completions)."""
        rc, rr = rc.astype(np.float64), rr.astype(np.float64)
        if isinstance(b, LabelledBatch):
            lab = np.asarray(b.labels, bool)
            return np.array([rc[lab].sum(), lab.sum(), rc[~lab].sum(), (~lab).sum(), 0, 0])
        n = rc.size
        return np.array([rc.sum(), n, rr.sum(), n, float((rc > rr).sum()), n])

    # -- one step -------------------------------------------------------------------------
    def _objective(self, params, batch: Batch, ref, side, denoms, recompute: bool):
        """(this batch's share of the step's loss, chosen rewards, rejected rewards).
        side: (completion tokens per row,), or KTO's (desirable 1/0 per row, kl)."""
        c, ops = self.cfg, self.ops
        logps = pl.row_logps(ops, self.model, params, batch, recompute)
        if c.method == "kto":
            losses, rewards = pl.kto(ops, logps, ref, side[0], side[1], c.beta,
                                     c.kto_desirable_weight, c.kto_undesirable_weight)
            return losses.sum() / denoms[0], rewards, rewards
        counts = side[0]
        if c.method == "dpo":
            losses, rc, rr = pl.dpo(ops, logps, ref, counts, c.beta, c.dpo_loss)
            return losses.sum() / denoms[0], rc, rr
        terms, rc, rr = pl.orpo(ops, logps, counts, c.orpo_lambda)
        half = logps.shape[0] // 2
        nll = -logps[:half].sum()
        return nll / denoms[1] + terms.sum() / denoms[0], rc, rr

    def _loss(self, trainable, batch: Batch, ref, side, denoms):
        loss, rc, rr = self._objective({**self.frozen, **trainable}, batch, ref, side,
                                       denoms, self.cfg.grad_checkpoint)
        return loss, (loss, rc, rr)

    def _prepare(self, b):
        """(backend batch, reference log-probs, side inputs: see _objective)."""
        ops = self.ops
        if isinstance(b, LabelledBatch):
            bb = self._on_backend(b.batch)
            ref = pl.reference_logps(ops, self.model, self.frozen, bb)
            ops.materialize(ref)
            kl_batch = self._on_backend(b.kl)
            with ops.inference():  # TRL's kl: detached, clamped at 0
                policy = pl.row_logps(ops, self.model, {**self.frozen, **self.trainable},
                                      kl_batch, False)
            base = pl.reference_logps(ops, self.model, self.frozen, kl_batch)
            kl = max(float(ops.to_numpy(policy - base).mean()), 0.0)
            return bb, ref, (ops.from_numpy(np.asarray(b.labels, np.float32)),
                             ops.from_numpy(np.asarray(kl, np.float32)))
        bb = self._on_backend(b)
        counts = ops.from_numpy(np.asarray(b.loss_mask).sum(1).astype(np.float32))
        if self.cfg.method == "dpo":
            ref = pl.reference_logps(ops, self.model, self.frozen, bb)
        else:  # ORPO has no reference model
            ref = ops.zeros((b.input_ids.shape[0],))
        ops.materialize(ref)  # the reference pass ends before the policy's begins
        return bb, ref, (counts,)

    def train_step(self, micro: list[Batch], lr: float) -> tuple[float, float, bool]:
        ops = self.ops
        pairs, tokens = (sum(x) for x in zip(*(self._counts(b) for b in micro)))
        if pairs == 0:
            return math.nan, math.nan, False
        ops.seed(self.cfg.seed * 1_000_003 + self.pos.step + 7_919 * self.rank)
        loss_scale = self.loss_scale.scale if self.loss_scale else 1.0
        denoms = ops.from_numpy(np.asarray([pairs / loss_scale, max(tokens, 1) / loss_scale],
                                           dtype=np.float32))
        acc, total, stats = None, None, np.zeros(6, np.float64)
        for b in shard(micro, self.rank, self.world_size):
            bb, ref, counts = self._prepare(b)
            (_, (part, rc, rr)), grads = self.grad_fn(self.trainable, bb, ref, counts, denoms)
            acc = grads if acc is None else {k: acc[k] + grads[k] for k in acc}
            total = part if total is None else total + part
            ops.materialize(acc, total)
            rc, rr = ops.to_numpy(rc), ops.to_numpy(rr)
            stats += self._stats(b, rc, rr)
        if self.world_size > 1:
            summed = ops.all_reduce({**acc, _LOSS: total,
                                     _STATS: ops.from_numpy(stats.astype(np.float32))})
            total = summed.pop(_LOSS)
            stats = ops.to_numpy(summed.pop(_STATS)).astype(np.float64)
            acc = summed
        self._rewards = self._reward_fields(stats)
        return self._apply(acc, ops.to_float(total) / loss_scale, lr, loss_scale)

    @staticmethod
    def _reward_fields(stats) -> dict:
        """StepReport's reward fields from summed _stats (None where nothing was seen)."""
        chosen = stats[0] / stats[1] if stats[1] else None
        rejected = stats[2] / stats[3] if stats[3] else None
        return {"reward_chosen": chosen, "reward_rejected": rejected,
                "reward_margin": None if chosen is None or rejected is None
                else chosen - rejected,
                "reward_accuracy": stats[4] / stats[5] if stats[5] else None}

    def _extra_report(self) -> dict:
        return dict(self._rewards or {})

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> float:
        """The preference loss over the validation pairs (the training objective)."""
        ops, c = self.ops, self.cfg
        batches = preference_batches(self.pref_val, c.batch_size, c.seed, 0)
        pairs, tokens = (sum(x) for x in zip(*(self._counts(b) for b in batches)))
        denoms = ops.from_numpy(np.asarray([pairs, max(tokens, 1)], dtype=np.float32))
        params = {**self.frozen, **self.trainable}
        total = 0.0
        mine = shard(batches, self.rank, self.world_size)
        # a sharded base gathers each layer from every rank: all run as many passes (a
        # rank short of a batch runs its first one again and drops the result)
        spare = -(-len(batches) // self.world_size) - len(mine) if self.base_sharded else 0
        for j, b in enumerate(mine + [batches[0]] * spare):
            bb, ref, counts = self._prepare(b)
            with ops.inference():
                part, _, _ = self._objective(params, bb, ref, counts, denoms, False)
            if j < len(mine):
                total += ops.to_float(part)
        if self.world_size > 1:
            arr = ops.from_numpy(np.asarray([total], dtype=np.float32))
            total = float(ops.to_numpy(ops.all_reduce({"loss": arr})["loss"])[0])
        return total
