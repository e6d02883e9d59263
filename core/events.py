"""Typed reports from the trainer, and the sinks that receive them.

The trainer emits events; it never knows who listens. A console progress line, the run
folder's metrics file and the TUI are all sinks with the same one-method interface, so a
headless run and a watched run leave the same records.

Each event type has its own `kind`, the key of its record in the metrics file; readers turn
records back into events with `from_record` (kinds live only here), so nothing matches
message texts.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lorafit.core import rundir


@dataclass
class Event:
    kind: str = field(init=False, default="event")
    time: float = field(init=False, default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunStarted(Event):
    total_steps: int
    examples: int
    val_examples: int
    backend: str
    device: str
    trainable: str
    config: dict
    estimate: dict | None = None
    world_size: int = 1  # processes training together (data parallel)
    optimizer_shards: int = 1  # processes AdamW's state is spread over (--shard: world_size)
    base_bytes: list | None = None  # each rank's resident frozen base (--shard: 1/N of it)
    unit: str = "examples"  # what `examples` counts: "pairs" for DPO/ORPO, each two rows
    # what StepReport.memory_peak counts (the backend's memory_stats()["source"]): the
    # allocator's high-water mark, or on a CPU the whole process's resident memory
    memory_source: str = ""
    kind: str = field(init=False, default="start")


@dataclass
class StepReport(Event):
    step: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    step_time: float
    eta_s: float
    memory_peak: int
    memory_current: int
    memory_rss: int = 0
    # an MoE's router load-balancing loss over this rank's share of the step (None without
    # experts); in the loss only with TrainConfig.router_aux_loss_coef
    router_aux_loss: float | None = None
    # preference tuning (--method dpo|orpo|kto): mean implicit rewards of the chosen and
    # rejected completions, their mean margin and the share of pairs ranked right
    reward_chosen: float | None = None
    reward_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    # GRPO (--method grpo): the sampled completions' mean reward, the mean of the groups'
    # reward standard deviations, the token-mean KL to the base (beta > 0) and the mean
    # completion length in tokens
    reward_mean: float | None = None
    reward_std: float | None = None
    kl: float | None = None
    completion_length: float | None = None
    kind: str = field(init=False, default="train")


@dataclass
class EvalReport(Event):
    step: int
    val_loss: float
    best_val_loss: float
    kind: str = field(init=False, default="eval")


@dataclass
class MemoryMeasured(Event):
    """The tensor-level peak of a full training step, and what the estimator predicted."""
    step: int
    measured: int
    estimated: int | None  # for full batch_size x seq_len batches
    estimated_this_batch: int | None = None  # for the shape of the measured batch
    rank_peaks: list | None = None  # several processes: each rank's measured peak
    kind: str = field(init=False, default="memory")


@dataclass
class CheckpointSaved(Event):
    step: int
    path: str
    kind: str = field(init=False, default="checkpoint")


@dataclass
class StepSkipped(Event):
    step: int
    reason: str
    in_a_row: int
    kind: str = field(init=False, default="skipped")


@dataclass
class Paused(Event):
    """The trainer stopped between steps on a pause request."""
    step: int
    kind: str = field(init=False, default="paused")


@dataclass
class Resumed(Event):
    step: int
    kind: str = field(init=False, default="resumed")


@dataclass
class ControlApplied(Event):
    """A request from the control file was applied (status.json acknowledges it)."""
    command: str
    step: int
    request: dict | None = None  # the request as read: command, seq, id
    kind: str = field(init=False, default="control")


@dataclass
class Message(Event):
    """Free text for people (console, event log); never parsed."""
    level: str
    text: str
    kind: str = field(init=False, default="message")


@dataclass
class RunFinished(Event):
    status: str  # "completed", "stopped", "early_stopped", "failed"
    step: int
    adapter: str | None
    final_loss: float | None
    measured_peak: int | None
    estimated_peak: int | None
    error: str | None = None
    adapter_step: int | None = None  # the step the adapter's weights are from
    kind: str = field(init=False, default="end")


EVENT_TYPES: dict[str, type[Event]] = {cls.kind: cls for cls in (
    RunStarted, StepReport, EvalReport, MemoryMeasured, CheckpointSaved, StepSkipped, Paused,
    Resumed, ControlApplied, Message, RunFinished)}


def from_record(record: dict) -> Event | None:
    """The event a metrics record holds; None for an unknown kind or a malformed record
    (fields added later are ignored, so old readers follow newer trainers)."""
    cls = EVENT_TYPES.get(record.get("kind")) if isinstance(record, dict) else None
    if cls is None:
        return None
    names = {f.name for f in fields(cls) if f.init}
    try:
        event = cls(**{k: v for k, v in record.items() if k in names})
    except TypeError:
        return None
    if isinstance(record.get("time"), (int, float)):
        event.time = record["time"]
    return event


class Sink:
    def __call__(self, event: Event) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """The run folder's metrics file: one JSON object per line, flushed per record, so
    watchers see it at once."""

    def __init__(self, run_dir: str | Path):
        self.f = rundir.open_metrics(run_dir)

    def __call__(self, event):
        rundir.append_record(self.f, event.to_dict())

    def close(self):
        self.f.close()


class StatusSink(Sink):
    """The run folder's status file: state, pid, step, last checkpoint. Written atomically."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.status = rundir.new_status()
        self._write()

    def _write(self):
        self.status["updated"] = time.time()
        rundir.write_status(self.run_dir, self.status)

    def __call__(self, event):
        if isinstance(event, RunStarted):
            self.status.update(state="running", total_steps=event.total_steps,
                               world_size=event.world_size)
        elif isinstance(event, StepReport):
            self.status["step"] = event.step
            if time.time() - self.status.get("updated", 0) < 1.0:
                return
        elif isinstance(event, CheckpointSaved):
            self.status["last_checkpoint"] = event.path
        elif isinstance(event, Paused):
            self.status["state"] = "paused"
        elif isinstance(event, Resumed):
            self.status["state"] = "running"
        elif isinstance(event, ControlApplied):
            self.status["acknowledged"] = dict(event.request or {}, command=event.command,
                                               step=event.step)
        elif isinstance(event, RunFinished):
            self.status.update(state=event.status, step=event.step, error=event.error)
        else:
            return
        self._write()


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60:02d}:{s % 60:02d}"


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.2f}GiB" if n >= 2**30 else f"{n / 2**20:.0f}MiB"


class ConsoleSink(Sink):
    """A progress bar with loss, tokens/s, memory and ETA on stderr; other events as lines."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.total = 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._open_line = False

    def _line(self, text):
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, e):
        if isinstance(e, RunStarted):
            self.total = e.total_steps
            self._line(f"{e.trainable}")
            self._line(f"training on {e.backend}/{e.device}: {e.examples} {e.unit}, "
                       f"{e.val_examples} validation, {e.total_steps} steps")
        elif isinstance(e, StepReport):
            frac = e.step / max(self.total, 1)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            text = (f"[{bar}] {e.step}/{self.total} loss {e.loss:.4f} lr {e.lr:.2e} "
                    f"{e.tokens_per_s:,.0f} tok/s mem {_fmt_bytes(e.memory_peak)} "
                    f"eta {_fmt_time(e.eta_s)}")
            if e.reward_margin is not None:  # preference tuning (core/preference_train.py)
                text += f" margin {e.reward_margin:+.3f}"
            if e.reward_accuracy is not None:
                text += f" acc {e.reward_accuracy:.2f}"
            if e.reward_mean is not None:  # GRPO (core/grpo_train.py)
                text += f" reward {e.reward_mean:.3f}±{e.reward_std:.3f}" \
                        f" len {e.completion_length:.1f}"
            if e.kl is not None:
                text += f" kl {e.kl:.4f}"
            if self.tty:
                self.stream.write("\r" + text)
                self._open_line = True
                self.stream.flush()
            else:
                self._line(text)
        elif isinstance(e, EvalReport):
            self._line(f"step {e.step}: val loss {e.val_loss:.4f} (best {e.best_val_loss:.4f})")
        elif isinstance(e, CheckpointSaved):
            self._line(f"step {e.step}: checkpoint saved to {e.path}")
        elif isinstance(e, StepSkipped):
            self._line(f"step {e.step}: update skipped ({e.reason})")
        elif isinstance(e, Paused):
            self._line(f"step {e.step}: paused")
        elif isinstance(e, Resumed):
            self._line(f"step {e.step}: resumed")
        elif isinstance(e, Message):
            self._line(f"{e.level}: {e.text}" if e.level != "info" else e.text)
        elif isinstance(e, RunFinished):
            text = f"run {e.status} at step {e.step}"
            if e.final_loss is not None:
                text += f", final loss {e.final_loss:.4f}"
            if e.adapter:
                text += f"; adapter in {e.adapter}"
            self._line(text)
            if e.measured_peak and e.estimated_peak:
                self._line(f"memory: measured peak {_fmt_bytes(e.measured_peak)}; estimate "
                           f"for full-length batches {_fmt_bytes(e.estimated_peak)}")
            if e.error:
                self._line(f"error: {e.error}")


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of a run's metrics file (give the run folder or the file)."""
    return rundir.read_metrics(path)
