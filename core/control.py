"""How a running trainer is steered: pause / resume / save / stop.

Requests arrive from signals (Ctrl-C, SIGTERM), from a UI in the same process (methods), or
from any other process through the control file of the run folder (core/rundir.py), which
the trainer polls between steps. So a TUI can steer a run it did not start.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from lorafit.core import rundir

COMMANDS = ("pause", "resume", "save", "stop")


def send_command(run_dir: str | Path, command: str) -> None:
    """Ask the trainer of run_dir to pause, resume, save or stop."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    try:
        seq = int(rundir.read_control(run_dir).get("seq", 0))
    except (TypeError, ValueError):
        seq = 0
    rundir.write_control(run_dir, {"command": command, "seq": seq + 1, "time": time.time()})


class Control:
    def __init__(self, run_dir: str | Path | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.stop_requested = False
        self.save_requested = False
        self.paused = False
        self._seen_seq = self._read_seq()
        self._mtime = self._stat()
        self._interrupts = 0

    # -- in-process requests --------------------------------------------------------------
    def stop(self):
        self.stop_requested = True

    def save(self):
        self.save_requested = True

    def pause(self):
        self.paused = True

    def resume(self):
        self.paused = False

    # -- file requests --------------------------------------------------------------------
    def _stat(self):
        return rundir.control_mtime(self.run_dir) if self.run_dir else None

    def _read(self) -> dict:
        return rundir.read_control(self.run_dir)

    def _read_seq(self) -> int:
        try:
            return int(self._read().get("seq", 0)) if self.run_dir else 0
        except (TypeError, ValueError):
            return 0

    def poll(self) -> str | None:
        """Apply a new command from the control file, if any; returns it."""
        if self.run_dir is None:
            return None
        mtime = self._stat()
        if mtime == self._mtime:
            return None
        self._mtime = mtime
        msg = self._read()
        try:
            seq = int(msg.get("seq", 0))
        except (TypeError, ValueError):
            return None
        if seq <= self._seen_seq:
            return None
        self._seen_seq = seq
        cmd = msg.get("command")
        if cmd in COMMANDS:
            getattr(self, cmd)()
            return cmd
        return None

    # -- signals --------------------------------------------------------------------------
    def install_signal_handlers(self, report=print):
        """First Ctrl-C / SIGTERM: finish the step, save, exit. Second Ctrl-C: exit now."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self._interrupts += 1
            if self._interrupts > 1 and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.paused = False
            report("stopping after this step and saving (Ctrl-C again to quit at once)")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
