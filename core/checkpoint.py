"""Checkpoints that a crash cannot corrupt, in a backend-neutral format.

checkpoints/step-N/ holds the adapter (PEFT layout), the optimizer state
(optimizer.safetensors, numpy), trainer_state.json (step, data position, schedule, best
validation loss, backend) and, written last, a COMPLETE marker. The folder is assembled
under a temporary name and renamed into place, so a reader only ever sees whole checkpoints;
one without its marker is skipped with a message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import shutil
from pathlib import Path

from lorafit.core.adapter_io import load_peft, save_peft
from lorafit.core.errors import LorafitError
from lorafit.core.fileio import atomic_save_safetensors, atomic_write_json, \
    atomic_write_text, fsync_dir, load_safetensors_numpy

MARKER = "COMPLETE"
STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(run_dir: str | Path, step: int, adapter: dict, lora_cfg, base_model,
                    optimizer_state: dict, trainer_state: dict, keep: int) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step}"
    tmp = ckpt_root / f".step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_peft(tmp, adapter, lora_cfg, base_model)
    atomic_save_safetensors(tmp / OPTIMIZER, optimizer_state)
    atomic_write_json(tmp / STATE, trainer_state)
    _fault_point(step)
    atomic_write_text(tmp / MARKER, f"step {step}\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(ckpt_root)
    prune(ckpt_root, keep)
    return final


def _fault_point(step: int) -> None:
    """Fault injection for the crash-safety test: LORAFIT_FAULT=kill-in-checkpoint:N
    kills the process with SIGKILL half-way through writing checkpoint N."""
    if os.environ.get("LORAFIT_FAULT") == f"kill-in-checkpoint:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and stale temp dirs."""
    complete = [p for _, p in _step_dirs(ckpt_root) if (p / MARKER).exists()]
    for p in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.glob(".step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | Path, report=print) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped with a message."""
    for step, path in reversed(_step_dirs(Path(run_dir) / "checkpoints")):
        if (path / MARKER).exists() and (path / STATE).exists():
            return path
        report(f"skipping incomplete checkpoint {path} (no completion marker)")
    return None


def load_checkpoint(path: str | Path) -> dict:
    """{'adapter', 'lora_config', 'optimizer', 'state'} from a complete checkpoint."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise LorafitError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    cfg, adapter = load_peft(path)
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LorafitError(f"{path / STATE}: unreadable ({e})") from None
    return {"adapter": adapter, "lora_config": cfg, "state": state,
            "optimizer": load_safetensors_numpy(path / OPTIMIZER)}
