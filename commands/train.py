"""`lorafit train`: one training run, assembled: check the data, pick the backend, load the
model, attach the adapter, train, save. Used by `lorafit train` (which the TUI starts as a
child process) and `lorafit demo`."""

from __future__ import annotations

import sys
from pathlib import Path

from lorafit.core import config as config_mod
from lorafit.core import events as ev
from lorafit.core import rundir, trackers
from lorafit.core import launch
from lorafit.core.checkpoint import check_fingerprint, fingerprint, fit_grad_accum, \
    load_latest
from lorafit.core.control import Control
from lorafit.core.data import check_enough, load_dataset, scan, split_validation
from lorafit.core.examples import ExampleSet
from lorafit.core.sources import open_data, open_records
from lorafit.core.errors import LorafitError
from lorafit.core.lora import attach
from lorafit.core.model_card import ModelCardSink
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


def check_model_folder(cfg, folder) -> None:
    """What config.json says that lorafit cannot train on, before any weight loads: weights
    stored quantized by other tools (models.loader.check_stored_quantization, also run by
    every load); layer indices must exist."""
    from lorafit.models.loader import load_args

    n = load_args(str(folder))[0].num_hidden_layers
    bad = [i for i in cfg.layers or [] if not 0 <= i < n]
    if bad:
        raise LorafitError(f"layers {','.join(map(str, bad))} out of range: the model has "
                           f"{n} layers (0-{n - 1})")


def check_token_ids(examples, vocab_size: int, what: str = "data") -> None:
    """Token ids the embedding has no row for (a tokenizer that does not match the model)."""
    from lorafit.models import check_token_ids as check

    low, top = ExampleSet.from_examples(examples).token_range()
    check([[low, top]] if top >= 0 else [], vocab_size, what)


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
    if cfg.method == "grpo":  # prompts and the reward function, before the model
        from lorafit.core.grpo_data import check_prompt_file
        from lorafit.core.rewards import load_reward

        if cfg.val_data or cfg.val_fraction:
            raise LorafitError("--method grpo has no validation pass: drop --val-data and "
                               "--val-fraction")
        check_prompt_file(open_training_data(cfg)[0], cfg.on_bad_record)  # --columns
        load_reward(cfg.reward)
        return
    if cfg.method != "sft":  # preference pairs: every record checked, before the model
        from lorafit.core.preference_data import check_preference_file

        for source in open_training_data(cfg):  # --columns, a folder's valid split
            if source is not None:
                check_preference_file(source, cfg.method, cfg.on_bad_record)
        return
    for source in open_training_data(cfg):
        if source is not None:
            scan(source)


def load_grpo_prompts(cfg, tokenizer):
    """(prompts, None, notes) for --method grpo (core/grpo_data.py)."""
    from lorafit.core.grpo_data import load_prompts

    if cfg.pack:
        raise LorafitError("--pack: GRPO completions are not packed; drop --pack")
    train, problems = load_prompts(open_training_data(cfg)[0], tokenizer, cfg.seq_len,
                                   cfg.max_new_tokens, cfg.on_bad_record)
    notes = [f"data: {len(train)} grpo prompts, {cfg.num_generations} completions each"] + \
        [f"skipped {p}" for p in problems[:5]]
    check_enough(range(len(train)), cfg.batch_size)
    return train, None, notes


def load_preference_examples(cfg, tokenizer):
    """(train, val, notes) for --method dpo|orpo|kto (core/preference_data.py)."""
    from lorafit.core.preference_data import load_preferences

    if cfg.method == "kto" and cfg.batch_size < 2:
        raise LorafitError("--method kto needs --batch-size 2 or more: its KL estimate "
                           "pairs each prompt with another completion of the batch")
    if cfg.pack:
        raise LorafitError(f"--pack: preference pairs are not packed; drop --pack for "
                           f"--method {cfg.method}")
    train_src, val_src = open_training_data(cfg)
    train, problems = load_preferences(train_src, tokenizer, cfg.seq_len, cfg.method,
                                       cfg.on_bad_record)
    what = "labelled completions" if cfg.method == "kto" else "pairs"
    notes = [f"data: {len(train)} {cfg.method} {what}, {train.truncated} sequences truncated "
             f"to {cfg.seq_len}"] + [f"skipped {p}" for p in problems[:5]]
    val = None
    if val_src is not None:  # --val-data, else a data folder's valid split
        val, vproblems = load_preferences(val_src, tokenizer, cfg.seq_len, cfg.method,
                                          cfg.on_bad_record)
        notes += [f"validation: {len(val)} {what} from {val_src}"]
        notes += [f"skipped {p}" for p in vproblems[:5]]
    elif cfg.val_fraction:
        train_ks, val_ks = split_validation(list(range(len(train))), cfg.val_fraction,
                                            cfg.seed)
        train, val = train.subset(train_ks), train.subset(val_ks)
    check_enough(range(len(train)), cfg.batch_size)
    return train, val, notes


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
    primary = launch.detect().rank == 0  # rank 0 alone writes the run folder
    lock = rundir.RunLock(run_dir).acquire() if primary else _NoLock()
    try:
        trainer = _build(cfg, sinks, control, resume, report, allow_changed, lock)
    except BaseException:
        lock.release()
        if created and {p.name for p in run_dir.iterdir()} <= {rundir.LOCK}:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # a run that never started
        raise
    return trainer


class _NoLock:
    """What ranks other than 0 hold instead of the run folder's lock."""

    def release(self):
        pass


def _build(cfg, sinks, control, resume, report, allow_changed, lock):
    from lorafit.backends import get_backend
    from lorafit.models.loader import (load_args, load_model, load_tokenizer,
                                       resolve_model_path, training_dtype)

    place = launch.detect()
    primary = place.rank == 0
    report = report or (lambda text: print(text, file=sys.stderr))
    if not primary:
        report, sinks = (lambda text: None), ()
    control = control or Control(cfg.output if primary else None)

    def check_interrupt():
        if control.stop_requested:
            raise Interrupted("interrupted before training started; nothing was written")

    peek_data(cfg)  # a missing or unreadable data set stops here, before the model
    trackers.check_installed(trackers.parse(cfg.report_to))
    folder = resolve_model_path(cfg.model)
    check_model_folder(cfg, folder)  # config.json problems first: they are cheap to find
    run_dir = check_new_run(cfg, resume)
    ckpt = None
    if resume:
        found = load_latest(run_dir, report=report)
        if found is None:
            report(f"no complete checkpoint in {run_dir}; starting from the beginning")
        else:
            path, ckpt = found
            fit_grad_accum(cfg, ckpt["state"].get("fingerprint"), place.world_size, report)
            check_fingerprint(ckpt["state"].get("fingerprint"),
                              fingerprint(cfg, place.world_size), allow_changed)
            report(f"resuming from {path}")
    print_ = fingerprint(cfg, place.world_size)
    check_interrupt()
    tokenizer = load_tokenizer(folder)
    preference = cfg.method != "sft"
    load = load_grpo_prompts if cfg.method == "grpo" else \
        load_preference_examples if preference else load_examples
    train, val, notes = load(cfg, tokenizer)  # read once; errors before any weight
    check_interrupt()
    from lorafit.commands.estimate import preflight

    estimate = preflight(cfg)  # stops here when the run cannot fit (unless --force)
    check_interrupt()
    ops = get_backend(cfg.backend, cfg.device, verbose=primary)
    ops.seed(cfg.seed)
    model = load_model(str(folder), ops, cfg.dtype or training_dtype(ops, load_args(folder)[0]),
                       cfg.quantize, shard=cfg.shard and _shards_base(cfg.method))
    check_token_ids(train.examples if preference else train, model.args.vocab_size, cfg.data)
    check_token_ids((val.examples if val else []) if preference else val,
                    model.args.vocab_size, cfg.val_data or cfg.data)
    model._tokenizer = tokenizer
    check_interrupt()
    if primary:
        run_dir = prepare_run_dir(cfg, resume)
    attach(model, cfg.lora_config(), None if ckpt is None else ckpt["adapter"], seed=cfg.seed)
    if primary:
        sinks = list(sinks) + [ev.JsonlSink(run_dir), ev.StatusSink(run_dir),
                               ModelCardSink(run_dir, cfg.model)] + \
            trackers.make_sinks(cfg.report_to, run_dir)
    if cfg.method == "grpo":
        from lorafit.core.grpo_train import GRPOTrainer

        trainer = GRPOTrainer(model, cfg, train, run_dir if primary else None, sinks, control,
                              estimate=estimate, tokenizer=tokenizer)
    elif preference:
        from lorafit.core.preference_train import PreferenceTrainer

        trainer = PreferenceTrainer(model, cfg, train, val, run_dir if primary else None,
                                    sinks, control, estimate=estimate)
    else:
        trainer = Trainer(model, cfg, train, val, run_dir if primary else None, sinks,
                          control, estimate=estimate)
    trainer.lock = lock
    trainer.fingerprint = print_
    if ckpt is not None:
        trainer.load_state(ckpt)
    for note in notes:
        trainer.emit(ev.Message(level="info", text=note))
    return trainer


def _shards_base(method: str) -> bool:
    """Whether the trainer for this method cuts the frozen base under --shard (then each
    rank reads only its slices of the layers while loading)."""
    if method == "grpo":
        return False  # one process only
    if method != "sft":
        from lorafit.core.preference_train import PreferenceTrainer
        return PreferenceTrainer.shards_base
    return Trainer.shards_base


def run_training(cfg, sinks=None, control=None, resume=False, install_signals=True,
                 allow_changed=()) -> str:
    primary = launch.detect().rank == 0
    sinks = ([ev.ConsoleSink()] if primary else []) if sinks is None else sinks
    control = control or Control(cfg.output if primary else None)
    if install_signals:
        control.install_signal_handlers(report=lambda t: print(f"\n{t}", file=sys.stderr))
    trainer = build_trainer(cfg, sinks, control, resume, allow_changed=allow_changed)
    try:
        return trainer.run()
    finally:
        for s in trainer.sinks:
            s.close()


def main(cfg, resume: bool = False, allow_changed=(), nproc: int | None = None,
         argv=None) -> int:
    """`lorafit train`. An unexpected error (out of memory, a full disk, a bug) ends as one
    line; its traceback goes to RUN/error.log and status.json says "failed". With nproc > 1
    it starts that many workers with the backend's launcher (core/launch.py); a worker
    leaves its pid and exit records in RUN/ranks/."""
    if not cfg.model or not cfg.data:
        raise LorafitError("train needs --model and --data (or a config file that sets them)")
    place = launch.detect()
    if nproc is not None and nproc < 1:
        raise LorafitError(f"--nproc must be at least 1, got {nproc}")
    if cfg.method == "grpo" and (nproc or 1) * place.world_size > 1:
        raise LorafitError("--method grpo runs in one process for now: drop --nproc (and "
                           "start it without torchrun / mlx.launch)")
    if nproc and nproc > 1:
        if place.world_size > 1:
            raise LorafitError("--nproc inside a launcher (torchrun, mlx.launch): the "
                               "launcher already started the processes; drop --nproc")
        from lorafit.backends import get_backend

        check_new_run(cfg, resume)
        command = get_backend(cfg.backend, cfg.device).launch_command(
            nproc, launch.strip_nproc(list(argv or [])))
        return launch.run_launcher(command, cfg.output, nproc)
    if place.world_size == 1:
        return _main(cfg, resume, allow_changed)
    launch.record_start(cfg.output, place)
    code, error = 1, None
    try:
        code = _main(cfg, resume, allow_changed)
        return code
    except LorafitError as e:
        code, error = 2, str(e)
        if place.rank == 0:
            raise
        return code  # rank 0 says the same (or `--nproc`'s parent names this rank): one line
    except BaseException as e:
        error = one_line(e)
        raise
    finally:
        launch.record_exit(cfg.output, place, code, error or _last_error.get("text"))


_last_error: dict = {}  # the one line _main printed for an unexpected error


def _main(cfg, resume: bool, allow_changed) -> int:
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
        _last_error["text"] = one_line(e)
        print(f"error: {one_line(e)}{where}", file=sys.stderr)
        return 1
    return 0 if status in ("completed", "early_stopped", "stopped") else 1


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__
