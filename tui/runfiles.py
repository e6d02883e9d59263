"""Following a run directory: the TUI's only view of a trainer.

A trainer appends event records to the run folder's metrics file and keeps its status file
current (core/rundir.py); the TUI reads them incrementally, turns records back into typed
events (core/events.py) and steers through the control file. So the UI can watch a run it
started, a run started headless elsewhere, or a finished one, all the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.rundir import find_runs, read_status  # noqa: F401  (the TUI's imports)


@dataclass
class RunState:
    """Everything the run screen shows, folded from the records read so far."""
    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
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
            self.steps.append(e.step)
            self.losses.append(e.loss)
            self.last = rec
        elif isinstance(e, ev.EvalReport):
            self.val_steps.append(e.step)
            self.val_losses.append(e.val_loss)
            self.log.append(f"step {e.step}: validation loss {e.val_loss:.4f}")
        elif isinstance(e, ev.RunStarted):
            self.start = rec
            self.log.append(f"started: {e.examples} examples, {e.total_steps} steps "
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
