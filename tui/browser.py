"""The run browser: every run directory under a root, newest first; Enter (or a click)
opens one, Space marks runs, c compares the loss curves of the marked runs."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from lorafit.core import rundir
from lorafit.tui.runfiles import RunFollower, list_runs, run_summary
from lorafit.tui.widgets import plot_lines

COLORS = ["cyan", "magenta", "green", "yellow", "blue", "red"]


class RunsTable(DataTable):
    """A click on any cell of a row opens that run (DataTable alone only selects on a
    second click on the cursor cell)."""

    async def _on_click(self, event) -> None:
        meta = event.style.meta
        row, col = meta.get("row", -1), meta.get("column", -1)
        already = (row, col) == tuple(self.cursor_coordinate)
        await super()._on_click(event)
        if row >= 0 and col >= 0 and not already and not meta.get("out_of_bounds"):
            self._post_selected_message()


class BrowserScreen(Screen):
    BINDINGS = [Binding("enter", "open", "Open"), Binding("space", "mark", "Mark"),
                Binding("c", "compare", "Compare", tooltip="plot the marked runs' smoothed "
                        "losses together"),
                Binding("r", "reload", "Reload", show=False),  # in the help, not the footer
                Binding("u", "resume", "Resume"),
                Binding("escape", "back", "Back")]

    def __init__(self, root: str | Path):
        super().__init__()
        self.root = Path(root)
        self.runs: list[Path] = []
        self.marked: set[Path] = set()
        self.comparing = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunsTable(id="runs", cursor_type="row")
        yield Static(id="compare")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.title = f"lorafit — runs in {self.root}"
        table = self.query_one(DataTable)
        self.mark_col, *_ = table.add_columns(" ", "run", "state", "step", "last loss")
        self.action_reload()
        table.focus()

    def on_screen_resume(self) -> None:
        if self.is_mounted and self.runs:
            self.action_reload()

    def action_reload(self) -> None:
        table = self.query_one(DataTable)
        keep = self._current()
        table.clear()
        self.runs = list_runs(self.root)
        for run in self.runs:  # status files only: a long run's metrics are never read
            summary = run_summary(run)
            loss = f"{summary['loss']:.4f}" if isinstance(summary["loss"], (int, float)) \
                else "-"
            state = summary["state"]
            style = {"failed": "red", "died": "bold red", "running": "green",
                     "paused": "yellow", "stopped": "yellow", "completed": "cyan"}.get(state, "")
            table.add_row("*" if run in self.marked else " ",
                          str(run.relative_to(self.root)) if run.is_relative_to(self.root)
                          else str(run), Text(state, style=style) if style else state,
                          f"{summary['step']}/{summary['total_steps']}", loss, key=str(run))
        if keep in self.runs:
            table.move_cursor(row=self.runs.index(keep))
        if self.comparing:
            self.action_compare()

    def _current(self) -> Path | None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        return self.runs[row] if table.row_count and 0 <= row < len(self.runs) else None

    def action_open(self) -> None:
        from lorafit.tui.run_screen import RunScreen

        run = self._current()
        if run is not None:
            self.app.push_screen(RunScreen(run))

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on the table, or a click on the row under the cursor."""
        event.stop()
        self.action_open()

    def action_resume(self) -> None:
        """Continue a stopped, failed or died run from its newest checkpoint: `lorafit
        train --resume RUN` (with its number of processes) as a child of this app (what
        the quit dialog can stop)."""
        from lorafit.tui.run_screen import RunScreen
        from lorafit.tui.setup_screen import start_training

        run = self._current()
        if run is None:
            return
        summary = run_summary(run)
        state = summary["state"]
        if state in ("starting", "running", "paused") or rundir.is_locked(run):
            self.notify(f"{run.name} is {state}: open it with Enter", severity="warning")
            return
        if state == "completed":
            self.notify(f"{run.name} is completed; start a new run to train further",
                        severity="warning")
            return
        if not rundir.config_path(run).is_file():
            self.notify(f"{run.name} has no {rundir.config_path(run).name} to resume from",
                        severity="error")
            return
        # as many processes as before (the global batch stays the same either way)
        nproc = int(rundir.read_status(run).get("world_size") or 1)
        process = start_training(rundir.config_path(run), run, resume=True, nproc=nproc)
        self.app.started.append((process, run))
        self.notify(f"resuming {run.name} from its newest checkpoint")
        self.app.push_screen(RunScreen(run, process))

    def action_mark(self) -> None:
        """Toggle the mark of the run under the cursor; the cursor stays on it."""
        run = self._current()
        if run is None:
            return
        self.marked ^= {run}
        table = self.query_one(DataTable)
        table.update_cell(str(run), self.mark_col, "*" if run in self.marked else " ")

    def action_compare(self) -> None:
        self.comparing = True
        runs = sorted(self.marked) or self.runs[:3]
        series, legend = [], Text()
        for i, run in enumerate(runs):
            f = RunFollower(run)
            f.poll()
            color = COLORS[i % len(COLORS)]
            series.append((f.state.smoothed.xs, f.state.smoothed.ys, color, "line"))
            legend.append(f"■ {run.name}  ", style=color)
        lines = plot_lines(series, max(self.size.width - 2, 30), 8)
        self.query_one("#compare", Static).update(Text("\n").join([legend] + lines))

    def on_resize(self) -> None:
        if self.comparing:
            self.call_after_refresh(self.action_compare)

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
