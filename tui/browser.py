"""The run browser: every run directory under a root, newest first; Enter opens one,
c compares the loss curves of the marked runs."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from lorafit.tui.runfiles import RunFollower, find_runs, read_status
from lorafit.tui.widgets import plot_lines, smooth

COLORS = ["cyan", "magenta", "green", "yellow", "blue", "red"]


class BrowserScreen(Screen):
    BINDINGS = [Binding("enter", "open", "Open"), Binding("space", "mark", "Mark"),
                Binding("c", "compare", "Compare marked"), Binding("r", "reload", "Reload"),
                Binding("escape", "back", "Back")]

    def __init__(self, root: str | Path):
        super().__init__()
        self.root = Path(root)
        self.runs: list[Path] = []
        self.marked: set[Path] = set()

    def compose(self) -> ComposeResult:
        yield Header()
        yield DataTable(id="runs", cursor_type="row")
        yield Static(id="compare")
        yield Footer()

    def on_mount(self) -> None:
        self.title = f"lorafit — runs in {self.root}"
        table = self.query_one(DataTable)
        table.add_columns(" ", "run", "state", "step", "last loss")
        self.action_reload()

    def action_reload(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        self.runs = find_runs(self.root)
        for run in self.runs:
            f = RunFollower(run)
            f.poll()
            st = f.state
            loss = f"{st.losses[-1]:.4f}" if st.losses else "-"
            table.add_row("*" if run in self.marked else " ", str(run.relative_to(self.root))
                          if run.is_relative_to(self.root) else str(run),
                          st.state or "?",
                          f"{st.last.get('step', 0)}/{st.total_steps}", loss)

    def _current(self) -> Path | None:
        row = self.query_one(DataTable).cursor_row
        return self.runs[row] if 0 <= row < len(self.runs) else None

    def action_open(self) -> None:
        from lorafit.tui.run_screen import RunScreen

        run = self._current()
        if run is not None:
            self.app.push_screen(RunScreen(run))

    def action_mark(self) -> None:
        run = self._current()
        if run is not None:
            self.marked ^= {run}
            self.action_reload()

    def action_compare(self) -> None:
        runs = sorted(self.marked) or self.runs[:3]
        series, legend = [], Text()
        for i, run in enumerate(runs):
            f = RunFollower(run)
            f.poll()
            color = COLORS[i % len(COLORS)]
            series.append((f.state.steps, smooth(f.state.losses), color))
            legend.append(f"■ {run.name}  ", style=color)
        lines = plot_lines(series, max(self.size.width - 2, 30), 8)
        self.query_one("#compare", Static).update(Text("\n").join([legend] + lines))

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
