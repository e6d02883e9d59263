"""The training loop for GRPO (--method grpo): core/train.Trainer whose batches are prompts.

Each step: every prompt of the step gets num_generations completions sampled from the
adapter being trained (core/engine.py, the adapter attached; each completion from its own
seed, a function of (run seed, step, prompt, index), so a run and its resume sample the
same), the user's reward function scores them, each completion's advantage is its reward
normalised within its group, and one optimisation step follows on core/grpo_loss's loss
(TRL's, averaged over every completion token of the step; no PPO-style repeated passes
over a generation batch). The KL to the base (beta > 0) needs the base's per-token
log-probabilities: the same model with the adapter leaves left out, without a graph.
One process only for now; no validation pass (a reward is not a held-out loss).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np

from lorafit.core import grpo_loss as gl
from lorafit.core.data import Batch, _rng
from lorafit.core.engine import Engine, Request
from lorafit.core.errors import LorafitError
from lorafit.core.examples import Example, ExampleSet
from lorafit.core.generate import eos_token_ids
from lorafit.core.grpo_data import PromptSet
from lorafit.core.preference_data import _padded
from lorafit.core.rewards import load_reward, score
from lorafit.core.train import Trainer


@dataclass(eq=False)
class PromptBatch:
    """Prompt indices of one micro-batch; input_ids: the rows last sampled from them
    (prompt + completion, padded), which the step report and memory lines count."""
    ks: np.ndarray
    input_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))


@dataclass
class Sampled:
    """One micro-batch after sampling and scoring."""
    batch: Batch  # numpy; loss mask on the completion tokens
    advantages: np.ndarray  # (rows,) float32
    rewards: np.ndarray  # (rows,) float64
    lengths: np.ndarray  # completion tokens per row (an end-of-sequence token included)


class GRPOTrainer(Trainer):
    def __init__(self, model, cfg, train: PromptSet, *args, tokenizer=None, reward=None,
                 **kwargs):
        if model.backend.world_size > 1:
            raise LorafitError("--method grpo runs in one process for now")
        self.prompts = train
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.reward_fn = reward if reward is not None else load_reward(cfg.reward)
        self.eos_ids = frozenset(eos_token_ids(self.tokenizer, model.args))
        self._engine: Engine | None = None
        self._metrics: dict = {}
        super().__init__(model, cfg, train.examples, (), *args, **kwargs)

    # -- data -----------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list:
        n, b = len(self.prompts), self.cfg.batch_size
        order = _rng(self.cfg.seed, 3, epoch).permutation(n)
        return [PromptBatch(order[i:i + b]) for i in range(0, n, b)]

    # -- sampling -------------------------------------------------------------------------
    def _engine_now(self) -> Engine:
        """The engine over the model with the adapter attached, the current weights in."""
        if self._engine is None:
            rows = self.cfg.batch_size * self.cfg.num_generations
            model = self.model
            if model.lora.dropout:  # sampling is inference: the adapter without dropout
                model = copy.copy(model)
                model.lora = replace(model.lora, dropout=0.0)
            self._engine = Engine(model, max_batch=min(rows, 64), max_len=self.cfg.seq_len)
        self._engine.params.update(self.trainable)
        return self._engine

    def sample(self, pb: PromptBatch, step: int) -> Sampled:
        """num_generations completions per prompt of pb, scored; rows group by group."""
        c, tok = self.cfg, self.tokenizer
        engine = self._engine_now()
        prompts, outs = [], []
        for k in pb.ks:
            ids = self.prompts.examples[int(k)].input_ids.tolist()
            for g in range(c.num_generations):
                out: list = []
                seed = int(np.random.SeedSequence([c.seed, step, int(k), g]).generate_state(1)[0])
                engine.submit(Request(ids, c.max_new_tokens, c.temperature, 1.0, seed,
                                      eos_ids=self.eos_ids,
                                      on_token=lambda t, _, out=out: out.append(t)))
                prompts.append((int(k), ids))
                outs.append(out)
        engine.run_until_done()
        texts = [tok.decode([t for t in o if t not in self.eos_ids], skip_special_tokens=True)
                 for o in outs]
        rewards = np.asarray(score(self.reward_fn, [self.prompts.prompts[k] for k, _ in prompts],
                                   texts, completion_ids=[list(o) for o in outs]), np.float64)
        return self.sampled_batch([ids for _, ids in prompts], outs, rewards, pb)

    def sampled_batch(self, prompt_ids, completions, rewards, pb=None) -> Sampled:
        """The training rows of sampled completions (loss on the completion tokens)."""
        rows = [Example(np.asarray(p + list(o), np.int32),
                        np.asarray([False] * len(p) + [True] * len(o)), "sampled")
                for p, o in zip(prompt_ids, completions)]
        batch = _padded(ExampleSet.from_examples(rows), [[i] for i in range(len(rows))])
        if pb is not None:
            pb.input_ids = batch.input_ids
        rewards = np.asarray(rewards, np.float64)
        return Sampled(batch, gl.advantages(rewards, self.cfg.num_generations), rewards,
                       np.asarray([len(o) for o in completions]))

    # -- one step -------------------------------------------------------------------------
    def _loss(self, trainable, batch: Batch, ref, adv, denom):
        logps = gl.token_logps(self.ops, self.model, {**self.frozen, **trainable}, batch,
                               self.cfg.grad_checkpoint)
        total, kl = gl.grpo_terms(self.ops, logps, ref, adv, batch.loss_mask, self.cfg.beta)
        if kl is None:
            kl = self.ops.stop_gradient(total) * 0
        return total / denom, (total, kl)

    def _reference(self, bb: Batch):
        ops = self.ops
        if not self.cfg.beta:  # TRL's default: no reference pass
            return ops.zeros(tuple(bb.input_ids.shape))
        ref = gl.reference_token_logps(ops, self.model, self.frozen, bb)
        ops.materialize(ref)
        return ref

    def train_step(self, micro: list, lr: float) -> tuple[float, float, bool]:
        ops, c = self.ops, self.cfg
        ops.seed(c.seed * 1_000_003 + self.pos.step)
        sampled = [self.sample(pb, self.pos.step) for pb in micro]
        tokens = sum(s.batch.n_tokens for s in sampled)
        loss_scale = self.loss_scale.scale if self.loss_scale else 1.0
        denom = ops.from_numpy(np.asarray(tokens / loss_scale, np.float32))
        acc, total, kl = None, None, 0.0
        for s in sampled:
            bb = self._on_backend(s.batch)
            ref = self._reference(bb)
            (_, (part, kl_part)), grads = self.grad_fn(self.trainable, bb, ref,
                                                       ops.from_numpy(s.advantages), denom)
            acc = grads if acc is None else {k: acc[k] + grads[k] for k in acc}
            total = part if total is None else total + part
            ops.materialize(acc, total)
            kl += ops.to_float(kl_part)
        self._metrics = self._step_metrics(sampled, kl / max(tokens, 1))
        return self._apply(acc, ops.to_float(total) / tokens, lr, loss_scale)

    def _step_metrics(self, sampled: list, kl: float) -> dict:
        """StepReport's GRPO fields: the rewards' mean, the mean of the groups' standard
        deviations (TRL's reward_std), the token-mean KL to the base (None at beta 0) and
        the mean completion length."""
        g = self.cfg.num_generations
        rewards = np.concatenate([s.rewards for s in sampled])
        lengths = np.concatenate([s.lengths for s in sampled])
        return {"reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.reshape(-1, g).std(1, ddof=1).mean()),
                "kl": float(kl) if self.cfg.beta else None,
                "completion_length": float(lengths.mean())}

    def _extra_report(self) -> dict:
        return dict(self._metrics)

    def evaluate(self) -> float:  # never called: no validation set
        raise LorafitError("--method grpo has no validation pass")
