"""The terminal UI used as a person would (issue 17): each test drives the app with
Textual's Pilot through one action that used to be broken."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from pathlib import Path

from lorafit.core import rundir
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
    monkeypatch.setattr(setup, "start_training", lambda c, r: FakeProcess())

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
    monkeypatch.setattr(setup, "start_training", lambda c, r: FakeProcess())

    async def scenario():
        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await fill(pilot, screen, model=folder, data=data, output=tmp_path / "f",
                       batch_size=2, seq_len=32, budget="1MiB")
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
    monkeypatch.setattr(setup, "start_training", lambda c, r: FakeProcess())
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
    run(scenario())


def test_run_screen_shows_the_run_settings(fixed_runs):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=SIZE) as pilot:
            assert await wait_for(pilot, lambda: "model" in panel_text(app.screen,
                                                                       "#settings"))
            text = panel_text(app.screen, "#settings")
            assert "tiny-model" in text and "torch/cpu" in text
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
                                                                   Button))]
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
    run(scenario())


# -- typing paths: completion and a file picker ---------------------------------------------
def test_the_model_field_completes_presets_and_folders(tmp_path, monkeypatch):
    from textual.widgets import Input

    (tmp_path / "models" / "tiny-a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

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
