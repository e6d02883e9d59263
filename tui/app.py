"""The lorafit terminal app: set up a run, watch it, browse and compare runs.

Training never runs inside the UI: the app starts `lorafit train` as a child process (or
attaches to any run directory) and follows the run's files, so a slow redraw can never
slow a step, and closing the UI leaves the run going unless the user asks otherwise.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import App
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from lorafit.core.control import send_command


class QuitScreen(ModalScreen[str]):
    """Asked on quit while a run this app started is still going. The keys are the run
    screen's: x stops, and nothing else in the dialog shares a letter with it."""

    BINDINGS = [Binding("l", "choose('leave')", "Leave running"),
                Binding("x", "choose('stop')", "Stop them"),
                Binding("escape", "choose('cancel')", "Cancel")]

    def __init__(self, runs: list[Path] | None = None):
        super().__init__()
        self.runs = list(runs or [])

    def compose(self):
        with Vertical(id="quit-dialog", classes="dialog"):
            names = ", ".join(str(r) for r in self.runs) or "a run started here"
            yield Label(f"Still training: {names}.")
            with Horizontal():
                yield Button("Leave running (l)", id="leave", variant="primary")
                yield Button("Stop (x)", id="stop", variant="error")
                yield Button("Cancel (esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id)

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question: y or Enter says yes, n or Esc says no."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n", "answer(False)", "No"),
                Binding("escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes"):
        super().__init__()
        self.question, self.yes = question, yes

    def compose(self):
        with Vertical(id="confirm-dialog", classes="dialog"):
            yield Label(self.question)
            with Horizontal():
                yield Button(f"{self.yes} (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """Every key of the screen below and of the app, with what it does."""

    BINDINGS = [Binding("escape", "dismiss_help", "Close"),
                Binding("question_mark", "dismiss_help", "Close", show=False),
                Binding("q", "dismiss_help", "Close", show=False)]

    def __init__(self, screen_keys: list[tuple[str, str]], app_keys: list[tuple[str, str]],
                 title: str):
        super().__init__()
        self.screen_keys, self.app_keys, self.title_text = screen_keys, app_keys, title

    def compose(self):
        t = Text()
        t.append(f"Keys — {self.title_text}\n", style="bold")
        for key, what in self.screen_keys:
            t.append(f"  {key:<16}", style="bold cyan")
            t.append(f"{what}\n")
        t.append("Everywhere\n", style="bold")
        for key, what in self.app_keys:
            t.append(f"  {key:<16}", style="bold cyan")
            t.append(f"{what}\n")
        t.append("\nEsc closes this help.", style="dim")
        with VerticalScroll(id="help-dialog", classes="dialog"):
            yield Static(t, id="help-text")

    def action_dismiss_help(self) -> None:
        self.dismiss(None)


def _key_name(binding: Binding) -> str:
    key = binding.key_display or binding.key.split(",")[0]
    return {"question_mark": "?", "space": "space", "escape": "esc",
            "enter": "enter"}.get(key, key.replace("ctrl+", "ctrl+"))


def keys_of(bindings) -> list[tuple[str, str]]:
    out = []
    for b in bindings:
        b = b if isinstance(b, Binding) else Binding(*b)
        if b.description:
            out.append((_key_name(b), b.tooltip or b.description))
    return out


class LorafitApp(App):
    CSS_PATH = "app.tcss"
    BINDINGS = [Binding("ctrl+q", "quit_app", "Quit", priority=True),
                Binding("q", "quit_app", "Quit", show=False),
                Binding("question_mark", "help", "Help", key_display="?"),
                Binding("d", "toggle_dark", "Theme", tooltip="switch dark / light")]
    HELP_APP = [("ctrl+q", "quit (asks first while a run started here trains)"),
                ("q", "quit, outside text fields (esc leaves a text field)"),
                ("?", "this help"), ("d", "dark / light theme"),
                ("tab, shift+tab", "next / previous field"),
                ("ctrl+p", "command palette")]

    def __init__(self, watch: str | Path | None = None, runs_root: str | Path = "runs",
                 defaults: dict | None = None):
        super().__init__()
        self.watch_dir = Path(watch) if watch else None
        self.runs_root = Path(runs_root)
        self.defaults = defaults
        self.started: list = []  # (process, run dir) of each trainer this app started

    def on_mount(self) -> None:
        from lorafit.tui.run_screen import RunScreen
        from lorafit.tui.setup_screen import SetupScreen

        self.push_screen(SetupScreen(self.defaults))
        if self.watch_dir is not None:
            self.push_screen(RunScreen(self.watch_dir))

    def action_toggle_dark(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        screen = self.screen
        self.push_screen(HelpScreen(keys_of(getattr(screen, "BINDINGS", [])), self.HELP_APP,
                                    screen.title or type(screen).__name__))

    def running_children(self) -> list:
        return [(p, d) for p, d in self.started if p.poll() is None]

    def action_quit_app(self) -> None:
        if isinstance(self.screen, (QuitScreen, ConfirmScreen)):
            return
        running = self.running_children()
        if not running:
            self.exit()
            return

        def decide(choice: str) -> None:
            if choice == "stop":  # every trainer started here, its screen open or not
                for _, run_dir in running:
                    send_command(run_dir, "stop")
            if choice in ("leave", "stop"):
                self.exit()

        self.push_screen(QuitScreen([d for _, d in running]), decide)
