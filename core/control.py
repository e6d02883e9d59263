"""How a running trainer is steered: pause / resume / save / stop.

Requests arrive from signals (Ctrl-C, SIGTERM), from a UI in the same process (methods), or
from any other process through the control file of the run folder (core/rundir.py), which
the trainer polls between steps. So a TUI can steer a run it did not start.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

from lorafit.core import rundir

COMMANDS = ("pause", "resume", "save", "stop")


def _seq(msg: dict) -> int:
    """The request's sequence number; anything malformed counts as 0."""
    v = msg.get("seq", 0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or \
            (isinstance(v, float) and not math.isfinite(v)):
        return 0
    return int(v)


def _identity(msg: dict):
    """What tells one request from another: its id (written by send_command), else its
    (seq, time). A request is new whenever this differs from the last one applied, so a
    deleted control file (seq restarting at 1) still steers the run."""
    rid = msg.get("id")
    if isinstance(rid, str) and rid:
        return ("id", rid)
    t = msg.get("time")
    return ("seq", _seq(msg), t if isinstance(t, (int, float)) else None)


def send_command(run_dir: str | Path, command: str) -> None:
    """Ask the trainer of run_dir to pause, resume, save or stop."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    seq = _seq(rundir.read_control(run_dir))
    rundir.write_control(run_dir, {"command": command, "seq": seq + 1, "time": time.time(),
                                   "id": f"{os.getpid()}-{time.time_ns()}-{os.urandom(4).hex()}"})


class Control:
    def __init__(self, run_dir: str | Path | None = None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.stop_requested = False
        self.save_requested = False
        self.paused = False
        self._seen = _identity(self._read()) if self.run_dir else None
        self._mtime = self._stat()
        self._interrupts = 0
        self.last_request: dict | None = None

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
        """The control file's request; {} when missing, unreadable or not an object."""
        try:
            msg = rundir.read_control(self.run_dir)
        except Exception:  # never let a malformed file stop the run
            return {}
        return msg if isinstance(msg, dict) else {}

    def poll(self) -> str | None:
        """Apply a new request from the control file, if any; returns its command. A
        malformed file is ignored, never fatal."""
        if self.run_dir is None:
            return None
        mtime = self._stat()
        if mtime == self._mtime:
            return None
        self._mtime = mtime
        msg = self._read()
        if not msg:
            return None
        ident = _identity(msg)
        if ident == self._seen:
            return None
        self._seen = ident
        cmd = msg.get("command")
        if isinstance(cmd, str) and cmd in COMMANDS:
            getattr(self, cmd)()
            self.last_request = {"command": cmd, "seq": _seq(msg),
                                 "id": msg.get("id") if isinstance(msg.get("id"), str)
                                 else None}
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
