"""Several training processes: where this one stands among them, and `--nproc N`.

A worker learns its rank and the world size from the environment its launcher set
(torchrun: RANK / WORLD_SIZE / LOCAL_RANK; mlx.launch: MLX_RANK and a hostfile, or MPI's
variables); the backend then joins the framework's process group (backends/). Reading the
environment here, without a framework, lets the run folder's one-writer rule (rank 0 writes)
apply before any framework loads.

`lorafit train --nproc N` is a small parent: it starts the backend's own launcher on this
machine (the command comes from the backend), turns Ctrl-C / SIGTERM into SIGTERM for every
worker (each stops at the same step boundary; rank 0 saves), and when the launcher fails it
names the rank that died. Each worker leaves RUN/ranks/rank-N.pid while it runs and
rank-N.exit when it ends in any way Python sees; a rank with no exit record was killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorafit.core.errors import LorafitError

RANKS = "ranks"  # RUN/ranks/: the workers' pid and exit records of the newest launch


@dataclass(frozen=True)
class Place:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _int(env, *names) -> int | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise LorafitError(f"{n}={v!r} is not an integer") from None
    return None


def _mlx_world(env) -> int | None:
    size = _int(env, "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if size is not None:
        return size
    hostfile = env.get("MLX_HOSTFILE")
    if hostfile:
        try:
            text = Path(hostfile).read_text().strip()
            return len(json.loads(text)) if text else 1
        except (OSError, ValueError):
            return None
    return 1


def detect(env=None) -> Place:
    """This process's place, from the variables torchrun or mlx.launch set (alone: 0 of 1)."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") and env.get("RANK"):  # torchrun / torch.distributed.run
        return Place(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                     _int(env, "LOCAL_RANK") or 0)
    if env.get("MLX_RANK"):  # mlx.launch (ring, MPI, NCCL, JACCL)
        world = _mlx_world(env)
        if world is None:
            raise LorafitError("mlx.launch's hostfile (MLX_HOSTFILE) is unreadable")
        rank = _int(env, "MLX_RANK")
        return Place(rank, world, _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0)
    return Place()


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share of one step's micro-batches: every world-th, starting at rank.
    Applied to the global batch order, so the union over ranks is the 1-process step. Any
    sequence: batches built on demand (core.data.EpochBatches) are built only for this rank."""
    return [items[k] for k in range(rank, len(items), world)]


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without --nproc N (what each worker runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


# -- the workers' records -----------------------------------------------------------------
def ranks_path(run_dir) -> Path:
    return Path(run_dir) / RANKS


def record_start(run_dir, place: Place) -> None:
    folder = ranks_path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{place.rank}.pid").write_text(str(os.getpid()))


def record_exit(run_dir, place: Place, code: int, error: str | None = None) -> None:
    try:
        folder = ranks_path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{place.rank}.exit").write_text(
            json.dumps({"code": code, "error": error}))
    except OSError:
        pass


def _records(run_dir) -> tuple[dict, dict]:
    pids, exits = {}, {}
    folder = ranks_path(run_dir)
    for p in folder.glob("rank-*.pid") if folder.is_dir() else ():
        try:
            pids[int(p.stem[5:])] = int(p.read_text())
        except ValueError:
            pass
    for p in folder.glob("rank-*.exit") if folder.is_dir() else ():
        try:
            exits[int(p.stem[5:])] = json.loads(p.read_text())
        except ValueError:
            pass
    return pids, exits


def rank_pids(run_dir) -> dict[int, int]:
    """{rank: pid} of the newest launch's workers (what the TUI samples for CPU use)."""
    return _records(run_dir)[0]


def _alive(pid: int) -> bool:
    from lorafit.core.rundir import pid_alive

    return pid_alive(pid)


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def failure_line(run_dir, nproc: int, code: int) -> str | None:
    """One line naming the rank(s) that died, else the error of the rank that failed
    first (None when every rank failed alike and rank 0 already said why)."""
    pids, exits = _records(run_dir)
    dead = [r for r in range(nproc) if r not in exits]
    if dead:
        which = ", ".join(str(r) for r in dead)
        started = [r for r in dead if r in pids]
        how = "was killed or crashed" if started else "never started"
        text = f"rank {which} {how} (no exit record)"
        others = [e.get("error") for r, e in sorted(exits.items()) if e.get("error")]
        if others:
            text += f"; the other ranks stopped: {others[0]}"
        return text
    errors = [(r, e.get("error")) for r, e in sorted(exits.items()) if e.get("code")]
    if errors and all(err == errors[0][1] for _, err in errors) and errors[0][0] == 0 \
            and errors[0][1]:
        return None  # every rank failed alike (a user mistake): rank 0 printed it
    if errors:
        errors.sort(key=lambda e: e[0] == 0)  # another rank's own error before rank 0's
        r, err = errors[0]
        return f"rank {r} failed: {err or 'exit code ' + str(exits[r].get('code'))}"
    return f"the launcher exited with code {code}"


def run_launcher(command: list[str], run_dir, nproc: int, grace_s: float = 60.0) -> int:
    """Run the launcher in its own session (Ctrl-C reaches only this parent), forward
    stop requests to the workers, and report a failure in one line. Returns an exit code."""
    import shutil

    shutil.rmtree(ranks_path(run_dir), ignore_errors=True)  # records of an older launch
    proc = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)
    signals = {"n": 0}

    def forward(signum, frame):
        signals["n"] += 1
        pids, _ = _records(run_dir)
        if signals["n"] > 1 and signum == signal.SIGINT or not pids:
            _kill_group(proc)  # second Ctrl-C, or no worker running yet: now
            return
        print("\nstopping every rank after this step and saving (Ctrl-C again to quit "
              "at once)", file=sys.stderr)
        for pid in pids.values():
            _signal(pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    pids, _ = _records(run_dir)
    deadline = time.time() + grace_s
    left = [p for p in pids.values() if _alive(p)]
    while left and time.time() < deadline:  # a launcher that did not wait for its workers
        time.sleep(0.2)
        left = [p for p in left if _alive(p)]
    for p in left:
        _signal(p, signal.SIGKILL)
    _kill_group(proc)
    _, exits = _records(run_dir)  # mlx.launch exits 0 even when a rank failed
    if code != 0 or any(r not in exits or exits[r].get("code") for r in range(nproc)):
        line = failure_line(run_dir, nproc, code)
        if line:
            print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
