"""Checkpoints that a crash cannot corrupt, in a backend-neutral format.

checkpoints/step-N/ holds the adapter (PEFT layout), the optimizer state (numpy),
the trainer state (step, data position, schedule, best validation loss, backend) and, written
last, a completion marker (file names: core/rundir.py). The folder is assembled under a
temporary name and renamed into place (`rundir.atomic_folder`), so a reader only ever sees
whole checkpoints; one without its marker is skipped with a message.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from lorafit.core import rundir
from lorafit.core.adapter_io import load_peft, save_peft
from lorafit.core.errors import LorafitError


def save_checkpoint(run_dir: str | Path, step: int, adapter: dict, lora_cfg, base_model,
                    optimizer_state: dict, trainer_state: dict, keep: int) -> Path:
    final = rundir.checkpoint_path(run_dir, step)
    with rundir.atomic_folder(final) as tmp:
        save_peft(tmp, adapter, lora_cfg, base_model)
        rundir.write_checkpoint_state(tmp, optimizer_state, trainer_state)
        _fault_point(step)
        rundir.mark_complete(tmp, step)
    prune(run_dir, keep)
    return final


def _fault_point(step: int) -> None:
    """Fault injection for the crash-safety test: LORAFIT_FAULT=kill-in-checkpoint:N
    kills the process with SIGKILL half-way through writing checkpoint N."""
    if os.environ.get("LORAFIT_FAULT") == f"kill-in-checkpoint:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def prune(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and stale temp dirs."""
    complete = [p for _, p in rundir.checkpoint_dirs(run_dir) if rundir.has_marker(p)]
    for p in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    rundir.remove_stale(rundir.checkpoints_path(run_dir))


def latest_checkpoint(run_dir: str | Path, report=print) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped with a message."""
    for step, path in reversed(rundir.checkpoint_dirs(run_dir)):
        if rundir.is_complete(path):
            return path
        report(f"skipping incomplete checkpoint {path} (no completion marker)")
    return None


def load_checkpoint(path: str | Path) -> dict:
    """{'adapter', 'lora_config', 'optimizer', 'state'} from a complete checkpoint."""
    path = Path(path)
    if not rundir.has_marker(path):
        raise LorafitError(f"{path}: incomplete checkpoint (no {rundir.COMPLETE} marker)")
    cfg, adapter = load_peft(path)
    try:
        state = rundir.read_trainer_state(path)
    except (OSError, ValueError) as e:
        raise LorafitError(f"{rundir.trainer_state_path(path)}: unreadable ({e})") from None
    return {"adapter": adapter, "lora_config": cfg, "state": state,
            "optimizer": rundir.read_optimizer(path)}
