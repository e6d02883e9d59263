"""The lorafit terminal app: set up a run, watch it, browse and compare runs.

Training never runs inside the UI: the app starts `lorafit train` as a child process (or
attaches to any run directory) and follows the run's files, so a slow redraw can never
slow a step, and closing the UI leaves the run going unless the user asks otherwise.
"""

from __future__ import annotations

from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Button, Label
from textual.containers import Horizontal, Vertical

from lorafit.core.control import send_command


class QuitScreen(ModalScreen[str]):
    """Asked on quit while a run this app started is still going."""

    def compose(self):
        with Vertical(id="quit-dialog"):
            yield Label("A run started here is still training.")
            with Horizontal():
                yield Button("Leave it running (l)", id="leave", variant="primary")
                yield Button("Stop it (s)", id="stop", variant="error")
                yield Button("Cancel (esc)", id="cancel")

    BINDINGS = [("l", "choose('leave')", "Leave running"), ("s", "choose('stop')", "Stop"),
                ("escape", "choose('cancel')", "Cancel")]

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class LorafitApp(App):
    CSS_PATH = "app.tcss"
    BINDINGS = [Binding("q", "quit_app", "Quit"), Binding("d", "toggle_dark", "Dark/light")]

    def __init__(self, watch: str | Path | None = None, runs_root: str | Path = "runs",
                 defaults: dict | None = None):
        super().__init__()
        self.watch_dir = Path(watch) if watch else None
        self.runs_root = Path(runs_root)
        self.defaults = defaults
        self.started = []  # child processes this app started

    def on_mount(self) -> None:
        from lorafit.tui.run_screen import RunScreen
        from lorafit.tui.setup_screen import SetupScreen

        self.push_screen(SetupScreen(self.defaults))
        if self.watch_dir is not None:
            self.push_screen(RunScreen(self.watch_dir))

    def action_toggle_dark(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def running_children(self):
        return [p for p in self.started if p.poll() is None]

    def action_quit_app(self) -> None:
        if not self.running_children():
            self.exit()
            return

        def decide(choice: str) -> None:
            if choice == "stop":
                from lorafit.tui.run_screen import RunScreen
                for screen in self.screen_stack:
                    if isinstance(screen, RunScreen) and screen.process in self.started:
                        send_command(screen.run_dir, "stop")
            if choice in ("leave", "stop"):
                self.exit()

        self.push_screen(QuitScreen(), decide)
