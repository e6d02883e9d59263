"""The terminal UI used as a person would (issue 17): each test drives the app with
Textual's Pilot through one action that used to be broken."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lorafit.core import rundir
from lorafit.core.errors import LorafitError
from lorafit.tui.app import ConfirmScreen, HelpScreen, LorafitApp, QuitScreen
from lorafit.tui.browser import BrowserScreen
from lorafit.tui.run_screen import RunScreen
from lorafit.tui.setup_screen import SetupScreen
from test_tui import (fill, fixed_runs, log_text, panel_text, tiny_run_inputs,  # noqa: F401
                      wait_for, write_run)

SIZE = (80, 24)


def run(coro):
    asyncio.run(coro)


class FakeProcess:
    """Stands in for a trainer child: running until told otherwise."""

    def __init__(self):
        self.code = None
        self.pid = 999999

    def poll(self):
        return self.code


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def table_names(screen):
    from textual.widgets import DataTable
    table = screen.query_one(DataTable)
    return [table.get_row_at(i)[1] for i in range(table.row_count)]


# -- 1. the runs list ---------------------------------------------------------------------
def test_runs_list_enter_and_click_open_the_run(fixed_runs):
    async def scenario():
        app = LorafitApp(runs_root=fixed_runs)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("escape", "ctrl+r")
            await pilot.pause(0.3)
            assert isinstance(app.screen, BrowserScreen)
            await pilot.press("down", "enter")
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen) and app.screen.run_dir.name == "lr-3e-3"
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert isinstance(app.screen, BrowserScreen)
            await pilot.press("up")
            await pilot.pause(0.1)
            await pilot.click("#runs", offset=(10, 1))  # the first row, under the cursor
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen) and app.screen.run_dir.name == "lr-1e-3"
    run(scenario())


def test_runs_list_marking_keeps_the_cursor(fixed_runs):
    async def scenario():
        from textual.widgets import DataTable
        app = LorafitApp(runs_root=fixed_runs)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("escape", "ctrl+r")
            await pilot.pause(0.3)
            screen = app.screen
            await pilot.press("space")  # mark the first run; the cursor stays on it
            await pilot.press("down", "space")  # and the second one
            await pilot.pause(0.2)
            assert screen.query_one(DataTable).cursor_row == 1
            assert screen.marked == {fixed_runs / "lr-1e-3", fixed_runs / "lr-3e-3"}
            await pilot.press("space")  # unmark the second
            await pilot.pause(0.1)
            assert screen.marked == {fixed_runs / "lr-1e-3"}
    run(scenario())


def test_runs_list_shows_failed_runs_and_runs_root_is_used(fixed_runs):
    failed = fixed_runs / "failed-early"
    failed.mkdir()
    rundir.write_config(failed, 'model = "x"\n')
    rundir.train_log_path(failed).write_text("error: no such folder\n")

    async def scenario():
        app = LorafitApp(runs_root=fixed_runs)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("escape", "ctrl+r")
            await pilot.pause(0.3)
            names = table_names(app.screen)
            assert "failed-early" in names
            from textual.widgets import DataTable
            table = app.screen.query_one(DataTable)
            assert str(table.get_row_at(names.index("failed-early"))[2]) == "failed"
            await pilot.press("escape")
            cfg = app.screen.config()  # a new run goes under --runs, not ./runs
            assert Path(cfg.output).parent == fixed_runs
    run(scenario())


# -- 2. quitting -------------------------------------------------------------------------
def test_quit_stop_reaches_runs_whose_screen_is_closed(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()

    async def scenario():
        app = LorafitApp(runs_root=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            app.started.append((FakeProcess(), run_dir))  # started here, screen closed
            await pilot.press("ctrl+q")  # asks, from a text field too
            await pilot.pause(0.2)
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("x")
            await pilot.pause(0.2)
        assert rundir.read_control(run_dir).get("command") == "stop"
    run(scenario())


def test_q_from_a_text_field_and_ctrl_q_ask_first(tmp_path):
    async def scenario():
        from textual.widgets import Input
        app = LorafitApp(runs_root=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            app.started.append((FakeProcess(), tmp_path / "r"))
            assert isinstance(app.focused, Input)
            await pilot.press("q")  # in a text field q is a letter...
            assert app.focused.value == "q" and not isinstance(app.screen, QuitScreen)
            await pilot.press("escape", "q")  # ...Esc leaves the field and q asks
            await pilot.pause(0.2)
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("escape")  # cancel
            await pilot.pause(0.1)
            assert isinstance(app.screen, SetupScreen) and app.is_running
            await pilot.press("ctrl+q")
            await pilot.pause(0.2)
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("l")
            await pilot.pause(0.2)
        assert not app.is_running
    run(scenario())


def test_stop_on_the_run_screen_asks(fixed_runs):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.3)
            await pilot.press("x")
            await pilot.pause(0.2)
            assert isinstance(app.screen, ConfirmScreen)
            assert not rundir.read_control(fixed_runs / "lr-1e-3")
            await pilot.press("n")
            await pilot.pause(0.1)
            assert not rundir.read_control(fixed_runs / "lr-1e-3")
            await pilot.press("x", "y")
            await pilot.pause(0.2)
            assert rundir.read_control(fixed_runs / "lr-1e-3").get("command") == "stop"
    run(scenario())


# -- 3. try it -------------------------------------------------------------------------
def test_try_it_box_is_large_keys_do_not_leak_and_esc_closes_it(fixed_runs):
    async def scenario():
        from textual.widgets import Input
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = app.screen
            await pilot.pause(0.3)
            await pilot.press("t")
            await pilot.pause(0.2)
            assert screen.query_one("#try-scroll").size.height >= 8
            await pilot.press(*"psxt")
            await pilot.pause(0.3)
            assert screen.query_one("#prompt", Input).value == "psxt"
            assert not rundir.read_control(fixed_runs / "lr-1e-3")  # no pause/save/stop
            assert not isinstance(app.screen, ConfirmScreen)
            await pilot.press("escape")  # closes the box, not the run screen
            await pilot.pause(0.2)
            assert app.screen is screen and not screen.query_one("#try-panel").display
    run(scenario())


# -- 4. start is guarded -----------------------------------------------------------------
def test_start_refuses_a_preset_without_weights(tiny_run_inputs, tmp_path):
    root, folder, data, _ = tiny_run_inputs

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await fill(pilot, screen, model="llama-3.1-8b", data=data, output=tmp_path / "p")
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert app.screen is screen and not app.started
            assert any("preset" in n.message for n in app._notifications)
    run(scenario())


def test_start_with_bad_records_needs_a_choice(tiny_run_inputs, tmp_path, monkeypatch):
    root, folder, data, bad = tiny_run_inputs
    import lorafit.tui.setup_screen as setup
    monkeypatch.setattr(setup, "start_training", lambda c, r, **kw: FakeProcess())

    async def scenario():
        from textual.widgets import Select
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await fill(pilot, screen, model=folder, data=bad, output=tmp_path / "b",
                       batch_size=1, seq_len=32)
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert app.screen is screen and not app.started
            assert any("bad record" in n.message for n in app._notifications)
            assert await wait_for(pilot, lambda: panel_text(screen, "#data-panel")
                                  .startswith("2 bad record"))  # problems first
            screen.query_one("#on_bad_record", Select).value = "skip"
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen) and len(app.started) == 1
        cfg = tomllib.loads(rundir.config_path(tmp_path / "b").read_text())
        assert cfg["on_bad_record"] == "skip"
    run(scenario())


def test_start_asks_when_the_run_does_not_fit(tiny_run_inputs, tmp_path, monkeypatch):
    root, folder, data, _ = tiny_run_inputs
    import lorafit.tui.setup_screen as setup
    monkeypatch.setattr(setup, "start_training", lambda c, r, **kw: FakeProcess())

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await fill(pilot, screen, model=folder, data=data, output=tmp_path / "f",
                       batch_size=2, seq_len=32, budget="1MiB")
            assert await wait_for(pilot, lambda: panel_text(screen, "#memory-panel")
                                  .startswith("does NOT fit"))  # the problem first
            assert "capacity 1 MiB, over by" in panel_text(screen, "#memory-panel")
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert isinstance(app.screen, ConfirmScreen) and not app.started
            await pilot.press("n")
            await pilot.pause(0.2)
            assert app.screen is screen and not app.started
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            await pilot.press("y")
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen) and len(app.started) == 1
        cfg = tomllib.loads(rundir.config_path(tmp_path / "f").read_text())
        assert cfg["force"] is True
    run(scenario())


# -- 5. suggestions apply with one key ------------------------------------------------------
def test_a_suggestion_applies_to_the_form(tmp_path):
    async def scenario():
        from textual.widgets import Checkbox, Input, Select
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=(120, 36)) as pilot:
            screen = app.screen
            screen.query_one("#backend", Select).value = "torch"
            await fill(pilot, screen, model="llama-3.1-8b", budget="23GiB")
            assert await wait_for(pilot, lambda: "does NOT fit" in
                                  panel_text(screen, "#memory-panel"))
            text = panel_text(screen, "#memory-panel")
            assert "nothing short" not in text and "--quantize 4bit" in text
            first = screen.estimate["suggestions"][0]
            await pilot.press("ctrl+f")
            await pilot.pause(0.2)
            form = {f: screen.query_one(f"#{f}", Input).value for f in ("batch_size",
                                                                     "grad_accum")}
            flags = first.split(":")[0]
            if "--batch-size" in flags:
                assert f"--batch-size {form['batch_size']}" in flags
                assert f"--grad-accum {form['grad_accum']}" in flags
            if "--dtype bf16" in flags:
                assert screen.query_one("#dtype", Select).value == "bf16"
            if "--grad-checkpoint" in flags:
                assert screen.query_one("#grad_checkpoint", Checkbox).value
            assert await wait_for(pilot, lambda: panel_text(screen, "#memory-panel")
                                  .startswith("fits"))
    run(scenario())


def test_a_shard_suggestion_ticks_the_shard_box():
    from lorafit.tui.setup_screen import suggestion_changes

    assert suggestion_changes("--shard: 11.93 GiB") == {"shard": True}
    assert suggestion_changes("--grad-checkpoint --quantize 4bit: 8.20 GiB") == \
        {"grad_checkpoint": True, "quantize": "4bit"}


# -- 6. a dead trainer -------------------------------------------------------------------
def test_a_dead_trainer_shows_died_with_its_log(tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    write_run(run_dir, 5, 40, 1e-3, finished=False)
    status = rundir.read_status(run_dir)
    assert status["state"] == "running"
    rundir.write_status(run_dir, {**status, "pid": dead_pid()})
    rundir.train_log_path(run_dir).write_text("loading...\nstep 5 of 40\n")

    async def scenario():
        app = LorafitApp(watch=run_dir, runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: "died" in panel_text(screen, "#side"),
                                  timeout=10)
            assert "eta -" in panel_text(screen, "#side")
            assert "step 5 of 40" in log_text(screen)
            await pilot.press("p")
            await pilot.pause(0.2)
            assert not rundir.read_control(run_dir)
            await pilot.press("escape", "ctrl+r")
            await pilot.pause(0.3)
            from textual.widgets import DataTable
            table = app.screen.query_one(DataTable)
            assert str(table.get_row_at(table_names(app.screen).index("killed"))[2]) == "died"
    run(scenario())


# -- 7. stale panels ---------------------------------------------------------------------
def test_clearing_a_field_clears_its_panel_and_panels_are_not_all_bold(tiny_run_inputs,
                                                                      tmp_path):
    root, folder, data, _ = tiny_run_inputs

    async def scenario():
        from textual.widgets import Static
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await fill(pilot, screen, model=folder, data=data, batch_size=2, seq_len=32)
            assert await wait_for(pilot, lambda: "memory estimate" in
                                  panel_text(screen, "#memory-panel"))
            assert await wait_for(pilot, lambda: "records" in panel_text(screen, "#data-panel"))
            content = screen.query_one("#memory-panel", Static).content
            assert "bold" not in str(content.style)  # only the headings are bold
            assert any("bold" in str(span.style) for span in content.spans)
            await fill(pilot, screen, model="", data="")
            await pilot.pause(0.5)
            assert "fill in a model" in panel_text(screen, "#memory-panel")
            assert "choose a file" in panel_text(screen, "#data-panel")
            assert screen.estimate is None
    run(scenario())


def test_eta_is_cleared_once_the_run_is_over(fixed_runs):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-3e-3", runs_root=fixed_runs)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: "completed" in panel_text(screen, "#side"))
            assert "eta -" in panel_text(screen, "#side")
            assert panel_text(screen, "#eta") == "completed"  # beside the bar, no ETA
    run(scenario())


def test_the_comparison_is_redrawn_on_resize(fixed_runs):
    async def scenario():
        app = LorafitApp(runs_root=fixed_runs)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("escape", "ctrl+r", "c")
            await pilot.pause(0.3)
            before = panel_text(app.screen, "#compare")
            width = max(len(l) for l in before.splitlines())
            await pilot.resize_terminal(120, 30)
            await pilot.pause(0.5)
            after = panel_text(app.screen, "#compare")
            assert max(len(l) for l in after.splitlines()) > width + 20
    run(scenario())


# -- 8. config paths ---------------------------------------------------------------------
def test_config_stores_absolute_paths(tiny_run_inputs, tmp_path, monkeypatch):
    root, folder, data, _ = tiny_run_inputs
    import lorafit.tui.setup_screen as setup
    monkeypatch.setattr(setup, "start_training", lambda c, r, **kw: FakeProcess())
    monkeypatch.chdir(root)

    async def scenario():
        app = LorafitApp(runs_root="runs")
        async with app.run_test(size=SIZE) as pilot:
            await fill(pilot, app.screen, model=folder.name, data=data.name,
                       output="runs/rel", batch_size=2, seq_len=32)
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen)
    run(scenario())
    cfg = tomllib.loads(rundir.config_path(root / "runs" / "rel").read_text())
    assert cfg["model"] == str(folder.resolve()) and cfg["data"] == str(data.resolve())
    assert cfg["output"] == str((root / "runs" / "rel").resolve())


# -- 9. focus ----------------------------------------------------------------------------
def test_the_model_field_has_focus_at_start(tmp_path):
    async def scenario():
        app = LorafitApp(runs_root=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press(*"abc")
            assert app.screen.query_one("#model").value == "abc"
    run(scenario())


# -- layout ------------------------------------------------------------------------------
def test_help_lists_every_key_of_the_screen(fixed_runs):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.pause(0.3)
            await pilot.press("question_mark")
            await pilot.pause(0.2)
            assert isinstance(app.screen, HelpScreen)
            text = panel_text(app.screen, "#help-text")
            for key in ("p", "s", "x", "t", "esc", "ctrl+q", "?", "d"):
                assert f"  {key} " in text
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert isinstance(app.screen, RunScreen)

    async def other_screens():  # the set-up screen's keys, then the runs list's
        app = LorafitApp(runs_root=fixed_runs)
        async with app.run_test(size=(120, 36)) as pilot:
            for keys, screen_keys in ((("escape",), ("ctrl+s", "ctrl+r", "ctrl+f", "ctrl+o",
                                                     "esc")),
                                      (("ctrl+r",), ("enter", "space", "c", "r", "u", "esc"))):
                await pilot.press(*keys, "question_mark")
                await pilot.pause(0.2)
                assert isinstance(app.screen, HelpScreen)
                text = panel_text(app.screen, "#help-text")
                for key in screen_keys + ("ctrl+q", "?", "d"):
                    assert f"  {key} " in text, key
                await pilot.press("escape")
                await pilot.pause(0.1)
    run(scenario())
    run(other_screens())


def test_the_memory_bar_marks_the_capacity_and_shows_the_overflow_in_red():
    from lorafit.tui.widgets import memory_bar

    mib = 2**20
    fits = memory_bar([("weights", 300 * mib), ("activations", 200 * mib)], 1000 * mib, 20)
    bar = fits.plain.splitlines()[0]
    assert len(bar) == 20 and bar.endswith("┃") and bar.count("┃") == 1
    assert bar[:19] == "█" * 10 + "░" * 9  # half of the capacity used
    assert "capacity 1000 MiB" in fits.plain and "over by" not in fits.plain
    over = memory_bar([("weights", 300 * mib), ("activations", 900 * mib)], 1000 * mib, 20)
    bar = over.plain.splitlines()[0]
    cap = bar.index("┃")
    assert len(bar) == 20 and 0 < cap < 19 and "░" not in bar
    reds = {i for i in range(20) if "red" in str(over.get_style_at_offset(_console(), i))}
    assert reds == set(range(cap + 1, 20))  # the cells past the capacity, and only those
    assert "over by 200 MiB" in over.plain


def _console():
    from rich.console import Console
    return Console()


def test_the_loss_plot_joins_the_smoothed_line_and_turns_log_y_for_a_wide_range():
    from lorafit.tui.widgets import plot_lines

    xs = list(range(1, 31))
    narrow = [2.0 - 0.03 * x for x in xs]
    lines = [line.plain for line in plot_lines([(xs, narrow, "grey42", "line")], 40, 8,
                                               x_max=40)]
    assert "log y" not in lines[-1] and lines[-1].split()[-1] == "30/40"  # step/total
    assert lines[-1].split()[:2] == ["step", "1"] and "20" in lines[-1]  # ticks
    body = [l[7:] for l in lines[:-1]]
    cols = {c for l in body for c, ch in enumerate(l) if ch != " "}
    assert cols == set(range(min(cols), max(cols) + 1))  # joined: no gap between points
    assert max(cols) < 40 - 7 - 5  # 30 of 40 steps: the x axis runs to the total
    wide = [100.0 * 0.7 ** x for x in xs]  # 100 .. 0.002: a factor of 45,000
    lines = [line.plain for line in plot_lines([(xs, wide, "grey42")], 40, 8, x_max=40)]
    assert lines[-1].endswith("log y")
    assert float(lines[0][:7]) == pytest.approx(70, rel=0.01)  # labels in loss units
    assert float(lines[-2][:7]) == pytest.approx(100 * 0.7 ** 30, rel=0.05)


def test_run_screen_shows_the_run_settings(fixed_runs):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=SIZE) as pilot:
            assert await wait_for(pilot, lambda: "model" in panel_text(app.screen,
                                                                       "#settings"))
            text = panel_text(app.screen, "#settings")
            row = app.screen.query_one("#settings")
            assert text.startswith(" tiny-model  train.jsonl  rank 8  lr 0.001  batch 4")
            assert text.endswith("torch/cpu") and len(text) <= row.size.width  # whole
            await pilot.resize_terminal(120, 36)
            await pilot.pause(0.3)
            assert panel_text(app.screen, "#settings").startswith(" model tiny-model  data ")
            assert panel_text(app.screen, "#eta") == "eta 00:00"  # beside the progress bar
            bar, eta = app.screen.query_one("#progress"), app.screen.query_one("#eta")
            assert bar.region.width + eta.region.width == app.size[0]  # the full width
    run(scenario())


# -- resume from the runs list ------------------------------------------------------------
def test_a_stopped_run_resumes_from_the_runs_list(tiny_run_inputs, tmp_path, monkeypatch):
    """A run stopped at step 2 of 4; `u` on its row continues it in a child trainer, whose
    screen opens; a running or completed run is not started twice."""
    from lorafit.commands.train import run_training
    from lorafit.core import events as ev
    from lorafit.core.config import TrainConfig
    from lorafit.core.control import Control

    root, folder, data, _ = tiny_run_inputs
    out = tmp_path / "runs" / "stopped"
    cfg = TrainConfig(model=str(folder), data=str(data), output=str(out), backend="torch",
                      device="cpu", rank=4, batch_size=4, max_steps=4, seq_len=32,
                      save_every=1)
    control = Control(out)

    class StopAt2(ev.Sink):
        def __call__(self, e):
            if isinstance(e, ev.StepReport) and e.step == 2:
                control.stop_requested = True

    assert run_training(cfg, [StopAt2()], control, install_signals=False) == "stopped"
    assert rundir.read_status(out)["state"] == "stopped"
    monkeypatch.chdir(tmp_path)

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("escape", "ctrl+r")
            await pilot.pause(0.3)
            await pilot.press("u")
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen) and app.screen.run_dir == out
            assert [d for _, d in app.started] == [out]
            assert await wait_for(pilot, lambda: rundir.read_status(out).get("state")
                                  == "completed", timeout=120)
            assert rundir.read_status(out)["step"] == 4
            app.started[0][0].wait(30)
            await pilot.press("escape")
            await pilot.pause(0.3)
            assert isinstance(app.screen, BrowserScreen)
            await pilot.press("u")  # completed: nothing more to resume
            await pilot.pause(0.3)
            assert isinstance(app.screen, BrowserScreen) and len(app.started) == 1
    run(scenario())
    log = rundir.train_log_path(out).read_text()
    assert "resuming from" in log


# -- the set-up form at 80x24 -------------------------------------------------------------
def test_every_setup_field_is_reachable_at_80x24(tmp_path):
    """Tab walks every field of the form, and each one scrolls into view when it has focus
    (the form is taller than an 80x24 screen)."""
    from textual.widgets import Button, Checkbox, Input, Select

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            screen = app.screen
            form = screen.query_one("#form")
            fields = [w for w in form.query("*") if isinstance(w, (Input, Select, Checkbox,
                                                                   Button))
                      and w.parent.display]  # not a method's field hidden under sft
            assert form.virtual_size.height > form.size.height  # it does not fit: it scrolls
            seen = []
            for _ in range(len(fields) + 5):
                w = app.focused
                while w is not None and w not in fields:
                    w = w.parent
                if w is not None and w not in seen:
                    seen.append(w)
                    visible = form.region.intersection(w.region)
                    assert visible.height >= 1 and visible == w.region, w.id
                await pilot.press("tab")
                await pilot.pause(0.05)
            assert set(seen) == set(fields)
            needed = {"quantize", "dtype", "device", "backend", "budget", "grad_accum",
                      "warmup_steps", "schedule", "save_every", "eval_every", "val_fraction",
                      "on_bad_record", "nproc"}  # the fields issue 17 asks for
            assert needed <= {w.id for w in fields}
            screen.query_one("#backend", Select).value = "mlx"
            screen.query_one("#device", Select).value = "cuda"
            with pytest.raises(LorafitError, match="^device: mlx runs on cpu or metal, "
                               "not cuda$"):
                screen.config()
            screen.query_one("#backend", Select).value = "torch"
            await pilot.pause(0.05)
            assert screen.config().device == "cuda"
    run(scenario())


# -- typing paths: completion and a file picker ---------------------------------------------
def test_the_model_field_completes_presets_and_folders(tmp_path, monkeypatch):
    from textual.widgets import Input

    from huggingface_hub.utils import _cache_manager

    (tmp_path / "models" / "tiny-a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hub"  # a Hugging Face cache holding one model, as a download leaves it
    snap = hub / "models--someorg--tiny-cached" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (hub / "models--someorg--tiny-cached" / "refs").mkdir()
    (hub / "models--someorg--tiny-cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub))

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            field = app.screen.query_one("#model", Input)
            assert app.focused is field
            await pilot.press(*"llama-3.1-8")
            await pilot.pause(0.3)
            await pilot.press("right")  # accepts the ghost-text completion
            assert field.value == "llama-3.1-8b"
            field.value = ""
            await pilot.press(*"someorg/t")
            await pilot.pause(0.3)
            await pilot.press("right")
            assert field.value == "someorg/tiny-cached"
            field.value = ""
            await pilot.press(".", "/", "m")
            await pilot.pause(0.3)
            await pilot.press("right")
            assert field.value == "./models/"
            await pilot.press("t")
            await pilot.pause(0.3)
            await pilot.press("right")
            assert field.value == "./models/tiny-a/"
    run(scenario())


def test_ctrl_o_picks_the_data_file_from_a_tree(tmp_path, monkeypatch):
    from textual.widgets import Input

    from lorafit.tui.pickers import DataFilePicker, DataTree

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "data" / "notes.txt").write_text("not data")
    monkeypatch.chdir(tmp_path)

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("tab")  # the data field
            await pilot.press("ctrl+o")
            await pilot.pause(0.5)
            assert isinstance(app.screen, DataFilePicker)
            tree = app.screen.query_one(DataTree)
            await pilot.press("down", "enter")  # open data/
            await pilot.pause(0.5)
            shown = [str(n.label) for n in tree.root.children[0].children]
            assert shown == ["train.jsonl"]  # notes.txt is not data
            await pilot.press("down", "enter")
            await pilot.pause(0.3)
            assert isinstance(app.screen, SetupScreen)
            field = app.screen.query_one("#data", Input)
            assert field.value == str(Path("data") / "train.jsonl") or \
                Path(field.value).resolve() == (tmp_path / "data" / "train.jsonl").resolve()
            await pilot.press("ctrl+o")
            await pilot.pause(0.3)
            await pilot.press("escape")  # cancel keeps the value
            await pilot.pause(0.2)
            assert isinstance(app.screen, SetupScreen) and field.value.endswith("train.jsonl")
    run(scenario())


# -- the side panel at 80x24 -----------------------------------------------------------------
def test_the_side_panel_is_whole_and_scrolls_into_view_at_80x24(fixed_runs):
    """Nothing of the stats and memory panel is cut: its text is laid out whole, and where
    it is taller than the screen allows, Tab reaches it and End brings its last line in."""
    from textual.widgets import Static

    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: "memory" in panel_text(screen, "#side"))
            await pilot.pause(0.3)
            box, side = screen.query_one("#side-box"), screen.query_one("#side", Static)
            lines = panel_text(screen, "#side").splitlines()
            assert side.size.height == len(side.render().wrap(side.size.width))
            assert "capacity" in lines[-1] or lines[-1].startswith("■")  # the bar's legend
            assert box.virtual_size.height > box.size.height  # it does not fit: it scrolls
            for _ in range(6):
                if app.focused is box:
                    break
                await pilot.press("tab")
                await pilot.pause(0.05)
            assert app.focused is box
            await pilot.press("end")
            await pilot.pause(0.3)
            assert box.scroll_y == box.max_scroll_y > 0
            last_row = side.region.y + side.region.height - 1
            assert box.content_region.y <= last_row < box.content_region.bottom
    run(scenario())


# -- each method's settings in the form (the CLI's --dpo-loss, --kto-*, --reward...) ---------
def test_each_methods_settings_are_in_the_form_and_reach_config_toml(tiny_run_inputs, tmp_path,
                                                                    monkeypatch):
    """dpo: the loss; kto: the two weights; grpo: the reward function and the group size.
    Each is shown only under its method, checked with a one-line problem, and written into
    RUN/config.toml (the reward's file made absolute)."""
    import json

    import tomli_w
    from textual.widgets import Select

    import lorafit.tui.setup_screen as setup
    from lorafit.core.config import to_toml

    root, folder, data, _ = tiny_run_inputs
    monkeypatch.setattr(setup, "start_training", lambda c, r, **kw: FakeProcess())
    monkeypatch.chdir(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"say {w}", "chosen": f" {w}",
                                           "rejected": " no"}) for w in "abcd"))
    (tmp_path / "rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                         "    return [-len(c) for c in completions]\n")
    own = ("dpo_loss", "kto_desirable_weight", "kto_undesirable_weight", "reward",
           "num_generations", "max_new_tokens")

    def shown(screen):
        return {f for f in own if screen.query_one(f"#row-{f}").display}

    def toml_of(cfg) -> dict:
        return tomllib.loads(to_toml(setup.absolute_paths(cfg)))

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            method = screen.query_one("#method", Select)
            assert shown(screen) == set()  # sft
            method.value = "dpo"
            await fill(pilot, screen, model=folder, data=pairs, output=tmp_path / "d",
                       batch_size=2, seq_len=32)
            # the Select's change reaches the form as a message: wait for it
            assert await wait_for(pilot, lambda: shown(screen) == {"dpo_loss"}, 20)
            screen.query_one("#dpo_loss", Select).value = "ipo"
            await pilot.press("ctrl+s")
            assert await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), 20)
            assert tomllib.loads(rundir.config_path(tmp_path / "d").read_text())[
                "dpo_loss"] == "ipo"
            await pilot.press("escape")
            await pilot.pause(0.2)
            method.value = "kto"
            await fill(pilot, screen, kto_desirable_weight=1.5, kto_undesirable_weight=0)
            # the Select's change reaches the form as a message: wait for it
            assert await wait_for(pilot, lambda: shown(screen) == {"kto_desirable_weight", "kto_undesirable_weight"}, 20)
            assert await wait_for(pilot, lambda: panel_text(screen, "#memory-panel") ==
                                  "kto-undesirable-weight must be a positive number, got 0.0")
            await fill(pilot, screen, kto_undesirable_weight=0.5)
            cfg = toml_of(screen.config())
            assert (cfg["kto_desirable_weight"], cfg["kto_undesirable_weight"]) == (1.5, 0.5)
            assert cfg["dpo_loss"] == "sigmoid"  # dpo's choice is not passed to kto
            method.value = "grpo"
            await fill(pilot, screen, data=data)
            # the Select's change reaches the form as a message: wait for it
            assert await wait_for(pilot, lambda: shown(screen) == {"reward", "num_generations", "max_new_tokens"}, 20)
            for reward, why in (("", "grpo needs a reward function, file.py:function"),
                                ("rewards.py", "'rewards.py' is not file.py:function"),
                                ("nope.py:short", "no file nope.py")):
                await fill(pilot, screen, reward=reward)
                assert panel_text(screen, "#memory-panel") == f"reward: {why}"
            await fill(pilot, screen, reward="rewards.py:short", num_generations="two")
            assert panel_text(screen, "#memory-panel") == \
                "generations: 'two' is not a valid value"
            await fill(pilot, screen, num_generations=6, max_new_tokens=64)
            assert panel_text(screen, "#memory-panel") == \
                "max-new-tokens 64 leaves no room for a prompt in seq-len 32"
            await fill(pilot, screen, max_new_tokens=16)
            assert await wait_for(pilot, lambda: "32 prompts x 6 completions of up "
                                  "to 16 tokens" in panel_text(screen, "#data-panel"), 30)
            cfg = toml_of(screen.config())
            assert cfg["reward"] == f"{(tmp_path / 'rewards.py').resolve()}:short"
            assert (cfg["method"], cfg["num_generations"]) == ("grpo", 6)
    run(scenario())


# -- measured vs peak, in words ----------------------------------------------------------------
def test_the_run_screen_says_what_measured_and_the_process_peak_are(fixed_runs):
    """On a CPU the step report's peak is the whole process's resident memory (hundreds of
    MiB of Python and torch for a tiny model whose step peaks at 1 MiB): it is labelled
    "process" and explained, not shown as a second tensor peak; an allocator's peak says
    whose it is."""
    from lorafit.tui.run_screen import peak_words

    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: "process" in panel_text(screen, "#side"))
            text = " ".join(panel_text(screen, "#side").split())
            assert "measured 401 MiB" in text and "process 380 MiB" in text
            assert "peak now" not in text and "newest step's peak" not in text
            assert "measured 401 MiB (+1.0% est) tensors' peak of full step 2" in text
            assert "process 380 MiB whole trainer at its peak (RSS): Python, framework, " \
                "weights" in text
    run(scenario())
    assert peak_words("torch.cuda allocator") == (
        "peak", "torch.cuda allocator's high-water mark")
    assert peak_words("torch.mps (current only)")[0] == "now"


# -- several processes (issue 11) and preference tuning (issue 18) --------------------------
def write_preference_run(run_dir: Path, steps: int, world_size: int = 1) -> None:
    """A run folder as a `--method dpo` trainer in `world_size` processes leaves it."""
    from lorafit.core import events as ev

    run_dir.mkdir(parents=True)
    sinks = [ev.JsonlSink(run_dir), ev.StatusSink(run_dir)]

    def emit(e):
        for s in sinks:
            s(e)
    emit(ev.RunStarted(total_steps=steps, examples=64, val_examples=0, backend="torch",
                       device="cpu", trainable="", config={"model": "tiny-model"},
                       world_size=world_size))
    for step in range(1, steps + 1):
        margin = 0.05 * step
        emit(ev.StepReport(step=step, epoch=step / 8, loss=0.6931 - 0.02 * step, lr=1e-4,
                           grad_norm=1.0, tokens=256, tokens_per_s=1000.0, step_time=0.25,
                           eta_s=0.25 * (steps - step), memory_peak=300 * 2**20,
                           memory_current=200 * 2**20, reward_chosen=margin / 2,
                           reward_rejected=-margin / 2, reward_margin=margin,
                           reward_accuracy=min(0.5 + 0.05 * step, 1.0)))
        if step == 2:
            emit(ev.MemoryMeasured(step=2, measured=301 * 2**20, estimated=310 * 2**20,
                                   rank_peaks=[301 * 2**20, 299 * 2**20][:world_size]
                                   if world_size > 1 else None))
    for s in sinks:
        s.close()


@pytest.mark.parametrize("size", [(80, 24), (120, 36)])
def test_a_preference_run_plots_its_reward_margin_beside_the_loss(tmp_path, size):
    from lorafit.tui.widgets import LossPlot

    write_preference_run(tmp_path / "dpo", 10)

    async def scenario():
        app = LorafitApp(watch=tmp_path / "dpo", runs_root=tmp_path)
        async with app.run_test(size=size) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: screen.follower.state.margin.count == 10)
            await pilot.pause(0.5)
            plot = str(screen.query_one(LossPlot).render()).splitlines()
            legend = [i for i, line in enumerate(plot) if "reward margin" in line]
            assert len(legend) == 1 and "acc 1.00" in plot[legend[0]]
            assert plot[0].startswith("loss smoothed")
            if size[0] >= 120:  # beside the loss: both legends on the first row
                assert legend == [0]
            else:  # too narrow for two: under it
                assert plot[legend[0]].startswith("reward margin") and legend[0] > 3
            assert "0.5" in "".join(plot)  # the margin axis reaches the last margin, 0.5
            side = panel_text(screen, "#side")
            assert "margin 0.500" in side and "acc 1.00" in side
            assert "chosen +0.250 rejected -0.250" in side
    run(scenario())


def test_a_supervised_run_shows_no_reward_margin(fixed_runs):
    from lorafit.tui.widgets import LossPlot

    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-3e-3", runs_root=fixed_runs)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: len(screen.follower.state.steps) == 40)
            await pilot.pause(0.3)
            assert "margin" not in str(screen.query_one(LossPlot).render())
            assert "margin" not in panel_text(screen, "#side")
            assert "processes" not in panel_text(screen, "#side")
    run(scenario())


def test_the_run_screen_shows_the_processes_and_each_ranks_peak(tmp_path, monkeypatch):
    """World size from the start record, each rank's peak from the memory record, and the
    CPU use of every rank whose pid is in RUN/ranks/."""
    from lorafit.core import launch
    from lorafit.tui import run_screen, sysinfo

    monkeypatch.setattr(run_screen, "USAGE_S", 0.2)
    write_preference_run(tmp_path / "dp", 4, world_size=2)
    for rank, pid in ((0, os.getpid()), (1, 4321)):
        launch.record_start(tmp_path / "dp", launch.Place(rank, 2))
        (launch.ranks_path(tmp_path / "dp") / f"rank-{rank}.pid").write_text(str(pid))
    sampled = []
    monkeypatch.setattr(sysinfo.UsageSampler, "sample",
                        lambda self, pids: sampled.append(sorted(pids)) or sysinfo.Usage())

    async def scenario():
        app = LorafitApp(watch=tmp_path / "dp", runs_root=tmp_path)
        async with app.run_test(size=(120, 36)) as pilot:
            screen = app.screen
            assert await wait_for(pilot, lambda: "2 processes" in panel_text(screen, "#side"))
            assert "per rank  301 MiB, 299 MiB" in panel_text(screen, "#side")
            assert await wait_for(pilot, lambda: sorted([4321, os.getpid()]) in sampled,
                                  timeout=30)
    run(scenario())


def record_launches(monkeypatch, cores: int) -> list:
    """The argument lists the set-up screen would start (nothing starts), on a machine of
    `cores` CPU cores."""
    import os as _os

    import lorafit.tui.setup_screen as setup

    launched = []

    class Popen(FakeProcess):
        def __init__(self, args, **kw):
            super().__init__()
            launched.append(args)
    monkeypatch.setattr(setup.subprocess, "Popen", Popen)
    monkeypatch.setattr(_os, "cpu_count", lambda: cores)
    return launched


def test_the_processes_field_is_checked_and_passed_as_nproc(tiny_run_inputs, tmp_path,
                                                            monkeypatch):
    """1 by default; 0, a word or more than this machine's cores are form errors; N CPU
    processes need N times the memory; N > 1 starts `lorafit train CONFIG --nproc N`."""
    from lorafit.backends import devices
    from textual.widgets import Select

    root, folder, data, _ = tiny_run_inputs
    launched = record_launches(monkeypatch, cores=3)
    assert devices.process_limit("torch", "cpu") == (3, "3 CPU cores")

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            assert screen.query_one("#nproc").value == "1"
            screen.query_one("#backend", Select).value = "torch"
            await fill(pilot, screen, model=folder, data=data, output=tmp_path / "n",
                       batch_size=1, seq_len=32)
            for bad, why in (("0", "at least 1"), ("two", "not a whole number"),
                             ("4", "at most 3 here (3 CPU cores)")):
                await fill(pilot, screen, nproc=bad)
                assert why in panel_text(screen, "#memory-panel")
                await pilot.press("ctrl+s")
                await pilot.pause(0.2)
                assert app.screen is screen and not launched
            await fill(pilot, screen, nproc=3)
            # three CPU processes hold three copies: room for two is not enough
            assert await wait_for(pilot, lambda: "3 processes share this memory" in
                                  panel_text(screen, "#memory-panel"))
            one = screen.estimate["total"]
            await fill(pilot, screen, budget=f"{2 * one}B")
            assert await wait_for(pilot, lambda: "does NOT fit" in
                                  panel_text(screen, "#memory-panel"))
            assert panel_text(screen, "#memory-panel").startswith("fits")  # one would
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert isinstance(app.screen, ConfirmScreen) and not launched
            await pilot.press("y")
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen)
    run(scenario())
    assert launched and launched[0][-3:] == [str(rundir.config_path(tmp_path / "n")), "--nproc", "3"]


def test_the_shard_switch_halves_the_layers_and_reaches_config_toml(tiny_run_inputs, tmp_path,
                                                                     monkeypatch):
    """`shard the base` beside the processes: with 1 process, on MLX or with --quantize it is
    one form line and nothing starts; with 2 torch processes the memory line is the
    estimator's per-device figure (core/estimate's sharded_base: outside the layers whole,
    1/2 of the layers), lower than data parallel's, and Start writes `shard = true` and
    passes `--nproc 2`."""
    import re

    from lorafit.core.estimate import SHARD_ON_MLX, SHARD_QUANTIZED
    from lorafit.tui.widgets import fmt_bytes
    from textual.widgets import Checkbox, Select

    root, folder, data, _ = tiny_run_inputs
    launched = record_launches(monkeypatch, cores=3)

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            shard = screen.query_one("#shard", Checkbox)
            assert not shard.value and screen.config().shard is False
            screen.query_one("#backend", Select).value = "torch"
            await fill(pilot, screen, model="qwen2.5-0.5b", data=data, output=tmp_path / "s",
                       batch_size=1, seq_len=32, nproc=2)  # a preset: the estimate only
            assert await wait_for(pilot, lambda: "2 processes share this memory" in
                                  panel_text(screen, "#memory-panel"))
            whole = screen.estimate["total"]
            shard.value = True
            await pilot.pause(0.6)
            assert await wait_for(pilot, lambda: "(base sharded)" in
                                  panel_text(screen, "#memory-panel"))
            split = screen.estimate["split"]
            assert split["shard"] and split["base"]["per device"] < split["base"]["whole"]
            assert screen.estimate["breakdown"]["base weights"] == split["base"]["per device"]
            sharded = screen.estimate["total"]
            assert sharded < whole
            assert f"about {fmt_bytes(2 * sharded)} (base sharded)" in \
                panel_text(screen, "#memory-panel")
            await fill(pilot, screen, nproc=1)  # the form line, and Start refuses
            text = panel_text(screen, "#memory-panel")
            assert text.startswith("shard the base: needs 2 or more processes") and \
                "\n" not in text, text
            await pilot.press("ctrl+s")
            await pilot.pause(0.2)
            assert app.screen is screen and not launched
            screen.query_one("#nproc").value = "2"
            for fid, value, why in (("backend", "mlx", SHARD_ON_MLX),
                                    ("quantize", "4bit", SHARD_QUANTIZED)):
                was = screen.query_one(f"#{fid}", Select).value
                screen.query_one(f"#{fid}", Select).value = value
                with pytest.raises(LorafitError, match=f"^{re.escape(why)}$"):
                    screen.config()
                screen.query_one(f"#{fid}", Select).value = was
            await fill(pilot, screen, model=folder, budget="64GiB")
            await pilot.press("ctrl+s")
            await pilot.pause(0.3)
            assert isinstance(app.screen, RunScreen)
    run(scenario())
    config = rundir.config_path(tmp_path / "s")
    assert launched and launched[0][-3:] == [str(config), "--nproc", "2"]
    assert tomllib.loads(config.read_text())["shard"] is True


def test_the_footer_shows_every_key_of_each_screen_at_80x24(fixed_runs):
    """No key is cut off the footer at 80 columns (long explanations are in the help)."""
    from test_tui import screen_text

    async def scenario():
        app = LorafitApp(runs_root=fixed_runs)
        async with app.run_test(size=(80, 24)) as pilot:
            seen = []
            for keys in ((), ("escape", "ctrl+r"), ("enter",)):  # set-up, runs, a run
                await pilot.press(*keys)
                await pilot.pause(0.5)
                footer = screen_text(app).splitlines()[-1]
                shown = [b.description for b in (a.binding for a in
                                                 app.screen.active_bindings.values())
                         if b.show and b.description]
                assert shown and "palette" in footer
                missing = [d for d in shown if d not in footer]
                assert not missing, (type(app.screen).__name__, missing, footer)
                seen.append(type(app.screen))
            assert seen == [SetupScreen, BrowserScreen, RunScreen]
    run(scenario())


# -- --columns in the form -------------------------------------------------------------------
def test_the_columns_field_maps_the_data_for_the_preview_and_the_run(tiny_run_inputs, tmp_path,
                                                                      monkeypatch):
    """A set named question/answer: without a mapping no record is in a known format; with
    prompt=question,completion=answer the preview tokenizes it and Start writes the mapping
    into RUN/config.toml (what `lorafit train` reads); a bad mapping is a one-line form error."""
    import json

    import lorafit.tui.setup_screen as setup

    root, folder, _, _ = tiny_run_inputs
    monkeypatch.setattr(setup, "start_training", lambda c, r, **kw: FakeProcess())
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": f"say {w}", "answer": f" {w}"})
                            for w in "abcde"))

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await fill(pilot, screen, model=folder, data=qa, output=tmp_path / "c",
                       batch_size=1, seq_len=32)
            assert await wait_for(pilot, lambda: "no record in a known format" in
                                  panel_text(screen, "#data-panel"))
            await fill(pilot, screen, columns="prompt")
            assert panel_text(screen, "#memory-panel") == (
                "--columns 'prompt': expected FIELD=COLUMN pairs separated by commas, "
                "e.g. prompt=question,completion=answer")
            await fill(pilot, screen, columns="prompt=question,completion=answer")
            assert await wait_for(pilot, lambda: "5 examples" in
                                  panel_text(screen, "#data-panel"))
            assert "prompt_completion" in panel_text(screen, "#data-panel")
            await pilot.press("ctrl+s")
            assert await wait_for(pilot, lambda: isinstance(app.screen, RunScreen), 20)
        cfg = tomllib.loads(rundir.config_path(tmp_path / "c").read_text())
        assert cfg["columns"] == "prompt=question,completion=answer"
    run(scenario())
