"""`lorafit train`: one training run, assembled: check the data, pick the backend, load the
model, attach the adapter, train, save. Used by `lorafit train` (which the TUI starts as a
child process) and `lorafit demo`."""

from __future__ import annotations

import sys
from pathlib import Path

from lorafit.core import config as config_mod
from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.checkpoint import latest_checkpoint, load_checkpoint
from lorafit.core.control import Control
from lorafit.core.data import check_dataset_file, check_enough, load_dataset, split_validation
from lorafit.core.errors import LorafitError
from lorafit.core.lora import attach
from lorafit.core.train import Trainer


def resolve_config(toml: str | None, overrides: dict, resume: str | None = None):
    """The run's TrainConfig: the TOML file (with `resume`, RUN_DIR/config.toml unless a file
    is given), then the flags that were given (None = not given)."""
    overrides = dict(overrides)
    if resume:
        saved = rundir.config_path(resume)
        if not saved.exists():
            raise LorafitError(f"{resume}: no {saved.name} (not a lorafit run directory)")
        toml = toml or str(saved)
        overrides["output"] = resume
    return config_mod.resolve(toml, overrides)


def prepare_run_dir(cfg, resume: bool) -> Path:
    run_dir = Path(cfg.output)
    if not resume and rundir.holds_checkpoints(run_dir):
        raise LorafitError(f"{run_dir} already holds a run; use --resume {run_dir} to "
                           "continue it or --output to start a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_config(run_dir, config_mod.to_toml(cfg))
    return run_dir


def load_examples(cfg, tokenizer):
    train, stats = load_dataset(cfg.data, tokenizer, cfg.seq_len, cfg.on_bad_record,
                                cfg.train_on_prompt)
    notes = [f"data: {stats.examples} examples ({stats.format}), {stats.loss_tokens:,} loss "
             f"tokens, {stats.truncated} truncated to {cfg.seq_len}"]
    notes += [f"skipped {p}" for p in stats.problems[:5]]
    val = []
    if cfg.val_data:
        val, vstats = load_dataset(cfg.val_data, tokenizer, cfg.seq_len, cfg.on_bad_record,
                                   cfg.train_on_prompt)
    elif cfg.val_fraction:
        train, val = split_validation(train, cfg.val_fraction, cfg.seed)
    check_enough(train, cfg.batch_size)
    return train, val, notes


def build_trainer(cfg, sinks=(), control=None, resume: bool = False, report=None):
    """Everything up to the first step. Data problems surface before the model loads."""
    from lorafit.backends import get_backend
    from lorafit.models.loader import load_args, load_model, load_tokenizer, \
        resolve_model_path

    report = report or (lambda text: print(text, file=sys.stderr))
    check_dataset_file(cfg.data, cfg.on_bad_record)
    if cfg.val_data:
        check_dataset_file(cfg.val_data, cfg.on_bad_record)
    folder = resolve_model_path(cfg.model)
    load_args(str(folder))  # config.json problems first: they are cheap to find
    from lorafit.commands.estimate import preflight

    estimate = preflight(cfg)  # stops here when the run cannot fit (unless --force)
    tokenizer = load_tokenizer(folder)
    train, val, notes = load_examples(cfg, tokenizer)  # data errors before any weight loads
    ops = get_backend(cfg.backend, cfg.device, verbose=True)
    ops.seed(cfg.seed)
    model = load_model(str(folder), ops, cfg.dtype, cfg.quantize)
    model._tokenizer = tokenizer
    run_dir = prepare_run_dir(cfg, resume)
    ckpt = None
    if resume:
        path = latest_checkpoint(run_dir, report=report)
        if path is None:
            report(f"no complete checkpoint in {run_dir}; starting from the beginning")
        else:
            ckpt = load_checkpoint(path)
            report(f"resuming from {path}")
    attach(model, cfg.lora_config(), None if ckpt is None else ckpt["adapter"], seed=cfg.seed)
    sinks = list(sinks) + [ev.JsonlSink(run_dir), ev.StatusSink(run_dir)]
    trainer = Trainer(model, cfg, train, val, run_dir, sinks, control or Control(run_dir),
                      estimate=estimate)
    if ckpt is not None:
        trainer.load_state(ckpt)
    for note in notes:
        trainer.emit(ev.Message(level="info", text=note))
    return trainer


def run_training(cfg, sinks=None, control=None, resume=False, install_signals=True) -> str:
    sinks = [ev.ConsoleSink()] if sinks is None else sinks
    control = control or Control(cfg.output)
    if install_signals:
        control.install_signal_handlers(report=lambda t: print(f"\n{t}", file=sys.stderr))
    trainer = build_trainer(cfg, sinks, control, resume)
    try:
        return trainer.run()
    finally:
        for s in trainer.sinks:
            s.close()


def main(cfg, resume: bool = False) -> int:
    if not cfg.model or not cfg.data:
        raise LorafitError("train needs --model and --data (or a config file that sets them)")
    status = run_training(cfg, resume=resume)
    return 0 if status in ("completed", "early_stopped", "stopped") else 1
