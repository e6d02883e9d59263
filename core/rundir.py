"""The run folder: the contract between a trainer and anything that watches it.

Every file name of a run folder lives here, with its readers and writers, so a trainer, the
CLI and the TUI cannot disagree about them:

    RUN/config.toml            the resolved config; `lorafit train RUN/config.toml` repeats it
    RUN/metrics.jsonl          one event record a line (core/events.py), flushed per record
    RUN/status.json            state, pid, step, total steps, last checkpoint, error (atomic)
    RUN/control.json           {"command", "seq", "time"}, polled by the trainer (atomic)
    RUN/train.log              stdout and stderr of a trainer the TUI started
    RUN/checkpoints/step-N/    adapter (PEFT layout), optimizer.safetensors,
                               trainer_state.json and, written last, COMPLETE
    RUN/adapter/               the final adapter (PEFT layout)
    RUN/best-adapter/          the adapter of the best validation loss so far (PEFT layout)
    RUN/lock                   held (flock) by the one trainer writing to the folder; its pid
    RUN/error.log              the traceback of a run that failed on an unexpected error

It also holds the one atomic folder write (`atomic_folder`, or `staging_folder` then
`commit_folder`): a folder is assembled under a temporary name beside its target, every file
and folder in it is fsynced, and it is renamed into place. A reader never sees half a folder.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from lorafit.core.fileio import atomic_save_safetensors, atomic_write_json, \
    atomic_write_text, fsync_dir, load_safetensors_numpy

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
STATUS = "status.json"
CONTROL = "control.json"
TRAIN_LOG = "train.log"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
BEST_ADAPTER = "best-adapter"
LOCK = "lock"
ERROR_LOG = "error.log"
# inside checkpoints/step-N/
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"

_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP, _OLD = ".tmp", ".old"  # suffixes of a folder being assembled / being replaced

# status.json "state": a run in one of these may still write to its folder
ACTIVE_STATES = ("starting", "running", "paused")


# -- paths --------------------------------------------------------------------------------
def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS


def status_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STATUS


def control_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONTROL


def train_log_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TRAIN_LOG


def checkpoints_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoints_path(run_dir) / f"step-{step}"


def adapter_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ADAPTER


def best_adapter_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / BEST_ADAPTER


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK


def error_log_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ERROR_LOG


# -- the run folder lock ------------------------------------------------------------------
class RunLock:
    """An exclusive flock on RUN/lock, held while a trainer may write to the folder. The
    kernel drops it when the process dies, however it dies, so a stale lock cannot block."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        from lorafit.core.errors import LorafitError

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(self.run_dir), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = lock_holder(self.run_dir)
            holder = f"pid {pid}" if pid else "another process"
            raise LorafitError(f"{self.run_dir} is in use by another trainer ({holder}); "
                               "wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def is_locked(run_dir: str | Path) -> bool:
    """True while some process holds the run folder's lock (a trainer is writing)."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def lock_holder(run_dir: str | Path) -> int | None:
    """The pid written in the lock file by its holder, if any."""
    try:
        return int(lock_path(run_dir).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid) -> bool:
    """Whether the process with this id runs (a zombie, exited but not reaped, does not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): the kill test stands
        return True


def effective_state(run_dir: str | Path, status: dict | None = None) -> str | None:
    """status.json's state, except that an active state whose trainer is gone (its pid
    dead and the folder unlocked) reads as "died": a failure without a final status
    (killed, e.g. out of memory)."""
    status = read_status(run_dir) if status is None else status
    state = status.get("state")
    if state in ACTIVE_STATES and not pid_alive(status.get("pid")) \
            and not is_locked(run_dir):
        return "died"
    return state


# -- what a folder holds ------------------------------------------------------------------
def is_run_dir(path: str | Path) -> bool:
    """True for a folder a trainer has written to (it has metrics or a status)."""
    return metrics_path(path).exists() or status_path(path).exists()


def holds_checkpoints(run_dir: str | Path) -> bool:
    root = checkpoints_path(run_dir)
    return root.is_dir() and any(root.iterdir())


def find_runs(root: str | Path) -> list[Path]:
    """Run folders under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for p in root.glob(f"**/{METRICS}")}
    found |= {p.parent for p in root.glob(f"**/{STATUS}")}
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoints/step-N folder, complete or not, oldest first."""
    root, out = checkpoints_path(run_dir), []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def remove_stale(folder: str | Path) -> None:
    """Drop the leftovers of interrupted folder writes in `folder` (temp and aside copies
    whose target is in place)."""
    folder = Path(folder)
    for p in folder.glob(f".*{_TMP}"):
        shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(f".*{_OLD}"):
        if (folder / p.name[1:-len(_OLD)]).exists():
            shutil.rmtree(p, ignore_errors=True)


# -- config.toml, status.json, control.json ----------------------------------------------
def write_config(run_dir: str | Path, toml_text: str) -> Path:
    path = config_path(run_dir)
    atomic_write_text(path, toml_text)
    return path


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def new_status(pid: int | None = None) -> dict:
    return {"state": "starting", "pid": os.getpid() if pid is None else pid, "step": 0,
            "total_steps": None, "last_checkpoint": None, "error": None}


def write_status(run_dir: str | Path, status: dict) -> None:
    atomic_write_json(status_path(run_dir), status)


def read_status(run_dir: str | Path) -> dict:
    """status.json, or {} when there is none (yet) or it cannot be read."""
    return _read_json(status_path(run_dir))


def write_control(run_dir: str | Path, message: dict) -> None:
    atomic_write_json(control_path(run_dir), message)


def read_control(run_dir: str | Path) -> dict:
    return _read_json(control_path(run_dir))


def control_mtime(run_dir: str | Path) -> int | None:
    try:
        return os.stat(control_path(run_dir)).st_mtime_ns
    except OSError:
        return None


# -- metrics.jsonl ------------------------------------------------------------------------
def open_metrics(run_dir: str | Path):
    """metrics.jsonl opened for appending (a resumed run continues the same file). A torn
    last line, left by a killed writer, is ended first so the next record stands alone."""
    path = metrics_path(run_dir)
    f = open(path, "a", encoding="utf-8")
    try:
        size = os.path.getsize(path)
        if size:
            with open(path, "rb") as r:
                r.seek(size - 1)
                if r.read(1) != b"\n":
                    f.write("\n")
                    f.flush()
    except OSError:
        pass
    return f


def _finite(value):
    """NaN and infinities become null (standard JSON), in nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def append_record(f, record: dict) -> None:
    """One record a line (standard JSON: non-finite numbers are null), flushed at once so
    watchers see it."""
    f.write(json.dumps(_finite(record), allow_nan=False) + "\n")
    f.flush()


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of a run folder's metrics.jsonl (or of that file itself); a
    torn last line is ignored."""
    path = Path(path)
    if path.is_dir():
        path = metrics_path(path)
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


class MetricsTail:
    """Reads the records appended to a run's metrics.jsonl since the last call; a torn last
    line waits for its end."""

    def __init__(self, run_dir: str | Path):
        self.path = metrics_path(run_dir)
        self.offset = 0

    def read_new(self) -> list[dict]:
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


# -- checkpoint contents ------------------------------------------------------------------
def write_checkpoint_state(folder: str | Path, optimizer_state: dict,
                           trainer_state: dict) -> None:
    folder = Path(folder)
    atomic_save_safetensors(folder / OPTIMIZER, optimizer_state)
    atomic_write_json(folder / TRAINER_STATE, trainer_state)


def mark_complete(folder: str | Path, step: int) -> None:
    """The marker, written last: a checkpoint without it is incomplete."""
    atomic_write_text(Path(folder) / COMPLETE, f"step {step}\n")


def has_marker(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE).exists()


def is_complete(folder: str | Path) -> bool:
    return has_marker(folder) and (Path(folder) / TRAINER_STATE).exists()


def trainer_state_path(folder: str | Path) -> Path:
    return Path(folder) / TRAINER_STATE


def read_trainer_state(folder: str | Path) -> dict:
    """trainer_state.json; raises OSError or ValueError when it cannot be read."""
    return json.loads(trainer_state_path(folder).read_text())


def read_optimizer(folder: str | Path) -> dict:
    return load_safetensors_numpy(Path(folder) / OPTIMIZER)


# -- the atomic folder write --------------------------------------------------------------
def _aside(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}{suffix}"


def staging_folder(target: str | Path) -> Path:
    """An empty folder beside `target` to assemble it in (`.NAME.tmp`). A copy left aside
    by an interrupted replacement is put back first when the target is missing."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = _aside(target, _OLD)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, target)
    tmp = _aside(target, _TMP)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def commit_folder(tmp: str | Path, target: str | Path) -> Path:
    """Put an assembled folder in place of `target`. Files and folders are fsynced first.
    An existing target is renamed aside, the new folder renamed in, and only then is the
    old one deleted, so at every moment a whole folder exists under one of the names."""
    tmp, target = Path(tmp), Path(target)
    _fsync_tree(tmp)
    old = None
    if target.exists():
        old = _aside(target, _OLD)
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old)
        fsync_dir(target.parent)
    return target


@contextmanager
def atomic_folder(target: str | Path):
    """with atomic_folder(path) as tmp: write into tmp; on a clean exit it becomes path.
    On an exception the temp folder is removed and the target left as it was."""
    target = Path(target)
    tmp = staging_folder(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_folder(tmp, target)

