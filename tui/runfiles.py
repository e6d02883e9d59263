"""Following a run directory: the TUI's only view of a trainer.

A trainer appends event records to the run folder's metrics file and keeps its status file
current (core/rundir.py); the TUI reads them incrementally, turns records back into typed
events (core/events.py) and steers through the control file. So the UI can watch a run it
started, a run started headless elsewhere, or a finished one, all the same way.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.rundir import find_runs


MAX_POINTS = 1024  # a plotted series never holds more (a plot is a few hundred cells wide)
SMOOTHING = 0.1  # the weight of the newest loss in the smoothed line


class Series:
    """(x, y) points kept for plotting, at most `cap` of them. Each kept point is the mean of
    `bucket` consecutive raw points; when the list is full, neighbouring pairs merge and the
    bucket doubles. So a series of any length costs the same to hold and to draw, every
    point stands for the same number of steps, and the newest (partial) bucket is shown
    as it fills."""

    def __init__(self, cap: int = MAX_POINTS):
        self.cap = cap
        self.bucket = 1  # raw points per kept point
        self.count = 0  # raw points added
        self._xs: list = []
        self._ys: list = []
        self._open = [0.0, 0.0, 0, 0]  # x sum, finite y sum, points, finite points

    def add(self, x, y) -> None:
        self.count += 1
        o = self._open
        o[0] += x
        o[2] += 1
        if y is not None and math.isfinite(y):
            o[1] += y
            o[3] += 1
        if o[2] == self.bucket:
            self._xs.append(o[0] / o[2])
            self._ys.append(o[1] / o[3] if o[3] else math.nan)
            self._open = [0.0, 0.0, 0, 0]
            if len(self._xs) >= self.cap:
                self._halve()

    def _halve(self) -> None:
        xs, ys = self._xs, self._ys
        self._xs = [(xs[i] + xs[i + 1]) / 2 for i in range(0, len(xs) - 1, 2)]
        self._ys = [_mean2(ys[i], ys[i + 1]) for i in range(0, len(ys) - 1, 2)]
        self.bucket *= 2

    @property
    def xs(self) -> list:
        o = self._open
        return self._xs + [o[0] / o[2]] if o[2] else list(self._xs)

    @property
    def ys(self) -> list:
        o = self._open
        return self._ys + [o[1] / o[3] if o[3] else math.nan] if o[2] else list(self._ys)

    def weights(self) -> list[int]:
        """How many raw points each of xs stands for."""
        return [self.bucket] * len(self._xs) + ([self._open[2]] if self._open[2] else [])


def _mean2(a: float, b: float) -> float:
    finite = [v for v in (a, b) if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class RunState:
    """Everything the run screen shows, folded from the records read so far: summaries and
    downsampled series (Series), so each record costs O(1) however long the run."""
    train: Series = field(default_factory=Series)  # raw training loss
    smoothed: Series = field(default_factory=Series)  # its debiased moving average
    val: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    tokens_per_s: Series = field(default_factory=Series)
    grad_norm: Series = field(default_factory=Series)
    margin: Series = field(default_factory=Series)  # preference tuning: reward margin
    accuracy: Series = field(default_factory=Series)  # and the share of pairs ranked right
    _ema: float = 0.0
    last: dict = field(default_factory=dict)  # the newest train record
    start: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    log: list = field(default_factory=list)
    status: dict = field(default_factory=dict)

    def add(self, rec: dict) -> None:
        """Fold in one metrics record; records of unknown kinds are ignored."""
        e = ev.from_record(rec)
        if isinstance(e, ev.StepReport):
            self.train.add(e.step, e.loss)
            if e.loss is not None and math.isfinite(e.loss):
                self._ema = SMOOTHING * e.loss + (1 - SMOOTHING) * self._ema
                n = self.smoothed.count + 1  # debiased like TensorBoard's smoothing
                self.smoothed.add(e.step, self._ema / (1 - (1 - SMOOTHING) ** n))
            self.lr.add(e.step, e.lr)
            self.tokens_per_s.add(e.step, e.tokens_per_s)
            self.grad_norm.add(e.step, e.grad_norm)
            if e.reward_margin is not None:  # absent for supervised runs
                self.margin.add(e.step, e.reward_margin)
            if e.reward_accuracy is not None:
                self.accuracy.add(e.step, e.reward_accuracy)
            self.last = rec
        elif isinstance(e, ev.EvalReport):
            self.val.add(e.step, e.val_loss)
            self.log.append(f"step {e.step}: validation loss {e.val_loss:.4f}")
        elif isinstance(e, ev.RunStarted):
            self.start = rec
            self.log.append(f"started: {e.examples} {e.unit}, {e.total_steps} steps "
                            f"on {e.backend}/{e.device}")
        elif isinstance(e, ev.CheckpointSaved):
            self.log.append(f"step {e.step}: saved {e.path}")
        elif isinstance(e, ev.StepSkipped):
            self.log.append(f"step {e.step}: skipped ({e.reason})")
        elif isinstance(e, ev.Paused):
            self.log.append(f"step {e.step}: paused")
        elif isinstance(e, ev.Resumed):
            self.log.append(f"step {e.step}: resumed")
        elif isinstance(e, ev.Message):
            self.log.append(e.text if e.level == "info" else f"{e.level}: {e.text}")
        elif isinstance(e, ev.MemoryMeasured):
            self.memory = rec
        elif isinstance(e, ev.RunFinished):
            self.end = rec
            text = f"run {e.status} at step {e.step}"
            if e.error:
                text += f": {e.error}"
            self.log.append(text)

    # the plotted points (downsampled past MAX_POINTS)
    steps = property(lambda self: self.train.xs)
    losses = property(lambda self: self.train.ys)
    val_steps = property(lambda self: self.val.xs)
    val_losses = property(lambda self: self.val.ys)

    @property
    def world_size(self) -> int:
        """Processes training together (the start record's, else status.json's)."""
        return int(self.start.get("world_size") or self.status.get("world_size") or 1)

    @property
    def total_steps(self) -> int:
        return int(self.status.get("total_steps") or self.start.get("total_steps") or 0)

    @property
    def state(self) -> str | None:
        return self.status.get("state")

    @property
    def active(self) -> bool:
        """The trainer may still write: starting, running or paused."""
        return self.status.get("state") in rundir.ACTIVE_STATES


class RunFollower:
    """Reads new records of a run since the last call (a torn last line waits)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.tail = rundir.MetricsTail(self.run_dir)
        self.state = RunState()

    def poll(self) -> bool:
        """Fold in new records and the status file; True when something changed."""
        records = self.tail.read_new()
        for rec in records:
            self.state.add(rec)
        changed = bool(records)
        status = rundir.read_status(self.run_dir)
        state = rundir.effective_state(self.run_dir, status)
        if state != status.get("state"):  # the trainer died without a final status
            status = dict(status, state=state, error=status.get("error") or
                          "the trainer process ended without a final status")
        if status != self.state.status:
            self.state.status = status
            changed = True
        return changed


def last_train_record(run_dir: str | Path, max_bytes: int = 1 << 16) -> dict | None:
    """The newest training record, read from the last `max_bytes` of metrics.jsonl only."""
    path = rundir.metrics_path(run_dir)
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.seek(max(0, f.tell() - max_bytes))
            chunk = f.read()
    except OSError:
        return None
    lines = chunk.split(b"\n")
    if size:
        lines = lines[1:]  # the first line is cut
    for line in reversed(lines):
        if b'"train"' in line:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "train":
                return rec
    return None


def run_summary(run_dir: str | Path) -> dict:
    """What the runs list shows of a run: status.json (state, total) and the newest training
    record from the tail of metrics.jsonl (step, loss): a bounded read however long the
    run, never the whole file."""
    status = rundir.read_status(run_dir)
    out = {"state": run_state(run_dir, status), "step": status.get("step") or 0,
           "total_steps": status.get("total_steps") or 0, "loss": None}
    rec = last_train_record(run_dir)
    if rec:
        out.update(loss=rec.get("loss"), step=max(out["step"], rec.get("step") or 0))
    return out


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    from lorafit.core.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir, report=lambda _: None)


def list_runs(root: str | Path) -> list[Path]:
    """The run folders under root, newest first: those with metrics or status (find_runs)
    and those a trainer left only its config and log in (a run that failed before its
    first event)."""
    root = Path(root)
    found = set(find_runs(root))
    if root.is_dir():
        for d in [root, *root.glob("*"), *root.glob("*/*")]:
            if d.is_dir() and (rundir.config_path(d).is_file()
                               or rundir.train_log_path(d).is_file()):
                found.add(d)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def run_state(run_dir: str | Path, status: dict | None = None) -> str:
    """The state to show: status.json's, except 'died' for an active status whose trainer
    pid is gone (killed, e.g. out of memory) and 'failed' for a folder with a log but no
    status (the trainer failed before its first event)."""
    status = rundir.read_status(run_dir) if status is None else status
    if not status.get("state"):
        return "failed" if rundir.train_log_path(run_dir).is_file() else "?"
    return rundir.effective_state(run_dir, status)


def log_tail(run_dir: str | Path, n: int = 5) -> list[str]:
    """The last n non-empty lines of the run's train.log."""
    log = rundir.train_log_path(run_dir)
    if not log.is_file():
        return []
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
    return lines[-n:]
