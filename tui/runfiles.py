"""Following a run directory: the TUI's only view of a trainer.

A trainer writes metrics.jsonl (one record a line) and status.json; the TUI reads them
incrementally and steers through control.json. So the UI can watch a run it started, a
run started headless elsewhere, or a finished one, all the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


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
        kind = rec.get("kind")
        if kind == "train":
            self.steps.append(rec["step"])
            self.losses.append(rec["loss"])
            self.last = rec
        elif kind == "eval":
            self.val_steps.append(rec["step"])
            self.val_losses.append(rec["val_loss"])
            self.log.append(f"step {rec['step']}: validation loss {rec['val_loss']:.4f}")
        elif kind == "start":
            self.start = rec
            self.log.append(f"started: {rec['examples']} examples, {rec['total_steps']} steps "
                            f"on {rec['backend']}/{rec['device']}")
        elif kind == "checkpoint":
            self.log.append(f"step {rec['step']}: saved {rec['path']}")
        elif kind == "skipped":
            self.log.append(f"step {rec['step']}: skipped ({rec['reason']})")
        elif kind == "message":
            self.log.append(rec["text"] if rec.get("level") == "info"
                            else f"{rec['level']}: {rec['text']}")
        elif kind == "memory":
            self.memory = rec
        elif kind == "end":
            self.end = rec
            text = f"run {rec['status']} at step {rec['step']}"
            if rec.get("error"):
                text += f": {rec['error']}"
            self.log.append(text)

    @property
    def total_steps(self) -> int:
        return int(self.status.get("total_steps") or self.start.get("total_steps") or 0)


class RunFollower:
    """Reads new lines of metrics.jsonl since the last call (a torn last line waits)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.offset = 0
        self.state = RunState()

    def poll(self) -> bool:
        """Fold in new records and the status file; True when something changed."""
        changed = False
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = 0
        if size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            end = chunk.rfind(b"\n") + 1
            for line in chunk[:end].splitlines():
                try:
                    self.state.add(json.loads(line))
                except (json.JSONDecodeError, KeyError):
                    continue
            self.offset += end
            changed = end > 0
        status = read_status(self.run_dir)
        if status != self.state.status:
            self.state.status = status
            changed = True
        return changed


def read_status(run_dir: str | Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def find_runs(root: str | Path) -> list[Path]:
    """Run directories under root (those holding metrics.jsonl or status.json)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for p in root.glob("**/metrics.jsonl")}
    found |= {p.parent for p in root.glob("**/status.json")}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    from lorafit.core.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir, report=lambda _: None)
