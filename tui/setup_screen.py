"""The set-up screen: a run's settings, with the memory estimate and the data check beside
them, updated as the user types. Start writes the run's config file, the one `lorafit train`
reads."""

from __future__ import annotations

import os
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
from lorafit.core.config import BACKENDS, resolve, to_toml
from lorafit.core.errors import LorafitError
from lorafit.tui.widgets import fmt_bytes, histogram, memory_bar

FIELDS = [  # (id, label, default, TrainConfig field, parser)
    ("model", "model (folder, hub id or preset)", "", "model", str),
    ("data", "data file (.jsonl / .json)", "", "data", str),
    ("output", "run directory", "", "output", str),
    ("rank", "rank", "8", "rank", int),
    ("alpha", "alpha", "16", "alpha", float),
    ("targets", "targets", "q_proj,v_proj", "targets", str),
    ("batch_size", "batch size", "4", "batch_size", int),
    ("seq_len", "sequence length", "512", "seq_len", int),
    ("lr", "learning rate", "1e-4", "lr", float),
    ("max_steps", "max steps (empty: epochs)", "", "max_steps", int),
    ("epochs", "epochs", "1", "epochs", float),
]


class SetupScreen(Screen):
    BINDINGS = [Binding("ctrl+s", "start", "Start"), Binding("ctrl+r", "runs", "Runs")]

    def __init__(self, defaults: dict | None = None):
        super().__init__()
        self.defaults = defaults or {}
        self.estimate: dict | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        with Horizontal(id="setup"):
            with VerticalScroll(id="form"):
                for fid, label, default, _, _ in FIELDS:
                    yield Label(label)
                    yield Input(value=str(self.defaults.get(fid, default)), id=fid)
                yield Label("backend")
                yield Select([(b, b) for b in BACKENDS], value="auto",
                             allow_blank=False, id="backend")
                yield Label("base dtype")
                yield Select([(d, d) for d in ("auto", "fp32", "bf16", "fp16")], value="auto",
                             allow_blank=False, id="dtype")
                yield Checkbox("gradient checkpointing", id="grad_checkpoint")
                yield Button("Start (ctrl+s)", id="start", variant="primary")
            with Vertical(id="panels"):
                yield Static("memory: fill in a model", id="memory-panel")
                yield Static("data: choose a file", id="data-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "lorafit — new run"
        self.schedule_update()

    # -- the form -------------------------------------------------------------------------
    def config(self):
        values = {}
        for fid, label, _, field_name, parse in FIELDS:
            text = self.query_one(f"#{fid}", Input).value.strip()
            if not text:
                continue
            try:
                values[field_name] = parse(text)
            except ValueError:
                raise LorafitError(f"{label}: {text!r} is not a valid value") from None
        values["backend"] = self.query_one("#backend", Select).value
        dtype = self.query_one("#dtype", Select).value
        if dtype != "auto":
            values["dtype"] = dtype
        values["grad_checkpoint"] = self.query_one("#grad_checkpoint", Checkbox).value
        if not values.get("output"):
            values["output"] = str(Path("runs") / time.strftime("run-%Y%m%d-%H%M%S"))
        return resolve(None, values)

    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def schedule_update(self, event=None) -> None:
        if getattr(self, "_timer", None):
            self._timer.stop()
        self._timer = self.set_timer(0.3, self.update_panels)

    def update_panels(self) -> None:
        try:
            cfg = self.config()
        except LorafitError as e:
            self.query_one("#memory-panel", Static).update(Text(str(e), style="red"))
            return
        self._update_memory(cfg)
        self._update_data(cfg)

    @work(thread=True, exclusive=True, group="memory")
    def _update_memory(self, cfg) -> None:
        if not cfg.model:
            return
        from lorafit.commands.estimate import estimate_for_config

        try:
            est = estimate_for_config(cfg)
        except LorafitError as e:
            self.app.call_from_thread(self.query_one("#memory-panel", Static).update,
                                      Text(f"memory: {e}", style="red"))
            return
        self.estimate = est
        t = Text("memory estimate\n", style="bold")
        t.append(f"{est['backend']} on {est['device']}, {est['model_source']}\n", style="dim")
        t.append(memory_bar([(k, v) for k, v in est["breakdown"].items() if v],
                            est["budget"], width=36))
        t.append(f"total {fmt_bytes(est['total'])} of {fmt_bytes(est['budget'])} "
                 f"({est['budget_source']})\n")
        if est["fits"]:
            t.append("fits\n", style="bold green")
        else:
            t.append("does NOT fit; what would:\n", style="bold red")
            for s in est["suggestions"]:
                t.append(f"  {s}\n")
        self.app.call_from_thread(self.query_one("#memory-panel", Static).update, t)

    @work(thread=True, exclusive=True, group="data")
    def _update_data(self, cfg) -> None:
        if not cfg.data:
            return
        from lorafit.core.data import check_dataset_file, load_dataset

        panel = self.query_one("#data-panel", Static)
        try:
            stats = check_dataset_file(cfg.data, "skip")
        except LorafitError as e:
            self.app.call_from_thread(panel.update, Text(f"data: {e}", style="red"))
            return
        t = Text("data\n", style="bold")
        t.append(f"{stats.records} records, format {stats.format}\n")
        lengths = []
        if cfg.model and Path(cfg.model).is_dir():
            try:
                from lorafit.models.loader import load_tokenizer

                examples, tstats = load_dataset(cfg.data, load_tokenizer(cfg.model),
                                                cfg.seq_len, "skip")
                lengths = [e.input_ids.size for e in examples]
                t.append(f"{tstats.examples} examples, {tstats.truncated} truncated to "
                         f"{cfg.seq_len} tokens\n")
                stats.problems = tstats.problems
            except LorafitError as e:
                t.append(f"{e}\n", style="red")
        if lengths:
            t.append("token lengths\n", style="bold")
            t.append(histogram(lengths))
        if stats.problems:
            t.append(f"{len(stats.problems)} bad record(s):\n", style="bold red")
            for p in stats.problems[:5]:
                t.append(f"  {p}\n", style="red")
        self.app.call_from_thread(panel.update, t)

    # -- starting ---------------------------------------------------------------------------
    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        try:
            cfg = self.config()
            if not cfg.model or not cfg.data:
                raise LorafitError("choose a model and a data file first")
            run_dir = Path(cfg.output)
            if rundir.is_locked(run_dir):
                pid = rundir.lock_holder(run_dir)
                raise LorafitError(f"{run_dir} is in use by another trainer"
                                   f"{f' (pid {pid})' if pid else ''}; choose another directory")
            if rundir.holds_checkpoints(run_dir):
                raise LorafitError(f"{run_dir} already holds a run; choose another directory")
        except LorafitError as e:
            self.notify(str(e), severity="error")
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = rundir.write_config(run_dir, to_toml(cfg))
        process = start_training(config_path, run_dir)
        from lorafit.tui.run_screen import RunScreen

        self.app.started.append(process)
        self.app.push_screen(RunScreen(run_dir, process,
                                       (self.estimate or {}).get("budget")))

    def action_runs(self) -> None:
        from lorafit.tui.browser import BrowserScreen

        self.app.push_screen(BrowserScreen(self.app.runs_root))


def start_training(config_path: Path, run_dir: Path) -> subprocess.Popen:
    """`lorafit train CONFIG` as a child in its own session: closing the UI never kills
    it, and its messages go to the run's train.log."""
    log = open(rundir.train_log_path(run_dir), "ab")
    env = dict(os.environ, LORAFIT_NO_REEXEC=os.environ.get("LORAFIT_NO_REEXEC", "0"))
    return subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", str(config_path)],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
