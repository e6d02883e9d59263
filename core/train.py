"""The training loop. It knows nothing of torch or mlx: it calls the backend object's ops
through the model functions, and converts to Python floats only at report time.

One optimizer step consumes `grad_accum` micro-batches from a stream that runs across
epochs; each micro-batch's loss is divided by the number of loss tokens of the whole step
(known in advance from the numpy masks), so accumulation equals one big batch exactly.
A checkpoint is taken only between steps: stopping mid-accumulation finishes the step.

Several processes (data parallel, `ops.world_size` > 1): a step consumes
grad_accum x world_size micro-batches of the same stream; each rank computes every
world-th of them (core/launch.shard) against the token count of the whole step, the adapter
gradients and loss sums are all-reduced, and every rank applies the same update. So N
processes equal one process with grad_accum x N, and the data position stays in global
micro-batches: a checkpoint does not depend on the world size. Only rank 0 has a run folder
(sinks, checkpoints, the adapter); control requests are agreed on at each step boundary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.checkpoint import save_checkpoint
from lorafit.core.adapter_io import save_peft
from lorafit.core.data import Batch, make_batches
from lorafit.core.examples import ExampleSet
from lorafit.core.errors import LorafitError
from lorafit.core.launch import shard
from lorafit.core.lora import adapter_leaves, summary
from lorafit.core.loss_scale import DynamicLossScale
from lorafit.core.loss import batch_loss, batch_loss_with_router
from lorafit.core.schedule import lr_at


_LOSS = "\0loss"  # the loss sum travels with the gradients (no adapter key looks like it)
MEASURED_STEP = 1  # the second step: optimizer state exists, and so does every buffer
KEPT_LOSSES = 100  # the newest losses a trainer state keeps; older ones only as a summary


class TrainingStopped(LorafitError):
    """Too many non-finite steps in a row."""


@dataclass
class Position:
    """Where the run stands: optimizer steps done, and the next micro-batch."""
    step: int = 0
    epoch: int = 0
    index: int = 0


class Trainer:
    shards_base = True  # --shard cuts the frozen base across processes

    def __init__(self, model, cfg, train_examples, val_examples=(), run_dir=None,
                 sinks=(), control=None, estimate: dict | None = None):
        from lorafit.core.control import Control

        self.model, self.cfg = model, cfg
        self.ops = model.backend
        # flat storage; batches are cut from it step by step (core/examples.py)
        self.train_examples = ExampleSet.from_examples(train_examples)
        self.val_examples = ExampleSet.from_examples(val_examples)
        self.run_dir = Path(run_dir) if run_dir else None
        self.sinks = list(sinks)
        self.control = control or Control(run_dir)
        self.estimate = estimate
        names = adapter_leaves(model.params)
        if not names:
            raise LorafitError("the model has no adapter attached")
        self.trainable = {k: model.params[k] for k in names}
        self.rank, self.world_size = self.ops.rank, self.ops.world_size
        if self.world_size > 1:  # replicas start from rank 0's adapter
            self.trainable = self.ops.broadcast(self.trainable)
        self.micro_per_step = cfg.grad_accum * self.world_size
        self.frozen = {k: v for k, v in model.params.items() if k not in self.trainable}
        self.trainable_line = summary(model.params, model.parameter_shapes())
        self.base_sharded = bool(cfg.shard and self.world_size > 1 and self.shards_base)
        if self.base_sharded:  # each rank keeps 1/N of every layer's frozen weights
            self.frozen = self.ops.shard_frozen(self.frozen)
            model.params = {**self.frozen, **self.trainable}
        self.optimizer = self.ops.make_optimizer(self.trainable, weight_decay=cfg.weight_decay,
                                                 shard=cfg.shard)
        self._router_loss = None  # the last step's MoE load-balancing loss (StepReport)
        loss_fn = self.ops.compile_forward(self._loss) if cfg.compile else self._loss
        grad_fn = self.ops.value_and_grad(loss_fn)
        self.grad_fn = grad_fn if cfg.dropout else self.ops.compile(grad_fn)
        self.batches_per_epoch = len(self._epoch_batches(0))
        self.total_steps = cfg.max_steps or max(1, math.ceil(
            cfg.epochs * self.batches_per_epoch / self.micro_per_step))
        self.pos = Position()
        self.best_val = math.inf
        self.evals_without_gain = 0
        self.losses: list[float] = []  # the newest KEPT_LOSSES (metrics.jsonl has all)
        self.loss_summary = {"count": 0, "sum": 0.0}  # over every applied step
        self.measured_peak = 0
        self._epoch_cache: tuple[int, list] | None = None
        self._last_saved: int | None = None
        self.lock = None  # the run folder's lock (commands/train.py), released by run()
        self.fingerprint: dict | None = None  # stored in every checkpoint
        self.best_step: int | None = None
        self._best_adapter: dict | None = None
        self._window = [0, 0.0]  # tokens and seconds since the last report
        # float16 base weights underflow small gradients: scale the loss (core/loss_scale)
        self.loss_scale = DynamicLossScale() if model.dtype == "float16" else None

    # -- data -----------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[Batch]:
        c = self.cfg
        return make_batches(self.train_examples, c.batch_size, c.seq_len, c.pack, c.seed, epoch)

    def _batches(self, epoch: int) -> list[Batch]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self._epoch_batches(epoch))
        return self._epoch_cache[1]

    def _next_micro_batches(self) -> list[Batch]:
        """The micro-batches of the next step, over all ranks; advances the data position."""
        out = []
        for _ in range(self.micro_per_step):
            batches = self._batches(self.pos.epoch)
            if self.pos.index >= len(batches):
                self.pos.epoch, self.pos.index = self.pos.epoch + 1, 0
                batches = self._batches(self.pos.epoch)
            out.append(batches[self.pos.index])
            self.pos.index += 1
        return out

    def _on_backend(self, batch: Batch) -> Batch:
        return batch.on(self.ops, self.ops.pad_multiple)

    # -- one step -------------------------------------------------------------------------
    def _loss(self, trainable, batch: Batch, denom):
        params = {**self.frozen, **trainable}
        (loss_sum, _), router = batch_loss_with_router(self.ops, self.model, params, batch,
                                                       self.cfg.grad_checkpoint)
        if router is None:
            return loss_sum / denom, loss_sum
        # an MoE's load-balancing loss: this micro-batch's share of the step (by loss
        # tokens), added to the objective only with router_aux_loss_coef
        router = router * (batch.loss_mask.sum() / denom)
        coef = self.cfg.router_aux_loss_coef
        return loss_sum / denom + (coef * router if coef else 0.0), (loss_sum, router)

    def train_step(self, micro: list[Batch], lr: float) -> tuple[float, float, bool]:
        """Forward, backward and update over the step's micro-batches (of all ranks: this
        rank computes its share, core/launch.shard). Returns (mean loss per token over the
        whole step, gradient norm, whether the update was applied)."""
        ops = self.ops
        denom = float(sum(b.n_tokens for b in micro))  # every rank knows the global count
        if denom == 0:
            return math.nan, math.nan, False
        # dropout: the same on resume; rank 0 draws as a lone process would
        ops.seed(self.cfg.seed * 1_000_003 + self.pos.step + 7_919 * self.rank)
        loss_scale = self.loss_scale.scale if self.loss_scale else 1.0
        denom_arr = ops.from_numpy(np.asarray(denom / loss_scale, dtype=np.float32))
        acc, total, self._router_loss = None, None, None
        for b in shard(micro, self.rank, self.world_size):
            (_, loss_sum), grads = self.grad_fn(self.trainable, self._on_backend(b), denom_arr)
            if isinstance(loss_sum, tuple):  # an MoE: (loss_sum, its router loss share)
                loss_sum, router = loss_sum
                self._router_loss = (self._router_loss or 0.0) + self.ops.to_float(router)
            acc = grads if acc is None else {k: acc[k] + grads[k] for k in acc}
            total = loss_sum if total is None else total + loss_sum
            ops.materialize(acc, total)
        if self.world_size > 1:
            summed = ops.all_reduce({**acc, _LOSS: total})
            total = summed.pop(_LOSS)
            acc = summed
        return self._apply(acc, ops.to_float(total) / denom, lr, loss_scale)

    def _apply(self, acc: dict, loss: float, lr: float, loss_scale: float):
        """One optimizer update from the step's summed gradients `acc` (still multiplied by
        the loss scale), clipped to max_grad_norm; a non-finite loss or gradient skips it
        (with float16 loss scaling an overflow halves the scale). (loss, norm, applied)."""
        gnorm = self.ops.to_float(self.ops.global_norm(acc)) / loss_scale
        if self.loss_scale and math.isfinite(loss) and not self.loss_scale.update(
                math.isfinite(gnorm)):
            return loss, gnorm, False  # overflow: skipped, the scale halved
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            return loss, gnorm, False
        scale = 1.0
        if self.cfg.max_grad_norm and gnorm > self.cfg.max_grad_norm:
            scale = self.cfg.max_grad_norm / (gnorm + 1e-6)
        self.optimizer.step(self.trainable, acc, lr, grad_scale=scale / loss_scale)
        return loss, gnorm, True

    # -- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> float:
        c, ops = self.cfg, self.ops
        batches = make_batches(self.val_examples, c.batch_size, c.seq_len, c.pack, c.seed, 0)
        params = {**self.frozen, **self.trainable}
        total, count = 0.0, sum(b.n_tokens for b in batches)
        mine = shard(batches, self.rank, self.world_size)
        # a sharded base gathers each layer from every rank: all run as many forwards
        # (a rank short of a batch runs its first one again and drops the result)
        spare = -(-len(batches) // self.world_size) - len(mine) if self.base_sharded else 0
        with ops.inference():
            for j, b in enumerate(mine + [batches[0]] * spare):
                s, _ = batch_loss(ops, self.model, params, self._on_backend(b), False)
                if j < len(mine):
                    total += ops.to_float(s)
        if self.world_size > 1:
            arr = ops.from_numpy(np.asarray([total], dtype=np.float32))
            total = float(ops.to_numpy(ops.all_reduce({"loss": arr})["loss"])[0])
        return total / max(count, 1)

    # -- state ----------------------------------------------------------------------------
    def adapter_numpy(self) -> dict:
        return {k: self.ops.to_numpy(v) for k, v in self.trainable.items()}

    def trainer_state(self) -> dict:
        return {"step": self.pos.step, "epoch": self.pos.epoch, "index": self.pos.index,
                "best_val": None if math.isinf(self.best_val) else self.best_val,
                "evals_without_gain": self.evals_without_gain,
                "total_steps": self.total_steps, "seed": self.cfg.seed,
                "backend": self.ops.name, "losses": self.losses,
                "loss_summary": self.loss_summary,
                "best_step": self.best_step, "fingerprint": self.fingerprint,
                "world_size": self.world_size,
                "loss_scale": self.loss_scale.state() if self.loss_scale else None}

    def load_state(self, ckpt: dict) -> None:
        """Continue from a checkpoint dict (see core.checkpoint.load_checkpoint)."""
        st = ckpt["state"]
        for k, v in ckpt["adapter"].items():
            if k not in self.trainable:
                raise LorafitError(f"checkpoint adapter key {k} does not match this run")
            self.trainable[k] = self.ops.from_numpy(v, self.ops.dtype_name(self.trainable[k]))
        self.optimizer = self.ops.make_optimizer(self.trainable,
                                               weight_decay=self.cfg.weight_decay,
                                               shard=self.cfg.shard)
        self.optimizer.load_state_numpy(ckpt["optimizer"])
        self.pos = Position(st["step"], st["epoch"], st["index"])
        self.best_val = st["best_val"] if st.get("best_val") is not None else math.inf
        self.evals_without_gain = st.get("evals_without_gain", 0)
        self.losses = list(st.get("losses", []))[-KEPT_LOSSES:]
        summary_ = st.get("loss_summary")
        self.loss_summary = dict(summary_) if isinstance(summary_, dict) else \
            {"count": len(self.losses), "sum": float(sum(self.losses))}
        self.best_step = st.get("best_step")
        if self.loss_scale:
            self.loss_scale.load(st.get("loss_scale"))
        self._last_saved = self.pos.step  # this checkpoint is on disk already

    def save(self) -> Path | None:
        """A checkpoint in the run folder. Every rank calls it at the same boundary (a
        sharded optimizer gathers its state from all of them); rank 0 alone writes."""
        self._last_saved = self.pos.step
        optimizer = self.optimizer.state_to_numpy()
        if not self.run_dir:
            return None
        path = save_checkpoint(self.run_dir, self.pos.step, self.adapter_numpy(),
                               self.model.lora, self.model.path,
                               optimizer, self.trainer_state(),
                               self.cfg.keep_checkpoints)
        self.emit(ev.CheckpointSaved(step=self.pos.step, path=str(path)))
        return path

    def save_adapter(self, adapter: dict | None = None, final: Path | None = None) -> Path:
        """The final adapter in PEFT layout, assembled aside and renamed into place (the old
        one is renamed aside first and deleted last: rundir.commit_folder)."""
        final = final or rundir.adapter_path(self.run_dir)
        with rundir.atomic_folder(final) as tmp:
            save_peft(tmp, self.adapter_numpy() if adapter is None else adapter,
                      self.model.lora, self.model.path,
                      num_layers=self.model.args.num_hidden_layers)
        return final

    def _best_adapter_weights(self) -> dict | None:
        """The adapter of the best validation loss: kept in memory, or read back from
        RUN/best-adapter/ (written at each improvement, so it survives a resume)."""
        if self._best_adapter is not None:
            return self._best_adapter
        if self.run_dir and rundir.best_adapter_path(self.run_dir).is_dir():
            from lorafit.core.adapter_io import load_peft

            try:
                return load_peft(rundir.best_adapter_path(self.run_dir))[1]
            except Exception:
                return None
        return None

    # -- the loop -------------------------------------------------------------------------
    def emit(self, event) -> None:
        for sink in self.sinks:
            sink(event)

    def run(self) -> str:
        """Train to the end (or until stopped); returns the final status. Any other error
        (out of memory, a full disk, a bug) is recorded as status "failed" with a one-line
        reason before it propagates; the run folder's lock is released in every case."""
        try:
            return self._run()
        except TrainingStopped:
            raise
        except BaseException as e:
            text = " ".join(str(e).split())
            reason = f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__
            if isinstance(e, KeyboardInterrupt):
                reason = "interrupted at once (second Ctrl-C); the newest checkpoint is intact"
            try:
                self.emit(ev.RunFinished(status="failed", step=self.pos.step, adapter=None,
                                         final_loss=self.losses[-1] if self.losses else None,
                                         measured_peak=self.measured_peak or None,
                                         estimated_peak=(self.estimate or {}).get("total"),
                                         error=reason))
            except Exception:
                pass  # e.g. the disk is full: the error itself still propagates
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def _data_counts(self) -> tuple[int, int, str]:
        """(training, validation, what they count) for the start-of-run report."""
        return len(self.train_examples), len(self.val_examples), "examples"

    def _run(self) -> str:
        c, ops = self.cfg, self.ops
        examples, val_examples, unit = self._data_counts()
        self.emit(ev.RunStarted(total_steps=self.total_steps, examples=examples,
                                val_examples=val_examples, unit=unit, backend=ops.name,
                                device=ops.device,
                                trainable=self.trainable_line,
                                config=c.to_dict(), estimate=self.estimate,
                                world_size=self.world_size,
                                optimizer_shards=self.optimizer.shards,
                                base_bytes=self._base_bytes(),
                                memory_source=ops.memory_stats().get("source", "")))
        ops.reset_peak_memory()
        status, bad_in_a_row, t_start, steps_timed = "completed", 0, time.time(), 0
        error, start_step = None, self.pos.step
        try:
            while self.pos.step < self.total_steps:
                status = self._between_steps()
                if status:
                    break
                status = "completed"
                lr = lr_at(self.pos.step, c.lr, self.total_steps, c.warmup_steps, c.schedule,
                           c.min_lr_ratio)
                t0 = time.perf_counter()
                micro = self._next_micro_batches()
                if self.pos.step == MEASURED_STEP:
                    (loss, gnorm, applied), peak = ops.measure_peak(
                        lambda: self.train_step(micro, lr))
                    self._record_measured_peak(peak, micro)
                else:
                    loss, gnorm, applied = self.train_step(micro, lr)
                dt = time.perf_counter() - t0
                self.pos.step += 1
                if not applied:
                    ls = self.loss_scale  # a float16 overflow above the floor is routine
                    routine = ls is not None and math.isfinite(loss) and not ls.at_floor
                    bad_in_a_row += 0 if routine else 1
                    self.emit(ev.StepSkipped(step=self.pos.step, in_a_row=bad_in_a_row,
                                             reason=f"float16 gradient overflow; loss scale "
                                                    f"now {ls.scale:g}" if routine else
                                             f"non-finite loss {loss} or gradient "
                                             f"norm {gnorm}"))
                    if bad_in_a_row >= c.max_nonfinite:
                        raise TrainingStopped(
                            f"{bad_in_a_row} non-finite steps in a row at step "
                            f"{self.pos.step}: lower the learning rate, use float32, or "
                            "check the data")
                    continue
                bad_in_a_row = 0
                self._record_loss(loss)
                steps_timed += 1
                self._report(loss, lr, gnorm, micro, dt, t_start, steps_timed)
                if c.eval_every and self.val_examples and self.pos.step % c.eval_every == 0:
                    if self._evaluate_and_check():
                        status = "early_stopped"
                        break
                if c.save_every and self.pos.step % c.save_every == 0:
                    self.save()
        except TrainingStopped as e:
            status, error = "failed", str(e)
        if self.val_examples and c.eval_every and status == "completed" \
                and self.pos.step % c.eval_every:
            self._evaluate_and_check()
        adapter, adapter_step = None, None
        if self.pos.step > 0 and self._last_saved != self.pos.step \
                and self.pos.step != start_step:  # every rank: see save()
            self.save()
        if self.run_dir and self.pos.step > 0:  # stopped before step 1: nothing written
            best = self._best_adapter_weights() if status == "early_stopped" else None
            if best is not None and self.best_step is not None:
                adapter, adapter_step = str(self.save_adapter(best)), self.best_step
                self.emit(ev.Message(level="info", text=(
                    f"early stopping: the adapter in {adapter} is the one of step "
                    f"{self.best_step} (best validation loss {self.best_val:.4f}); the last "
                    f"weights are in the step-{self.pos.step} checkpoint")))
            else:
                adapter, adapter_step = str(self.save_adapter()), self.pos.step
        self.model.params.update(self.trainable)
        self.emit(ev.RunFinished(status=status, step=self.pos.step, adapter=adapter,
                                 adapter_step=adapter_step,
                                 final_loss=self.losses[-1] if self.losses else None,
                                 measured_peak=self.measured_peak or None,
                                 estimated_peak=(self.estimate or {}).get("total"),
                                 error=error))
        if error:
            raise TrainingStopped(error)
        return status

    def _between_steps(self) -> str | None:
        """Apply control requests; returns a status when the run must end now."""
        stop, paused = self._requests()
        if paused:
            self.emit(ev.Paused(step=self.pos.step))
            while paused and not stop:
                time.sleep(0.1)
                stop, paused = self._requests()
            self.emit(ev.Resumed(step=self.pos.step))
        return "stopped" if stop else None

    def _requests(self) -> tuple[bool, bool]:
        """This boundary's requests, the same on every rank: a save is taken here; returns
        whether to stop and whether to stay paused."""
        ctl = self.control
        self._acknowledge(ctl.poll())
        stop, save, paused = self._agree()
        if save:
            ctl.save_requested = False
            self.save()
        return stop, paused

    def _agree(self) -> tuple[bool, bool, bool]:
        """(stop, save, pause) as every rank acts on them at this boundary: stop and save
        when any rank was asked (a signal reaches each rank), pause as rank 0 says (only rank
        0 reads the control file). Decisions come from the exchange alone, never from the
        local flags read after it: a signal that lands during the exchange stays in the
        local flag for the next boundary instead of being overwritten (lost on every rank:
        the run went on) or acted on by this rank alone (it left while the others waited)."""
        ctl = self.control
        mine = (ctl.stop_requested, ctl.save_requested, ctl.paused)
        if self.world_size == 1:
            return mine
        ops = self.ops
        flags = np.asarray([mine[0], mine[1], mine[2] and self.rank == 0], dtype=np.float32)
        agreed = ops.to_numpy(ops.all_reduce({"flags": ops.from_numpy(flags)})["flags"])
        stop, save, paused = (bool(x > 0) for x in agreed)
        if stop:
            ctl.stop_requested = True
        return stop, save, paused

    def _record_loss(self, loss: float) -> None:
        """Keep the newest losses and a running summary: a checkpoint's trainer state stays
        the same size however long the run (every loss is in metrics.jsonl)."""
        self.losses.append(loss)
        if len(self.losses) > KEPT_LOSSES:
            del self.losses[:-KEPT_LOSSES]
        self.loss_summary["count"] += 1
        self.loss_summary["sum"] += float(loss)

    def _acknowledge(self, command) -> None:
        """A control-file request was applied: say so (status.json shows it)."""
        if command:
            self.emit(ev.ControlApplied(command=command, step=self.pos.step,
                                        request=self.control.last_request))

    def _report(self, loss, lr, gnorm, micro, dt, t_start, steps_timed):
        mem = self.ops.memory_stats()
        tokens = int(sum(b.input_ids.size for b in micro))
        self._window[0] += tokens
        self._window[1] += dt
        if self.pos.step % self.cfg.log_every and self.pos.step != self.total_steps:
            return
        window_tokens, window_time = self._window
        self._window = [0, 0.0]
        elapsed = time.time() - t_start
        eta = elapsed / steps_timed * (self.total_steps - self.pos.step)
        batches = self.batches_per_epoch
        self.emit(ev.StepReport(step=self.pos.step, epoch=self.pos.epoch + self.pos.index /
                                max(batches, 1), loss=loss, lr=lr, grad_norm=gnorm,
                                tokens=tokens,
                                tokens_per_s=window_tokens / max(window_time, 1e-9),
                                step_time=dt, eta_s=eta, memory_peak=mem["peak"],
                                memory_current=mem["current"], memory_rss=mem.get("rss", 0),
                                router_aux_loss=self._router_loss, **self._extra_report()))

    def _extra_report(self) -> dict:
        """More StepReport fields of a trainer built on this one (preference rewards)."""
        return {}

    def _base_bytes(self) -> list[int]:
        """Each rank's resident frozen base (--shard: its slices), summed from the arrays
        it holds; a collective with several processes."""
        mine = sum(self.ops.nbytes(v) for v in self.frozen.values())
        if self.world_size == 1:
            return [int(mine)]
        per = np.zeros(self.world_size, dtype=np.float64)
        per[self.rank] = mine
        arr = self.ops.from_numpy(per.astype(np.float32))
        return [int(v) for v in self.ops.to_numpy(self.ops.all_reduce({"b": arr})["b"])]

    def _record_measured_peak(self, peak: int | None, micro: list[Batch]) -> None:
        """The tensor-level peak of one full step, reported beside the estimate for the
        run (full-length batches) and for the very batch that was measured. None: the
        measure failed (said, and the run goes on; every rank still joins the exchange)."""
        self.measured_peak = max(self.measured_peak, int(peak or 0))
        rank_peaks = None
        if self.world_size > 1:  # every rank is here: the same step of the same loop
            mine = np.zeros(self.world_size, dtype=np.float32)
            mine[self.rank] = peak or 0
            rank_peaks = [int(v) for v in self.ops.to_numpy(self.ops.all_reduce(
                {"peaks": self.ops.from_numpy(mine)})["peaks"])]
        if peak is None:
            self.emit(ev.Message(level="warning", text=(
                f"step {self.pos.step + 1}'s memory could not be measured (the memory "
                "profiler could not analyse it); the resident-set high-water mark is still "
                "in every step's record")))
            return
        est = (self.estimate or {}).get("total")
        same_batch = self._estimate_for_batch(micro[0])
        text = f"measured peak of step {self.pos.step + 1}: {peak / 2**20:.1f} MiB"
        if same_batch:
            text += (f"; estimated for this {micro[0].input_ids.shape[0]}x"
                     f"{micro[0].input_ids.shape[1]} batch {same_batch / 2**20:.1f} MiB "
                     f"({100 * (same_batch - peak) / peak:+.1f}%)")
        if est:
            text += f"; for full {self.cfg.batch_size}x{self.cfg.seq_len} batches " \
                    f"{est / 2**20:.1f} MiB"
        if rank_peaks:
            text += "; per rank " + ", ".join(f"{p / 2**20:.1f}" for p in rank_peaks) + " MiB"
        self.emit(ev.Message(level="info", text=text))
        self.emit(ev.MemoryMeasured(step=self.pos.step + 1, measured=int(peak),
                                    estimated=est, estimated_this_batch=same_batch,
                                    rank_peaks=rank_peaks))

    def _estimate_for_batch(self, batch: Batch) -> int | None:
        if not self.estimate or "shape" not in self.estimate:
            return None
        from lorafit.core.estimate import Settings, Shape, estimate

        mult = self.ops.pad_multiple
        b, t = batch.input_ids.shape
        st = dict(self.estimate["settings"], batch_size=b, seq_len=-(-t // mult) * mult)
        return estimate(Shape(**self.estimate["shape"]), Settings(**st))["total"]

    def _evaluate_and_check(self) -> bool:
        """Evaluate; returns True when early stopping says stop."""
        val = self.evaluate()
        if val < self.best_val:
            self.best_val, self.evals_without_gain = val, 0
            self.best_step = self.pos.step
            # a copy: a backend's numpy view may share memory with the parameters
            self._best_adapter = {k: np.array(v, copy=True)
                                  for k, v in self.adapter_numpy().items()}
            if self.run_dir and self.cfg.early_stopping_patience:
                self.save_adapter(self._best_adapter, rundir.best_adapter_path(self.run_dir))
        else:
            self.evals_without_gain += 1
        self.emit(ev.EvalReport(step=self.pos.step, val_loss=val, best_val_loss=self.best_val))
        p = self.cfg.early_stopping_patience
        return bool(p and self.evals_without_gain >= p)
