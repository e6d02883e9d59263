"""The run screen: live loss, throughput, memory and events of one run directory, with
pause / resume / save / stop and a "try it" panel. Works for any run directory: one this
UI started, one started headless elsewhere, or a finished one."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, ProgressBar, RichLog, Static

from lorafit.core import rundir
from lorafit.core.control import send_command
from lorafit.core.launch import rank_pids
from lorafit.tui.runfiles import RunFollower, log_tail, newest_checkpoint, run_state
from lorafit.tui.sysinfo import Usage, UsageSampler, usage_text
from lorafit.tui.widgets import LossPlot, fmt_bytes, memory_bar

REFRESH_S = 0.25  # at most 4 redraws a second, whatever the trainer's pace
USAGE_S = 2.0  # CPU/GPU utilisation is sampled this often (nvidia-smi is not free)


def _fmt_time(s) -> str:
    s = int(max(s or 0, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60:02d}:{s % 60:02d}"


def peak_words(source: str) -> tuple[str, str]:
    """(label, meaning) of a step report's memory_peak, from the backend's memory source
    (RunStarted.memory_source): on a CPU it is the whole process's resident memory, far more
    than the tensors of a small model, so it must not read as the tensors' peak."""
    if source.startswith("process RSS"):
        return "process", "whole trainer at its peak (RSS): Python, framework, weights"
    if "current only" in source:
        return "now", "tensors allocated at the newest step"
    if source:
        return "peak", f"{source}'s high-water mark"
    return "peak", "the highest the trainer reported"


class SettingsRow(Static):
    """The run's settings in one row, whole at any width: labelled where there is room,
    else the values that speak for themselves (model, data, dtype, backend) without their
    labels and long names shortened, so the backend/device at the end is never cut."""

    UNLABELLED = ("model", "data", "dtype", "on")

    def __init__(self, **kw):
        super().__init__("", **kw)
        self.parts: list[tuple[str, str]] = []

    def show(self, parts: list[tuple[str, str]]) -> None:
        self.parts = parts
        self.refresh()

    def render(self) -> Text:
        width = self.size.width or 10**6
        text = self._line(labels=True, longest=10**6)
        for longest in (10**6, 24, 16, 10):
            if text.cell_len <= width:
                break
            text = self._line(labels=False, longest=longest)
        return text

    def _line(self, labels: bool, longest: int) -> Text:
        t = Text()
        for i, (k, v) in enumerate(self.parts):
            v = str(v)
            t.append("  " if i else " ")
            if labels or k not in self.UNLABELLED:
                t.append(f"{k} ", style="dim")
            elif k in ("model", "data") and len(v) > longest:
                v = v[:longest - 1] + "…"
            t.append(v, style="bold")
        return t


class RunScreen(Screen):
    BINDINGS = [
        Binding("p", "pause", "Pause", tooltip="pause / resume the trainer after this step"),
        Binding("s", "save", "Save", tooltip="save a checkpoint after this step"),
        Binding("x", "stop", "Stop", tooltip="stop the run (asks first; the trainer saves "
                "and exits)"),
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
        self.died_shown = False
        self.sampler = UsageSampler()
        self.usage = Usage()

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        with Horizontal(id="run-top"):
            yield LossPlot(id="plot")
            with VerticalScroll(id="side-box"):  # scrolls where the screen is short
                yield Static(id="side")
        yield SettingsRow(id="settings")
        with Horizontal(id="progress-row"):  # the bar, with the trainer's own ETA
            yield ProgressBar(id="progress", show_eta=False)
            yield Static("", id="eta")
        with Horizontal(id="run-bottom"):
            yield RichLog(id="events", max_lines=500, wrap=True)
            with Vertical(id="try-panel"):
                yield Input(placeholder="a prompt; Enter generates, Esc closes", id="prompt")
                with VerticalScroll(id="try-scroll"):
                    yield Static("", id="try-out")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = f"lorafit — {self.run_dir}"
        self.query_one("#try-panel").display = False
        self.usage = self.sampler.sample(self._trainer_pids())
        self.refresh_view()
        self.set_interval(REFRESH_S, self.refresh_view)
        self.set_interval(USAGE_S, self._sample_usage)

    def _trainer_pids(self) -> list[int]:
        """The trainer's process, or with several processes each rank's (RUN/ranks/)."""
        if self.follower.state.world_size > 1 and self._run_active():
            pids = list(rank_pids(self.run_dir).values())
            if pids:
                return pids
        if self.process is not None:
            return [self.process.pid]
        pid = self.follower.state.status.get("pid") if self._run_active() else None
        return [pid] if pid else []

    @work(thread=True, exclusive=True, group="usage")
    def _sample_usage(self) -> None:
        usage = self.sampler.sample(self._trainer_pids())
        self.app.call_from_thread(self._show_usage, usage)

    def _show_usage(self, usage: Usage) -> None:
        if usage != self.usage:
            self.usage = usage
            self.query_one("#side", Static).update(self._stats_text() + self._memory_text())

    # -- following the files ----------------------------------------------------------------
    def refresh_view(self) -> None:
        changed = self.follower.poll()
        self._check_process()
        if not self.died_shown and self._check_died():
            return
        if not changed:
            return
        st = self.follower.state
        self.query_one(SettingsRow).show(self._settings())
        self.query_one(LossPlot).update_state(st)
        self.query_one("#side", Static).update(self._stats_text() + self._memory_text())
        bar = self.query_one(ProgressBar)
        bar.update(total=max(st.total_steps, 1), progress=st.last.get("step", 0))
        self.query_one("#eta", Static).update(self._eta_text())
        log = self.query_one(RichLog)
        for line in st.log[self.logged:]:
            log.write(line)
        self.logged = len(st.log)
        if st.status.get("state") == "failed" and not self.crash_shown:
            self._show_crash(st.status.get("error") or "the run failed")

    def state(self) -> str:
        """status.json's state, or 'died' when its trainer is gone without a word."""
        return run_state(self.run_dir, self.follower.state.status)

    def _check_died(self) -> bool:
        if self.state() != "died":
            return False
        if not self.died_shown:
            self.died_shown = True
            log = self.query_one(RichLog)
            log.write(Text("the trainer died (its process is gone; killed, e.g. out of "
                           "memory?) — last lines of its log:", style="bold red"))
            for line in log_tail(self.run_dir, 5):
                log.write(Text(line, style="red"))
            self.query_one("#side", Static).update(self._stats_text() + self._memory_text())
            self.query_one("#eta", Static).update(self._eta_text())
            self.notify("the trainer died; see the event log", title="run died",
                        severity="error", timeout=30)
        return True

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
        last, state = st.last, self.state()
        t = Text()
        style = {"running": "green", "paused": "yellow", "failed": "bold red",
                 "died": "bold red", "completed": "cyan", "stopped": "yellow"}.get(state, "")
        t.append(f"{state:<13}", style=style)
        t.append(f"step {last.get('step', 0)}/{st.total_steps}\n")
        if last:
            t.append(f"{'loss ' + format(last['loss'], '.4f'):<13}")
            t.append(f"val {st.val_losses[-1]:.4f}\n" if st.val_losses else "\n")
            eta = _fmt_time(last.get("eta_s")) if state in ("running", "paused") else "-"
            t.append(f"{'lr ' + format(last['lr'], '.2e'):<13}eta {eta}\n")
            t.append(f"{format(last['tokens_per_s'], ',.0f') + ' tok/s':<13}"
                     f"{last['step_time']:.3f} s/step\n")
            if last.get("reward_margin") is not None:  # preference tuning
                t.append(f"{'margin ' + format(last['reward_margin'], '.3f'):<13}")
                acc = last.get("reward_accuracy")
                t.append(f"acc {acc:.2f}\n" if acc is not None else "\n")
                if last.get("reward_chosen") is not None:
                    t.append(f"chosen {last['reward_chosen']:+.3f} rejected "
                             f"{last.get('reward_rejected') or 0:+.3f}\n", style="dim")
        if st.world_size > 1:
            t.append(f"{st.world_size} processes", style="bold")
            t.append(" (data parallel)\n", style="dim")
        usage = usage_text(self.usage)
        if usage:
            t.append(usage + "\n", style="dim")
        return t

    def _eta_text(self) -> Text:
        """Beside the progress bar: the trainer's ETA while it runs, else the run's state."""
        state, last = self.state(), self.follower.state.last
        if state in ("running", "paused") and last:
            return Text(f"eta {_fmt_time(last.get('eta_s'))}")
        return Text(state, style="bold red" if state in ("failed", "died") else "dim")

    def _settings(self) -> list[tuple[str, str]]:
        """The run's settings: model, data, rank, lr, batch, dtype, backend/device."""
        cfg = self.follower.state.start.get("config") or {}
        st = self.follower.state.start
        if not cfg:
            return []
        return [("model", Path(str(cfg.get("model", "?"))).name or cfg.get("model")),
                ("data", Path(str(cfg.get("data", ""))).name or "-"),
                ("rank", cfg.get("rank", "-")), ("lr", cfg.get("lr", "-")),
                ("batch", cfg.get("batch_size", "-")), ("dtype", cfg.get("dtype") or "auto"),
                ("on", f"{st.get('backend', cfg.get('backend', '?'))}/"
                       f"{st.get('device', '?')}")]

    def _memory_text(self) -> Text:
        st = self.follower.state
        est = (st.start.get("estimate") or {})
        t = Text()
        t.append("memory", style="bold")
        if est.get("budget"):
            t.append(f" of {fmt_bytes(est['budget'])}", style="dim")
        t.append("\n")
        measured = st.memory.get("measured")
        if est.get("total"):
            t.append(f"estimate  {fmt_bytes(est.get('total'))}\n")
        if measured:
            t.append(f"measured  {fmt_bytes(measured)}")
            same = st.memory.get("estimated_this_batch")
            if same:
                t.append(f" ({100 * (same - measured) / measured:+.1f}% est)", style="dim")
            t.append(f"\n tensors' peak of full step {st.memory.get('step', '?')}\n",
                     style="dim")
        peaks = st.memory.get("rank_peaks")
        if peaks:
            t.append("per rank  " + ", ".join(fmt_bytes(p) for p in peaks) + "\n")
        if st.last.get("memory_peak"):
            label, meaning = peak_words(st.start.get("memory_source", ""))
            t.append(f"{label:<9} {fmt_bytes(st.last['memory_peak'])}\n")
            t.append(f" {meaning}\n", style="dim")
        if est.get("breakdown"):
            parts = [(k, v) for k, v in est["breakdown"].items() if v]
            t.append(memory_bar(parts, est.get("budget"), width=27))
        return t

    # -- controls ---------------------------------------------------------------------------
    def check_action(self, action: str, parameters) -> bool | None:
        """While the prompt has focus, letters are text: no run key fires (nor shows)."""
        if action in ("pause", "save", "stop", "try_it") and \
                isinstance(self.focused, Input):
            return False
        return True

    def _run_active(self) -> bool:
        return self.follower.state.active and self.state() != "died"

    def _try_open(self) -> bool:
        return bool(self.query_one("#try-panel").display)

    def action_pause(self) -> None:
        if not self._run_active():
            self.notify(f"the run is not running ({self.state()})")
            return
        paused = self.follower.state.status.get("state") == "paused"
        send_command(self.run_dir, "resume" if paused else "pause")
        self.notify("resuming" if paused else "pausing after this step")

    def action_save(self) -> None:
        if self._run_active():
            send_command(self.run_dir, "save")
            self.notify("saving a checkpoint after this step")

    def action_stop(self) -> None:
        """Asks first; the trainer saves a checkpoint and exits after this step."""
        if not self._run_active():
            self.notify(f"the run is not running ({self.state()})")
            return
        from lorafit.tui.app import ConfirmScreen

        def answer(yes: bool) -> None:
            if yes:
                send_command(self.run_dir, "stop")
                self.notify("stopping: the trainer saves and exits after this step")

        self.app.push_screen(ConfirmScreen(f"Stop {self.run_dir.name}? The trainer saves a "
                                           "checkpoint and exits.", "Stop"), answer)

    def action_back(self) -> None:
        if self._try_open():  # Esc closes the try-it box first
            self.action_try_it()
            return
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()

    def action_try_it(self) -> None:
        panel = self.query_one("#try-panel")
        panel.display = not panel.display
        self.set_class(bool(panel.display), "trying")
        if panel.display:
            self.query_one("#prompt", Input).focus()
        else:
            self.query_one("#events").focus()

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
            self.app.call_from_thread(self.show_answers, base, ckpt.name, tuned)
        except (LorafitError, KeyError) as e:
            self.app.call_from_thread(self.query_one("#try-out", Static).update,
                                      Text(f"cannot generate: {e}", style="red"))

    def show_answers(self, base: str, name: str, tuned: str) -> None:
        """The base model's and the checkpoint's answers, one under the other."""
        text = Text()
        text.append("base model\n", style="bold")
        text.append(base.strip() + "\n\n")
        text.append(f"fine-tuned ({name})\n", style="bold cyan")
        text.append(tuned.strip())
        self.query_one("#try-out", Static).update(text)
