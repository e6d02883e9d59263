"""`lorafit train`: one training run, assembled: check the data, pick the backend, load the
model, attach the adapter, train, save. Used by `lorafit train` (which the TUI starts as a
child process) and `lorafit demo`."""

from __future__ import annotations

import sys
from pathlib import Path

from lorafit.core import config as config_mod
from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.checkpoint import check_fingerprint, fingerprint, load_latest
from lorafit.core.control import Control
from lorafit.core.data import check_enough, load_dataset, scan, split_validation
from lorafit.core.examples import ExampleSet
from lorafit.core.sources import open_data, open_records
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


class Interrupted(LorafitError):
    """Ctrl-C (or SIGTERM) arrived before the first step: nothing was written."""


def check_new_run(cfg, resume: bool) -> Path:
    run_dir = Path(cfg.output)
    if not resume and rundir.holds_checkpoints(run_dir):
        raise LorafitError(f"{run_dir} already holds a run; use --resume {run_dir} to "
                           "continue it or --output to start a new one")
    return run_dir


def prepare_run_dir(cfg, resume: bool) -> Path:
    run_dir = check_new_run(cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_config(run_dir, config_mod.to_toml(cfg))
    return run_dir


UNSUPPORTED_QUANT = "lorafit trains on float weights (fp32/bf16/fp16), quantizing them " \
                    "itself with --quantize 4bit or 8bit"


def check_model_folder(cfg, folder) -> None:
    """What config.json says that lorafit cannot train on, before any weight loads: weights
    stored quantized (FP8, int8, GPTQ, AWQ, bitsandbytes) would be read without their
    scales; layer indices must exist."""
    from lorafit.models.loader import load_args, read_config

    raw = read_config(Path(folder))
    q = raw.get("quantization_config")
    if q:
        method = q.get("quant_method") or q.get("quant_type") or "quantized" \
            if isinstance(q, dict) else "quantized"
        raise LorafitError(f"{folder}: weights stored {method} (quantization_config) are "
                           f"not supported; {UNSUPPORTED_QUANT}")
    n = load_args(str(folder))[0].num_hidden_layers
    bad = [i for i in cfg.layers or [] if not 0 <= i < n]
    if bad:
        raise LorafitError(f"layers {','.join(map(str, bad))} out of range: the model has "
                           f"{n} layers (0-{n - 1})")


def check_token_ids(examples, vocab_size: int, what: str = "data") -> None:
    """Token ids the embedding has no row for (a tokenizer that does not match the model)."""
    low, top = ExampleSet.from_examples(examples).token_range()
    if top >= vocab_size or low < 0:
        raise LorafitError(f"{what}: token id {top if top >= vocab_size else low} is outside "
                           f"the model's vocabulary (0-{vocab_size - 1}); the tokenizer does "
                           "not match the model")


def open_training_data(cfg):
    """(training records, validation records or None) as streams (core/sources.py): a
    --val-data set first, else the valid split of a data folder or saved dataset."""
    train, folder_val = open_data(cfg.data, split=cfg.data_split, config=cfg.data_config,
                                  revision=cfg.data_revision, columns=cfg.columns,
                                  with_validation=not cfg.val_data)
    val = open_records(cfg.val_data, columns=cfg.columns) if cfg.val_data else folder_val
    return train, val


def peek_data(cfg) -> None:
    """The sources open and their first records are in a known format: the cheap data
    problems, found before a model is resolved (and perhaps downloaded). Every record is
    read once, later, by load_examples."""
    for source in open_training_data(cfg):
        if source is not None:
            scan(source)


def load_examples(cfg, tokenizer):
    train_src, val_src = open_training_data(cfg)
    chat = dict(chat_loss=cfg.chat_loss, train_on_reasoning=cfg.train_on_reasoning)
    train, stats = load_dataset(train_src, tokenizer, cfg.seq_len, cfg.on_bad_record,
                                cfg.train_on_prompt, **chat)
    notes = [f"data: {stats.examples} examples ({stats.format}), {stats.loss_tokens:,} loss "
             f"tokens, {stats.truncated} truncated to {cfg.seq_len}"]
    notes += [f"skipped {p}" for p in stats.problems[:5]]
    val = []
    if val_src is not None:
        val, vstats = load_dataset(val_src, tokenizer, cfg.seq_len, cfg.on_bad_record,
                                   cfg.train_on_prompt, **chat)
        notes += [f"validation: {vstats.examples} examples from {val_src}"]
        notes += [f"skipped {p}" for p in vstats.problems[:5]]
    elif cfg.val_fraction:
        train, val = split_validation(train, cfg.val_fraction, cfg.seed)
    check_enough(train, cfg.batch_size)
    return train, val, notes


def build_trainer(cfg, sinks=(), control=None, resume: bool = False, report=None,
                  allow_changed=()):
    """Everything up to the first step. Data problems surface before the model loads; the
    run folder is locked before anything loads and released when the run ends."""
    run_dir = Path(cfg.output)
    created = not run_dir.exists()
    lock = rundir.RunLock(run_dir).acquire()
    try:
        trainer = _build(cfg, sinks, control, resume, report, allow_changed, lock)
    except BaseException:
        lock.release()
        if created and {p.name for p in run_dir.iterdir()} <= {rundir.LOCK}:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # a run that never started
        raise
    return trainer


def _build(cfg, sinks, control, resume, report, allow_changed, lock):
    from lorafit.backends import get_backend
    from lorafit.models.loader import load_model, load_tokenizer, resolve_model_path

    report = report or (lambda text: print(text, file=sys.stderr))
    control = control or Control(cfg.output)

    def check_interrupt():
        if control.stop_requested:
            raise Interrupted("interrupted before training started; nothing was written")

    peek_data(cfg)  # a missing or unreadable data set stops here, before the model
    folder = resolve_model_path(cfg.model)
    check_model_folder(cfg, folder)  # config.json problems first: they are cheap to find
    run_dir = check_new_run(cfg, resume)
    ckpt, print_ = None, fingerprint(cfg)
    if resume:
        found = load_latest(run_dir, report=report)
        if found is None:
            report(f"no complete checkpoint in {run_dir}; starting from the beginning")
        else:
            path, ckpt = found
            check_fingerprint(ckpt["state"].get("fingerprint"), print_, allow_changed)
            report(f"resuming from {path}")
    check_interrupt()
    tokenizer = load_tokenizer(folder)
    train, val, notes = load_examples(cfg, tokenizer)  # read once; errors before any weight
    check_interrupt()
    from lorafit.commands.estimate import preflight

    estimate = preflight(cfg)  # stops here when the run cannot fit (unless --force)
    check_interrupt()
    ops = get_backend(cfg.backend, cfg.device, verbose=True)
    ops.seed(cfg.seed)
    model = load_model(str(folder), ops, cfg.dtype, cfg.quantize)
    check_token_ids(train, model.args.vocab_size, cfg.data)
    check_token_ids(val, model.args.vocab_size, cfg.val_data or cfg.data)
    model._tokenizer = tokenizer
    check_interrupt()
    run_dir = prepare_run_dir(cfg, resume)
    attach(model, cfg.lora_config(), None if ckpt is None else ckpt["adapter"], seed=cfg.seed)
    sinks = list(sinks) + [ev.JsonlSink(run_dir), ev.StatusSink(run_dir)]
    trainer = Trainer(model, cfg, train, val, run_dir, sinks, control, estimate=estimate)
    trainer.lock = lock
    trainer.fingerprint = print_
    if ckpt is not None:
        trainer.load_state(ckpt)
    for note in notes:
        trainer.emit(ev.Message(level="info", text=note))
    return trainer


def run_training(cfg, sinks=None, control=None, resume=False, install_signals=True,
                 allow_changed=()) -> str:
    sinks = [ev.ConsoleSink()] if sinks is None else sinks
    control = control or Control(cfg.output)
    if install_signals:
        control.install_signal_handlers(report=lambda t: print(f"\n{t}", file=sys.stderr))
    trainer = build_trainer(cfg, sinks, control, resume, allow_changed=allow_changed)
    try:
        return trainer.run()
    finally:
        for s in trainer.sinks:
            s.close()


def main(cfg, resume: bool = False, allow_changed=()) -> int:
    """`lorafit train`. An unexpected error (out of memory, a full disk, a bug) ends as one
    line; its traceback goes to RUN/error.log and status.json says "failed"."""
    if not cfg.model or not cfg.data:
        raise LorafitError("train needs --model and --data (or a config file that sets them)")
    try:
        status = run_training(cfg, resume=resume, allow_changed=allow_changed)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except LorafitError:
        raise
    except Exception as e:
        import traceback

        log = rundir.error_log_path(cfg.output)
        where = ""
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:
                traceback.print_exc(file=f)
            where = f" (traceback in {log})"
        except OSError:
            pass
        print(f"error: {one_line(e)}{where}", file=sys.stderr)
        return 1
    return 0 if status in ("completed", "early_stopped", "stopped") else 1


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__
