"""The set-up screen: a run's settings, with the memory estimate and the data check beside
them, updated as the user types. Start writes the run's config file, the one `lorafit train`
reads, after checking what would make the run fail at once."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, Select, Static

from lorafit.core import rundir
from lorafit.core.config import (BACKENDS, DPO_LOSSES, METHODS, ON_BAD_RECORD, QUANTIZE,
                                 SCHEDULES, resolve, to_toml)
from lorafit.core.errors import LorafitError
from lorafit.tui.pickers import DataFilePicker, ModelSuggester
from lorafit.tui.widgets import fmt_bytes, histogram, memory_bar

FIELDS = [  # (id, label, default, TrainConfig field, parser)
    ("model", "model", "", "model", str),
    ("data", "data file", "", "data", str),
    ("columns", "columns", "", "columns", str),  # --columns: FIELD=COLUMN,...
    ("output", "run folder", "", "output", str),
    ("rank", "rank", "8", "rank", int),
    ("alpha", "alpha", "16", "alpha", float),
    ("targets", "targets", "q_proj,v_proj", "targets", str),
    ("batch_size", "batch size", "4", "batch_size", int),
    ("grad_accum", "grad accum", "1", "grad_accum", int),
    ("nproc", "processes", "1", None, int),
    ("seq_len", "seq length", "512", "seq_len", int),
    ("lr", "learning rate", "1e-4", "lr", float),
    ("warmup_steps", "warmup steps", "0", "warmup_steps", int),
    ("max_steps", "max steps", "", "max_steps", int),
    ("epochs", "epochs", "1", "epochs", float),
    ("val_fraction", "val fraction", "0", "val_fraction", float),
    ("eval_every", "eval every", "", "eval_every", int),
    ("save_every", "save every", "", "save_every", int),
    ("budget", "budget", "", None, str),
    ("beta", "beta", "0.1", "beta", float),  # shown for dpo and kto (METHOD_FIELDS)
    ("orpo_lambda", "orpo lambda", "0.1", "orpo_lambda", float),  # shown for orpo
    ("kto_desirable_weight", "desirable wt", "1.0", "kto_desirable_weight", float),  # kto
    ("kto_undesirable_weight", "undesirable wt", "1.0", "kto_undesirable_weight", float),
    ("reward", "reward", "", "reward", str),  # grpo: file.py:function
    ("num_generations", "generations", "4", "num_generations", int),  # grpo
    ("max_new_tokens", "new tokens", "64", "max_new_tokens", int),  # grpo
]
METHOD_FIELDS = {  # field -> the methods using it: shown (and passed) only for those
    "beta": ("dpo", "kto"), "dpo_loss": ("dpo",), "orpo_lambda": ("orpo",),
    "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",),
    "reward": ("grpo",), "num_generations": ("grpo",), "max_new_tokens": ("grpo",)}
PLACEHOLDERS = {"model": "folder, hub id (a preset only estimates)",
                "data": ".jsonl / .json", "columns": "e.g. prompt=question",
                "output": "empty: RUNS/run-DATE",
                "max_steps": "empty: epochs", "eval_every": "empty: never",
                "save_every": "empty: at the end", "budget": "empty: the device's memory",
                "nproc": "data parallel: one per GPU or core",
                "reward": "file.py:function", "num_generations": "completions per prompt",
                "max_new_tokens": "longest completion sampled"}
SELECTS = [  # (id, label, choices, default; None: a blank that must be chosen when needed)
    ("backend", "backend", BACKENDS, "auto"),
    ("device", "device", ("auto", "cpu", "cuda", "mps", "metal"), "auto"),
    ("dtype", "base dtype", ("auto", "fp32", "bf16", "fp16"), "auto"),
    ("quantize", "quantize", ("none",) + QUANTIZE, "none"),
    ("schedule", "schedule", SCHEDULES, "cosine"),
    ("on_bad_record", "bad records", ON_BAD_RECORD, None),
    ("method", "method", METHODS, "sft"),  # preference tuning: README "Preference tuning"
    ("dpo_loss", "dpo loss", DPO_LOSSES, "sigmoid"),  # shown for dpo (METHOD_FIELDS)
]
BACKEND_DEVICES = {"torch": ("cpu", "cuda", "mps"), "mlx": ("cpu", "metal")}
FLAG_FIELDS = {"--batch-size": "batch_size", "--grad-accum": "grad_accum",
               "--seq-len": "seq_len", "--rank": "rank", "--dtype": "dtype",
               "--quantize": "quantize", "--grad-checkpoint": "grad_checkpoint",
               "--shard": "shard"}
SWITCHES = ("grad_checkpoint", "shard")  # flags without a value: checkboxes


def suggestion_changes(text: str) -> dict:
    """'--dtype bf16 --batch-size 1 --grad-accum 4 (...): 17 GiB' -> the form's changes."""
    flags = text.split(":", 1)[0]
    changes = {}
    for m in re.finditer(r"(--[a-z-]+)(?:\s+([^\s-][^\s]*))?", flags):
        fid = FLAG_FIELDS.get(m.group(1))
        if fid:
            changes[fid] = True if fid in SWITCHES else m.group(2)
    return changes


def weights_problem(model: str) -> str | None:
    """Why this model field cannot start a run (None when it may): a preset describes a
    model's shape for the estimate, it has no weights."""
    from lorafit.models.presets import find_preset

    if Path(model).expanduser().is_dir():
        return None
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return None  # a hub id: the trainer loads it from the cache or downloads it
    if find_preset(model):
        return (f"{model} is a preset: it estimates memory but has no weights; give a "
                "model folder or a hub id to train")
    return f"{model}: no such model folder"


class SetupScreen(Screen):
    BINDINGS = [Binding("ctrl+s", "start", "Start"), Binding("ctrl+r", "runs", "Runs"),
                Binding("ctrl+f", "apply_fit", "Apply fit", tooltip="put the next suggestion "
                        "of the memory estimate into the form"),
                Binding("ctrl+o", "pick_data", "Files", tooltip="pick the data file from a folder tree"),
                Binding("escape", "leave_field", "Leave", tooltip="leave the text field, "
                        "so that one-letter keys (q, d, ?) work")]

    def __init__(self, defaults: dict | None = None):
        super().__init__()
        self.defaults = defaults or {}
        self.estimate: dict | None = None
        self.data_problems: list = []
        self.fit_index = 0

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        with Horizontal(id="setup"):
            with VerticalScroll(id="form"):
                for fid, label, default, _, _ in FIELDS:
                    if fid not in METHOD_FIELDS:
                        yield from self._input_row(fid, label, default)
                for sid, label, choices, default in SELECTS:
                    with Horizontal(classes="row", id=f"row-{sid}"):
                        yield Label(label)
                        yield Select([(c, c) for c in choices], value=default or Select.NULL,
                                     allow_blank=default is None, id=sid,
                                     prompt="choose" if default is None else "Select",
                                     compact=True)
                for fid, label, default, _, _ in FIELDS:  # under the method select
                    if fid in METHOD_FIELDS:
                        yield from self._input_row(fid, label, default)
                yield Checkbox("gradient checkpointing", id="grad_checkpoint", compact=True)
                yield Button("Start (ctrl+s)", id="start", variant="primary", compact=True)
            with Vertical(id="panels"):
                yield Static("memory: fill in a model", id="memory-panel")
                yield Static("data: choose a file", id="data-panel")
        yield Footer(compact=True)

    def _input_row(self, fid: str, label: str, default: str) -> ComposeResult:
        with Horizontal(classes="row", id=f"row-{fid}"):
            yield Label(label)
            yield Input(value=str(self.defaults.get(fid, default)), id=fid,
                        placeholder=PLACEHOLDERS.get(fid, ""), compact=True,
                        suggester=ModelSuggester() if fid == "model" else None)
            if fid == "nproc":  # --shard, beside the process count it needs
                yield Checkbox("shard the base", id="shard", compact=True,
                               tooltip="--shard (torch, 2 or more processes): each process "
                               "holds 1/N of the frozen layers (docs/distributed.md)")

    def on_mount(self) -> None:
        self.title = "lorafit — new run"
        self.query_one("#model", Input).focus()
        self.show_method_fields()
        self.schedule_update()

    def action_pick_data(self) -> None:
        """A folder tree to choose the data file from (typing the path works too)."""
        field = self.query_one("#data", Input)

        def picked(path: str | None) -> None:
            if path:
                field.value = path
                field.focus()

        self.app.push_screen(DataFilePicker(field.value.strip() or "."), picked)

    def action_leave_field(self) -> None:
        """Esc leaves a text field, so that one-letter keys (q, d, ?) work again."""
        self.set_focus(None)

    # -- the form -------------------------------------------------------------------------
    def nproc(self) -> int:
        """The processes field: 1 .. the devices (CUDA GPUs) or CPU cores the run's backend
        has here; more than 1 starts the trainer with `--nproc N`."""
        text = self.query_one("#nproc", Input).value.strip() or "1"
        try:
            n = int(text)
        except ValueError:
            raise LorafitError(f"processes: {text!r} is not a whole number") from None
        if n < 1:
            raise LorafitError(f"processes: at least 1, got {n}")
        if n > 1:
            from lorafit.backends.devices import process_limit

            device = self.query_one("#device", Select).value
            limit, what = process_limit(self.query_one("#backend", Select).value,
                                        None if device == "auto" else device)
            if n > limit:
                raise LorafitError(f"processes: at most {limit} here ({what}), got {n}")
        return n

    def budget(self) -> int | None:
        text = self.query_one("#budget", Input).value.strip()
        if not text:
            return None
        from lorafit.core.estimate import parse_bytes
        return parse_bytes(text)

    def config(self):
        values = {}
        method = self.query_one("#method", Select).value
        for fid, label, _, field_name, parse in FIELDS:
            text = self.query_one(f"#{fid}", Input).value.strip()
            if not text or field_name is None or method not in METHOD_FIELDS.get(fid, (method,)):
                continue
            try:
                values[field_name] = parse(text)
            except ValueError:
                raise LorafitError(f"{label}: {text!r} is not a valid value") from None
        values["backend"] = self.query_one("#backend", Select).value
        device = self.query_one("#device", Select).value
        if device != "auto":
            if device not in BACKEND_DEVICES.get(values["backend"], (device,)):
                raise LorafitError(f"device: {values['backend']} runs on "
                                   f"{' or '.join(BACKEND_DEVICES[values['backend']])}, "
                                   f"not {device}")
            values["device"] = device
        dtype = self.query_one("#dtype", Select).value
        if dtype != "auto":
            values["dtype"] = dtype
        quantize = self.query_one("#quantize", Select).value
        if quantize != "none":
            values["quantize"] = quantize
        values["schedule"] = self.query_one("#schedule", Select).value
        values["method"] = method
        if method in METHOD_FIELDS["dpo_loss"]:
            values["dpo_loss"] = self.query_one("#dpo_loss", Select).value
        if method == "grpo":
            problem = reward_problem(values.get("reward", ""))
            if problem:
                raise LorafitError(problem)
        bad = self.query_one("#on_bad_record", Select).value
        if bad in ON_BAD_RECORD:
            values["on_bad_record"] = bad
        values["grad_checkpoint"] = self.query_one("#grad_checkpoint", Checkbox).value
        if not values.get("output"):
            values["output"] = str(Path(self.app.runs_root) /
                                   time.strftime("run-%Y%m%d-%H%M%S"))
        self.budget()  # a budget or process count that cannot be used is a form error too
        nproc = self.nproc()
        values["shard"] = self.query_one("#shard", Checkbox).value
        if values["shard"]:  # the pairs --shard cannot run with, one line each
            if nproc < 2:
                raise LorafitError("shard the base: needs 2 or more processes (it cuts the "
                                   "base across them)")
            if values["backend"] == "mlx":
                from lorafit.core.estimate import SHARD_ON_MLX
                raise LorafitError(SHARD_ON_MLX)
        return resolve(None, values)

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def schedule_update(self, event=None) -> None:
        if getattr(self, "_timer", None):
            self._timer.stop()
        self._timer = self.set_timer(0.3, self.update_panels)

    @on(Select.Changed, "#method")
    def show_method_fields(self, event=None) -> None:
        """Each method's own settings (METHOD_FIELDS): beta and the loss for dpo, the weights
        for kto, the reward and group for grpo...; hidden (and not passed) otherwise."""
        method = self.query_one("#method", Select).value
        for fid, methods in METHOD_FIELDS.items():
            self.query_one(f"#row-{fid}").display = method in methods

    def update_panels(self) -> None:
        memory = self.query_one("#memory-panel", Static)
        data = self.query_one("#data-panel", Static)
        try:
            cfg = self.config()
            budget = self.budget()
        except LorafitError as e:
            memory.update(Text(str(e), style="red"))
            return
        if not cfg.model:  # a cleared field clears its panel
            self.estimate = None
            memory.update(Text("memory: fill in a model", style="dim"))
        else:
            self._update_memory(cfg, budget, self.nproc())
        if not cfg.data:
            self.data_problems = []
            data.update(Text("data: choose a file", style="dim"))
        else:
            self._update_data(cfg)

    def _still(self, fid: str, value) -> bool:
        """Whether the field still holds what a worker computed for (no stale panels)."""
        return str(self.query_one(f"#{fid}", Input).value.strip()) == str(value)

    def _still_data(self, cfg) -> bool:
        return self._still("data", cfg.data) and self._still("columns", cfg.columns or "")

    @work(thread=True, exclusive=True, group="memory")
    def _update_memory(self, cfg, budget=None, nproc: int = 1) -> None:
        from lorafit.commands.estimate import estimate_for_config

        panel = self.query_one("#memory-panel", Static)
        try:
            est = estimate_for_config(cfg, budget, nproc=nproc)  # per device of nproc
        except LorafitError as e:
            if self._still("model", cfg.model):
                self.estimate = None
                self.app.call_from_thread(panel.update, Text(f"memory: {e}", style="red"))
            return
        if not self._still("model", cfg.model):
            return
        self.estimate = est
        self.fit_index = 0
        t = Text()
        if est["budget"] is None:  # a device this machine lacks: no capacity to compare
            t.append("no budget known", style="bold yellow")
            t.append(f": needs {fmt_bytes(est['total'])}; set a budget to check the fit\n")
        elif est["fits"]:
            t.append("fits", style="bold green")
            t.append(f": {fmt_bytes(est['total'])} of {fmt_bytes(est['budget'])}\n")
        else:
            t.append("does NOT fit", style="bold red")
            t.append(f": {fmt_bytes(est['total'])} of {fmt_bytes(est['budget'])}; "
                     "ctrl+f applies:\n")
            for s in est["suggestions"]:
                t.append(f"  {s}\n")
        together = shared_need(est, nproc)
        if together:  # N processes in one memory (CPU RAM, a Mac's unified memory)
            over = est["budget"] is not None and together > est["budget"]
            t.append(f"{nproc} processes share this memory: about {fmt_bytes(together)}"
                     + (" (base sharded)" if cfg.shard else "")
                     + (" — does NOT fit\n" if over else "\n"),
                     style="bold red" if over else "dim")
        t.append("memory estimate ", style="bold")
        t.append(f"{est['backend']} on {est['device']}, {est['model_source']} "
                 f"({est['budget_source']})"
                 + (f", per device of {nproc} processes" if nproc > 1 else "") + "\n",
                 style="dim")
        t.append(memory_bar([(k, v) for k, v in est["breakdown"].items() if v],
                            est["budget"], width=32))
        self.app.call_from_thread(panel.update, t)

    @work(thread=True, exclusive=True, group="data")
    def _update_data(self, cfg) -> None:
        from lorafit.core.data import load_dataset

        panel = self.query_one("#data-panel", Static)
        try:
            records = data_records(cfg)
            stats = check_data(records, cfg.method)
        except LorafitError as e:
            if self._still_data(cfg):
                self.data_problems = []
                self.app.call_from_thread(panel.update, Text(f"data: {e}", style="red"))
            return
        body = Text()
        body.append(f"{stats.records} records, format {stats.format}\n")
        lengths = []
        if cfg.model and Path(cfg.model).is_dir():
            try:
                from lorafit.models.loader import load_tokenizer

                if cfg.method == "sft":
                    examples, tstats = load_dataset(records, load_tokenizer(cfg.model),
                                                    cfg.seq_len, "skip")
                    count = f"{tstats.examples} examples"
                    truncated, problems = tstats.truncated, tstats.problems
                elif cfg.method == "grpo":  # prompts; completions are sampled
                    from lorafit.core.grpo_data import load_prompts

                    pset, problems = load_prompts(records, load_tokenizer(cfg.model),
                                                  cfg.seq_len, cfg.max_new_tokens, "skip")
                    examples, truncated = pset.examples, None  # too long: a problem
                    count = (f"{len(pset)} prompts x {cfg.num_generations} completions of "
                             f"up to {cfg.max_new_tokens} tokens")
                else:  # preference records: pairs (two sequences each) or labelled ones
                    from lorafit.core.preference_data import load_preferences

                    pset, problems = load_preferences(records, load_tokenizer(cfg.model),
                                                      cfg.seq_len, cfg.method, "skip")
                    examples, truncated = pset.examples, pset.truncated
                    count = f"{len(pset)} {'pairs' if pset.kind == 'pairs' else 'completions'}"
                lengths = [e.input_ids.size for e in examples]
                body.append(f"{count}\n" if truncated is None else
                            f"{count}, {truncated} truncated to {cfg.seq_len} tokens\n")
                stats.problems = problems
            except LorafitError as e:
                body.append(f"{e}\n", style="red")
        if lengths:
            body.append("token lengths\n", style="bold")
            body.append(histogram(lengths))
        if not self._still_data(cfg):
            return
        self.data_problems = list(stats.problems)
        t = Text()
        if stats.problems:  # problems first, where they are seen
            t.append(f"{len(stats.problems)} bad record(s)", style="bold red")
            t.append(" — choose 'bad records': skip, or fix the file\n", style="red")
            for p in stats.problems[:5]:
                t.append(f"  {p}\n", style="red")
        t.append("data\n", style="bold")
        t.append(body)
        self.app.call_from_thread(panel.update, t)

    # -- applying a suggestion ------------------------------------------------------------
    def action_apply_fit(self) -> None:
        """Put the next suggestion of the estimate into the form."""
        sugg = (self.estimate or {}).get("suggestions") or []
        if not sugg:
            self.notify("nothing to apply: the run fits" if self.estimate else
                        "no estimate yet")
            return
        text = sugg[self.fit_index % len(sugg)]
        self.fit_index += 1
        changes = suggestion_changes(text)
        for fid, value in changes.items():
            if fid in SWITCHES:
                self.query_one(f"#{fid}", Checkbox).value = True
            elif fid in ("dtype", "quantize"):
                self.query_one(f"#{fid}", Select).value = value
            else:
                self.query_one(f"#{fid}", Input).value = str(value)
        self.notify(f"applied: {text.split(':', 1)[0]}")

    # -- starting ---------------------------------------------------------------------------
    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        try:
            cfg = self.config()
            if not cfg.model or not cfg.data:
                raise LorafitError("choose a model and a data file first")
            problem = weights_problem(cfg.model)
            if problem:
                raise LorafitError(problem)
            run_dir = Path(cfg.output)
            if rundir.is_locked(run_dir):
                pid = rundir.lock_holder(run_dir)
                raise LorafitError(f"{run_dir} is in use by another trainer"
                                   f"{f' (pid {pid})' if pid else ''}; choose another directory")
            if rundir.holds_checkpoints(run_dir):
                raise LorafitError(f"{run_dir} already holds a run; choose another directory")
            problems = check_data(data_records(cfg), cfg.method).problems or self.data_problems
            if cfg.method == "grpo":  # the user's file, as the trainer will import it
                from lorafit.core.rewards import load_reward
                load_reward(cfg.reward)
            if problems and self.query_one("#on_bad_record", Select).value not in ON_BAD_RECORD:
                raise LorafitError(f"the data has {len(problems)} bad record(s) "
                                   f"({problems[0]}): choose 'bad records' skip (drop them) "
                                   "or fail")
            from lorafit.commands.estimate import estimate_for_config
            est = estimate_for_config(cfg, self.budget(), nproc=self.nproc())
        except LorafitError as e:
            self.notify(str(e), severity="error", timeout=15)
            return
        self.estimate = est
        need = shared_need(est, self.nproc()) or est["total"]
        if est["fits"] and need <= est["budget"]:
            self._start(cfg)
            return
        from lorafit.tui.app import ConfirmScreen

        def answer(yes: bool) -> None:
            if yes:
                self._start(dataclasses.replace(cfg, force=True))

        self.app.push_screen(ConfirmScreen(
            f"This run needs about {fmt_bytes(need)} but {est['budget_source']} is "
            f"{fmt_bytes(est['budget'])}; it will likely run out of memory. Start anyway?",
            "Start anyway"), answer)

    def _start(self, cfg) -> None:
        cfg = absolute_paths(cfg)
        run_dir = Path(cfg.output)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = rundir.write_config(run_dir, to_toml(cfg))
        process = start_training(config_path, run_dir, nproc=self.nproc())
        from lorafit.tui.run_screen import RunScreen

        self.app.started.append((process, run_dir))
        self.app.push_screen(RunScreen(run_dir, process,
                                       (self.estimate or {}).get("budget")))

    def action_runs(self) -> None:
        from lorafit.tui.browser import BrowserScreen

        self.app.push_screen(BrowserScreen(self.app.runs_root))


def reward_problem(spec: str) -> str | None:
    """Why the reward field cannot name a GRPO reward function (None when it may): the
    shape file.py:function and an existing file. The file is imported by the trainer only,
    not on every key press."""
    path, sep, name = spec.rpartition(":")
    if not spec:
        return "reward: grpo needs a reward function, file.py:function"
    if not sep or not path or not name.isidentifier():
        return f"reward: {spec!r} is not file.py:function"
    if not Path(path).expanduser().is_file():
        return f"reward: no file {path}"
    return None


def data_records(cfg):
    """The run's training records as the trainer reads them: --columns renamed."""
    from lorafit.core.sources import open_records

    return open_records(cfg.data, split=cfg.data_split, config=cfg.data_config,
                        revision=cfg.data_revision, columns=cfg.columns)


def check_data(path, method: str):
    """The data check without a tokenizer (core/data.py's, or GRPO's prompts): good records
    and the problems, as a DatasetStats. `path`: a --data value or records already opened."""
    from lorafit.core.data import DatasetStats, check_dataset_file

    if method != "grpo":
        return check_dataset_file(path, "skip", method)
    from lorafit.core.grpo_data import scan

    entries = scan(path)
    problems = [f"{w}: {why}" for w, _, why in entries if why]
    if len(problems) == len(entries):
        raise LorafitError(f"{path}: no usable prompts; first problem: {problems[0]}")
    return DatasetStats(format="grpo prompts", records=len(entries) - len(problems),
                        problems=problems)


def shared_need(est: dict, nproc: int) -> int | None:
    """What nproc processes need together where they share one memory: nproc times the
    estimate's per-device total (`est` made for nproc processes: the whole base each in data
    parallel, with --shard the part outside the layers and 1/N of them, core/estimate's
    sharded_base); None for one process or one GPU each."""
    if nproc <= 1 or est.get("device", "").split(":")[0] == "cuda":
        return None
    return nproc * est["total"]


def absolute_paths(cfg):
    """The config with its file paths absolute, so `lorafit train RUN/config.toml` works from
    any folder (a hub id stays as it is)."""
    changes = {"data": str(Path(cfg.data).expanduser().resolve()),
               "output": str(Path(cfg.output).expanduser().resolve())}
    if cfg.val_data:
        changes["val_data"] = str(Path(cfg.val_data).expanduser().resolve())
    if Path(cfg.model).expanduser().exists():
        changes["model"] = str(Path(cfg.model).expanduser().resolve())
    if cfg.reward:  # file.py:function, the file resolved
        path, _, name = cfg.reward.rpartition(":")
        changes["reward"] = f"{Path(path).expanduser().resolve()}:{name}"
    return dataclasses.replace(cfg, **changes)


def start_training(config_path: Path, run_dir: Path, resume: bool = False,
                   nproc: int = 1) -> subprocess.Popen:
    """`lorafit train CONFIG` (or `lorafit train --resume RUN`, with `--nproc N` for N > 1
    processes) as a child in its own session: closing the UI never kills it, and its
    messages go to the run's train.log."""
    log = open(rundir.train_log_path(run_dir), "ab")
    env = dict(os.environ, LORAFIT_NO_REEXEC=os.environ.get("LORAFIT_NO_REEXEC", "0"))
    args = ["--resume", str(run_dir)] if resume else [str(config_path)]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    return subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", *args],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
