"""The run screen: live loss, throughput, memory and events of one run directory, with
pause / resume / save / stop and a "try it" panel. Works for any run directory: one this
UI started, one started headless elsewhere, or a finished one."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, ProgressBar, RichLog, Static

from lorafit.core import rundir
from lorafit.core.control import send_command
from lorafit.tui.runfiles import RunFollower, newest_checkpoint
from lorafit.tui.widgets import LossPlot, fmt_bytes, memory_bar

REFRESH_S = 0.25  # at most 4 redraws a second, whatever the trainer's pace


def _fmt_time(s) -> str:
    s = int(max(s or 0, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60:02d}:{s % 60:02d}"


class RunScreen(Screen):
    BINDINGS = [
        Binding("p", "pause", "Pause/resume"),
        Binding("s", "save", "Save now"),
        Binding("x", "stop", "Stop"),
        Binding("t", "try_it", "Try it"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, run_dir: str | Path, process: subprocess.Popen | None = None,
                 capacity: int | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.process = process
        self.capacity = capacity
        self.follower = RunFollower(self.run_dir)
        self.logged = 0
        self.crash_shown = False

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        with Horizontal(id="run-top"):
            yield LossPlot(id="plot")
            yield Static(id="side")
        yield ProgressBar(id="progress", show_eta=False)
        with Horizontal(id="run-bottom"):
            yield RichLog(id="events", max_lines=500, wrap=True)
            with Vertical(id="try-panel"):
                yield Input(placeholder="prompt to try (t), Enter to generate", id="prompt")
                yield Static("", id="try-out")
        yield Footer()

    def on_mount(self) -> None:
        self.title = f"lorafit — {self.run_dir}"
        self.query_one("#try-panel").display = False
        self.refresh_view()
        self.set_interval(REFRESH_S, self.refresh_view)

    # -- following the files ----------------------------------------------------------------
    def refresh_view(self) -> None:
        changed = self.follower.poll()
        self._check_process()
        if not changed:
            return
        st = self.follower.state
        self.query_one(LossPlot).update_series(st.steps, st.losses, st.val_steps, st.val_losses)
        self.query_one("#side", Static).update(self._stats_text() + self._memory_text())
        bar = self.query_one(ProgressBar)
        bar.update(total=max(st.total_steps, 1), progress=st.last.get("step", 0))
        log = self.query_one(RichLog)
        for line in st.log[self.logged:]:
            log.write(line)
        self.logged = len(st.log)
        if st.status.get("state") == "failed" and not self.crash_shown:
            self._show_crash(st.status.get("error") or "the run failed")

    def _check_process(self) -> None:
        if self.process is None or self.crash_shown:
            return
        code = self.process.poll()
        if code not in (None, 0):
            tail = ""
            log = rundir.train_log_path(self.run_dir)
            if log.exists():
                lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
                tail = lines[-1] if lines else ""
            self._show_crash(tail or f"the trainer exited with status {code}")

    def _show_crash(self, message: str) -> None:
        self.crash_shown = True
        message = message.removeprefix("error: ")
        self.query_one(RichLog).write(Text(f"error: {message}", style="bold red"))
        self.notify(message, title="run failed", severity="error", timeout=30)

    def _stats_text(self) -> Text:
        st = self.follower.state
        last, state = st.last, st.status.get("state", "?")
        t = Text()
        style = {"running": "green", "paused": "yellow", "failed": "bold red",
                 "completed": "cyan", "stopped": "yellow"}.get(state, "")
        t.append(f"{state}\n", style=style)
        t.append(f"step      {last.get('step', 0)}/{st.total_steps}\n")
        if last:
            t.append(f"loss      {last['loss']:.4f}\n")
            if st.val_losses:
                t.append(f"val loss  {st.val_losses[-1]:.4f}\n")
            t.append(f"lr        {last['lr']:.2e}\n")
            t.append(f"tokens/s  {last['tokens_per_s']:,.0f}\n")
            t.append(f"step time {last['step_time']:.3f}s\n")
            t.append(f"eta       {_fmt_time(last.get('eta_s'))}\n")
        return t

    def _memory_text(self) -> Text:
        st = self.follower.state
        est = (st.start.get("estimate") or {})
        t = Text("memory\n", style="bold")
        measured = st.memory.get("measured")
        if est.get("breakdown"):
            parts = [(k, v) for k, v in est["breakdown"].items() if v]
            t.append(memory_bar(parts, est.get("budget"), width=30))
            t.append(f"estimate  {fmt_bytes(est.get('total'))}\n")
        if measured:
            t.append(f"measured  {fmt_bytes(measured)}\n")
            same = st.memory.get("estimated_this_batch")
            if same:
                t.append(f"estimated {fmt_bytes(same)} for that batch "
                         f"({100 * (same - measured) / measured:+.1f}%)\n")
        if st.last.get("memory_peak"):
            t.append(f"peak now  {fmt_bytes(st.last['memory_peak'])}\n")
        if est.get("budget"):
            t.append(f"capacity  {fmt_bytes(est['budget'])}\n")
        return t

    # -- controls ---------------------------------------------------------------------------
    def _run_active(self) -> bool:
        return self.follower.state.active

    def action_pause(self) -> None:
        if not self._run_active():
            self.notify("the run is not running")
            return
        paused = self.follower.state.status.get("state") == "paused"
        send_command(self.run_dir, "resume" if paused else "pause")
        self.notify("resuming" if paused else "pausing after this step")

    def action_save(self) -> None:
        if self._run_active():
            send_command(self.run_dir, "save")
            self.notify("saving a checkpoint after this step")

    def action_stop(self) -> None:
        if self._run_active():
            send_command(self.run_dir, "stop")
            self.notify("stopping: the trainer saves and exits after this step")

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()

    def action_try_it(self) -> None:
        panel = self.query_one("#try-panel")
        panel.display = not panel.display
        if panel.display:
            self.query_one("#prompt", Input).focus()

    @on(Input.Submitted, "#prompt")
    def generate(self, event: Input.Submitted) -> None:
        ckpt = newest_checkpoint(self.run_dir)
        if ckpt is None:
            self.query_one("#try-out", Static).update("no checkpoint saved yet (press s)")
            return
        self.query_one("#try-out", Static).update(f"generating with {ckpt.name}...")
        self._generate(event.value, ckpt)

    @work(thread=True, exclusive=True)
    def _generate(self, prompt: str, ckpt: Path) -> None:
        from lorafit.commands.common import attach_adapter, load_model_with_adapter
        from lorafit.core.errors import LorafitError
        from lorafit.core.generate import generate_text

        try:
            cfg = self.follower.state.start.get("config", {})
            model = load_model_with_adapter(
                cfg["model"], None, "torch" if cfg.get("backend") != "mlx" else "mlx", "cpu")
            base = generate_text(model, prompt, 32)
            attach_adapter(model, ckpt)
            tuned = generate_text(model, prompt, 32)
            text = Text()
            text.append("base:    ", style="bold")
            text.append(base + "\n")
            text.append(f"{ckpt.name}: ", style="bold cyan")
            text.append(tuned)
        except (LorafitError, KeyError) as e:
            text = Text(f"cannot generate: {e}", style="red")
        self.app.call_from_thread(self.query_one("#try-out", Static).update, text)
