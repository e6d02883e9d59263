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


def load_latest(run_dir: str | Path, report=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, tried newest to oldest: incomplete or unreadable
    ones (a marker over torn tensors, a damaged state file) are skipped with one line each.
    None when no checkpoint loads."""
    for step, path in reversed(rundir.checkpoint_dirs(run_dir)):
        if not rundir.is_complete(path):
            report(f"skipping incomplete checkpoint {path} (no completion marker)")
            continue
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # any damage: safetensors, JSON, missing files
            reason = " ".join(str(e).split()) or type(e).__name__
            report(f"skipping unreadable checkpoint {path} ({reason[:200]})")
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
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise LorafitError(f"{rundir.trainer_state_path(path)}: not a trainer state")
    try:
        optimizer = rundir.read_optimizer(path)
    except Exception as e:
        raise LorafitError(f"{path}: unreadable optimizer state ({e})") from None
    return {"adapter": adapter, "lora_config": cfg, "state": state, "optimizer": optimizer}


# -- what a checkpoint was trained with ---------------------------------------------------
# A resumed run must continue the run that wrote its checkpoint. These settings change what
# the checkpoint's tensors mean (LoRA shape and scale, the data, the batches): never allowed.
FIXED = ("rank", "alpha", "dropout", "targets", "layers", "rslora", "dora", "quantize",
         "batch_size", "grad_accum", "seq_len", "pack", "seed", "train_on_prompt",
         "val_fraction", "data_sha256", "val_data_sha256", "data_split", "data_config",
         "data_revision", "columns", "chat_loss", "train_on_reasoning",
         "method", "beta", "dpo_loss", "orpo_lambda", "kto_desirable_weight",
         "kto_undesirable_weight", "reward", "num_generations", "max_new_tokens",
         "temperature")
# These only steer the rest of the run: allowed with --allow-changed NAME.
SAFE = ("lr", "schedule", "warmup_steps", "min_lr_ratio", "max_steps", "epochs",
        "eval_every", "save_every", "early_stopping_patience", "weight_decay")


def fingerprint(cfg, world_size: int = 1) -> dict:
    """The settings a checkpoint depends on (core/config.TrainConfig fields), the data
    files' hashes, and the number of processes (only grad_accum x world_size, the step's
    micro-batches, must stay: see fit_grad_accum)."""
    out = {k: getattr(cfg, k) for k in FIXED + SAFE if hasattr(cfg, k)}
    from lorafit.core.sources import content_hash

    out["world_size"] = world_size
    out["data_sha256"] = content_hash(cfg.data)  # a file, a folder's files or a Hub id
    out["val_data_sha256"] = content_hash(cfg.val_data)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_sha256", "").replace("_", "-")


def parse_allow_changed(text: str | None) -> tuple[str, ...]:
    """--allow-changed lr,max-steps -> ("lr", "max_steps"); only SAFE names."""
    names = tuple(n.strip().replace("-", "_") for n in (text or "").split(",") if n.strip())
    bad = [n for n in names if n not in SAFE]
    if bad:
        raise LorafitError(f"--allow-changed {','.join(bad)}: only "
                           f"{', '.join(_flag(n)[2:] for n in SAFE)} may change on resume")
    return names


def check_fingerprint(saved: dict | None, current: dict, allowed=()) -> None:
    """One line listing what changed since the checkpoint was written; settings in
    `allowed` (SAFE ones) may change. A checkpoint without a fingerprint is not checked."""
    if not isinstance(saved, dict):
        return
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    if _micro_per_step(saved) == _micro_per_step(current):  # same global batch
        changed = [k for k in changed if k not in ("grad_accum", "world_size")]
    changed = [k for k in changed if k != "world_size"]  # grad_accum says what matters
    fixed = [k for k in changed if k not in SAFE]
    unsafe = [k for k in changed if k in SAFE and k not in allowed]
    if not fixed and not unsafe:
        return

    def show(k):
        if k.endswith("_sha256"):
            return f"{_flag(k)} (the file's contents changed)"
        return f"{_flag(k)} {saved[k]!r} -> {current[k]!r}"

    text = "; ".join(show(k) for k in fixed + unsafe)
    hint = (" (these change what the checkpoint means; start a new run with --output)"
            if fixed else "")
    if unsafe and not fixed:
        hint = f" (pass --allow-changed {','.join(_flag(k)[2:] for k in unsafe)} to accept)"
    raise LorafitError(f"resume with changed settings: {text}{hint}")


def _micro_per_step(fp: dict) -> int | None:
    if not isinstance(fp.get("grad_accum"), int):
        return None
    return fp["grad_accum"] * int(fp.get("world_size") or 1)


def fit_grad_accum(cfg, saved: dict | None, world_size: int, report=print) -> None:
    """A run resumed with another number of processes keeps its global batch: grad_accum
    becomes (saved grad_accum x saved world size) / world_size. A grad_accum the user
    changed on purpose is left for check_fingerprint to refuse."""
    if not isinstance(saved, dict) or _micro_per_step(saved) is None:
        return
    total, before = _micro_per_step(saved), int(saved.get("world_size") or 1)
    if total == cfg.grad_accum * world_size or cfg.grad_accum != saved["grad_accum"]:
        return
    if total % world_size:
        raise LorafitError(f"the checkpoint's steps take {total} micro-batches (grad-accum "
                           f"{saved['grad_accum']} x {before} processes), which "
                           f"{world_size} processes cannot share evenly; resume with a "
                           f"process count that divides {total}")
    new = total // world_size
    report(f"{world_size} process(es) continue a run of {before}: grad-accum "
           f"{cfg.grad_accum} -> {new} keeps the global batch")
    cfg.grad_accum = new
