"""The terminal UI, driven headless with Textual's Pilot against real runs, and snapshot
tests of each screen against the committed files in tests/snapshots/.

Snapshots: every screen is exported as text (compared line by line) and as SVG (compared
after removing the hash Rich puts in its class names). The screens are filled from fixed
inputs (a run folder written by the real sinks from fixed events, a fixed memory budget,
relative paths, a frozen header clock), so they do not vary between runs or machines. When a
screen changes on purpose, regenerate them with

    LORAFIT_UPDATE_SNAPSHOTS=1 python -m pytest tests/tui/test_tui.py -k snapshot
"""

from __future__ import annotations

import asyncio
import difflib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_hf_model
from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.tui.app import LorafitApp
from lorafit.tui.run_screen import RunScreen
from lorafit.tui.setup_screen import SetupScreen

SNAPSHOTS = Path(__file__).parents[1] / "snapshots"
UPDATE = os.environ.get("LORAFIT_UPDATE_SNAPSHOTS") == "1"
SIZE = (80, 24)


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tui")
    folder, _ = build_hf_model(root / "tiny-model", "llama", tokenizer, num_hidden_layers=2,
                               hidden_size=64, intermediate_size=128, rope_scaling=None)
    data = root / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {w}", "completion": f" {w} {w}"})
                              for w in "the quick brown fox jumps over lazy dog".split() * 4))
    bad = root / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\nnot json\n')
    return root, folder, data, bad


async def wait_for(pilot, predicate, timeout=90.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await pilot.pause(0.2)
    return False


async def fill(pilot, screen, **values):
    from textual.widgets import Input
    for fid, value in values.items():
        screen.query_one(f"#{fid}", Input).value = str(value)
    await pilot.pause(0.6)


def panel_text(screen, wid) -> str:
    from textual.widgets import Static
    return str(screen.query_one(wid, Static).render())


def log_text(screen) -> str:
    from textual.widgets import RichLog
    return " ".join("".join(str(line.text) for line in screen.query_one(RichLog).lines)
                    .split())


# -- snapshots ------------------------------------------------------------------------------
def screen_text(app) -> str:
    """The screen as plain text, rendered the way `App.export_screenshot` renders it."""
    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False,
                      safe_box=False)
    console.print(app.screen._compositor.render_update(
        full=True, screen_stack=app._background_screens))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def normalise_svg(svg: str) -> str:
    return re.sub(r"terminal-\d+", "terminal", svg)


def freeze_clock(app) -> None:
    from textual.widgets import Header
    for header in app.screen.query(Header):
        header.time_format = "12:00:00"


def check_snapshot(app, name: str, out_dir: Path) -> None:
    """Compare the screen with tests/snapshots/NAME.txt and NAME.svg. The new renderings
    are written to out_dir (and, with LORAFIT_UPDATE_SNAPSHOTS=1, over the committed ones)."""
    text, svg = screen_text(app), normalise_svg(app.export_screenshot())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.txt").write_text(text)
    (out_dir / f"{name}.svg").write_text(svg)
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        (SNAPSHOTS / f"{name}.txt").write_text(text)
        (SNAPSHOTS / f"{name}.svg").write_text(svg)
        return
    expected_text = (SNAPSHOTS / f"{name}.txt").read_text()
    if text != expected_text:
        diff = "\n".join(difflib.unified_diff(expected_text.splitlines(), text.splitlines(),
                                              "committed", "now", lineterm=""))
        pytest.fail(f"{name}: the screen differs from tests/snapshots/{name}.txt (new "
                    f"rendering in {out_dir}; LORAFIT_UPDATE_SNAPSHOTS=1 to accept):\n{diff}")
    assert svg == normalise_svg((SNAPSHOTS / f"{name}.svg").read_text()), \
        f"{name}: same text, different colours or styles than tests/snapshots/{name}.svg " \
        f"(new rendering in {out_dir})"


ESTIMATE = {"total": 412 * 2**20, "budget": 8 * 2**30, "budget_source": "available host RAM",
            "breakdown": {"base weights": 240 * 2**20, "adapter weights": 3 * 2**20,
                          "adapter gradients": 3 * 2**20, "optimizer state": 6 * 2**20,
                          "activations": 90 * 2**20, "logits and loss": 40 * 2**20,
                          "framework overhead": 30 * 2**20}}


def write_run(run_dir: Path, steps: int, total: int, lr: float, finished: bool) -> None:
    """A run folder written by the real sinks from fixed events: what a trainer leaves."""
    run_dir.mkdir(parents=True)
    sinks = [ev.JsonlSink(run_dir), ev.StatusSink(run_dir)]

    def emit(e):
        e.time = 1_700_000_000.0
        for s in sinks:
            s(e)
    emit(ev.Message(level="info", text="data: 96 examples (prompt_completion), 2,304 loss "
                                       "tokens, 0 truncated to 64"))
    emit(ev.RunStarted(total_steps=total, examples=96, val_examples=24, backend="torch",
                       device="cpu", trainable="trainable params: 36,864 || all params: "
                       "1,234,496 || trainable%: 2.9862",
                       config={"model": "tiny-model", "backend": "torch",
                               "data": "train.jsonl", "rank": 8, "lr": lr, "batch_size": 4,
                               "warmup_steps": 4, "schedule": "cosine"}, estimate=ESTIMATE,
                       memory_source="process RSS high-water mark"))
    for step in range(1, steps + 1):
        loss = 0.6 + 2.4 * math.exp(-step * lr * 25) + 0.15 * math.sin(step * 1.7)
        emit(ev.StepReport(step=step, epoch=step / 24, loss=loss, lr=lr, grad_norm=1.5,
                           tokens=256, tokens_per_s=5120.0, step_time=0.05,
                           eta_s=0.05 * (total - step), memory_peak=380 * 2**20,
                           memory_current=300 * 2**20))
        if step == 2:
            emit(ev.MemoryMeasured(step=2, measured=401 * 2**20, estimated=412 * 2**20,
                                   estimated_this_batch=405 * 2**20))
        if step % 10 == 0:
            emit(ev.EvalReport(step=step, val_loss=loss + 0.1, best_val_loss=loss + 0.1))
        if step == 12:
            emit(ev.Paused(step=step))
            emit(ev.Resumed(step=step))
        if step % 20 == 0:
            emit(ev.CheckpointSaved(step=step, path=f"{run_dir.name}/checkpoints/step-{step}"))
    if finished:
        emit(ev.RunFinished(status="completed", step=steps, adapter=f"{run_dir.name}/adapter",
                            final_loss=loss, measured_peak=401 * 2**20,
                            estimated_peak=412 * 2**20))
    for s in sinks:
        s.close()


@pytest.fixture
def fixed_runs(tmp_path, monkeypatch):
    """runs/lr-3e-3 (finished, 40 steps) and runs/lr-1e-3 (running, 30 of 40), with the
    working directory at their parent so every path on screen is relative."""
    write_run(tmp_path / "runs" / "lr-3e-3", 40, 40, 3e-3, finished=True)
    write_run(tmp_path / "runs" / "lr-1e-3", 30, 40, 1e-3, finished=False)
    os.utime(tmp_path / "runs" / "lr-3e-3", (1_700_000_000, 1_700_000_000))
    os.utime(tmp_path / "runs" / "lr-1e-3", (1_700_000_100, 1_700_000_100))
    monkeypatch.chdir(tmp_path)
    return Path("runs")


SIZES = [((80, 24), "textual-dark"), ((80, 24), "textual-light"),
         ((120, 36), "textual-dark"), ((120, 36), "textual-light")]


def snap_name(screen: str, size, theme: str) -> str:
    return f"{screen}-{size[0]}x{size[1]}-{theme.split('-')[1]}"


@pytest.mark.parametrize("size,theme,run", [(s, t, r) for (s, t), r in
                                            zip(SIZES, ["lr-1e-3", "lr-3e-3"] * 2)])
def test_run_screen_snapshot(fixed_runs, tmp_path, size, theme, run):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / run, runs_root=fixed_runs)
        async with app.run_test(size=size) as pilot:
            app.theme = theme
            screen = app.screen
            assert isinstance(screen, RunScreen)
            freeze_clock(app)
            total = 40 if run == "lr-3e-3" else 30
            assert await wait_for(pilot, lambda: len(screen.follower.state.steps) == total)
            await pilot.pause(0.5)
            assert f"{total}/40" in panel_text(screen, "#side")
            assert "step 12: paused" in log_text(screen)  # typed events reach the log
            sparks = str(screen.query_one("#plot").render()).splitlines()[-1]
            assert sparks.startswith("lr ") and "tok/s" in sparks and "gnorm" in sparks
            assert screen.query_one("#plot").size.height >= (size[1] - 13 if size[1] > 30
                                                             else 8)
            check_snapshot(app, snap_name("run", size, theme), tmp_path / "out")
    asyncio.run(scenario())


@pytest.mark.parametrize("size,theme", SIZES)
def test_try_it_snapshot(fixed_runs, tmp_path, size, theme):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-3e-3", runs_root=fixed_runs)
        async with app.run_test(size=size) as pilot:
            app.theme = theme
            screen = app.screen
            freeze_clock(app)
            assert await wait_for(pilot, lambda: len(screen.follower.state.steps) == 40)
            await pilot.press("t")
            screen.query_one("#prompt").cursor_blink = False  # a fixed frame
            await pilot.press(*"say fox")
            screen.show_answers("say fox and the the the of a", "step-40", "fox fox")
            await pilot.pause(0.5)
            check_snapshot(app, snap_name("tryit", size, theme), tmp_path / "out")
    asyncio.run(scenario())


@pytest.mark.parametrize("size,theme", SIZES)
def test_help_snapshot(fixed_runs, tmp_path, size, theme):
    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-3e-3", runs_root=fixed_runs)
        async with app.run_test(size=size) as pilot:
            app.theme = theme
            freeze_clock(app)
            assert await wait_for(pilot, lambda: len(app.screen.follower.state.steps) == 40)
            await pilot.press("question_mark")
            await pilot.pause(0.5)
            assert await wait_for(pilot, lambda: "palette" in screen_text(app).splitlines()[-1])
            await pilot.pause(0.3)
            check_snapshot(app, snap_name("help", size, theme), tmp_path / "out")
    asyncio.run(scenario())


@pytest.mark.parametrize("size,theme", SIZES)
def test_browser_snapshot(fixed_runs, tmp_path, size, theme):
    async def scenario():
        app = LorafitApp(runs_root=fixed_runs)
        async with app.run_test(size=size) as pilot:
            app.theme = theme
            await pilot.press("escape", "ctrl+r")
            await pilot.pause(0.3)
            from textual.widgets import DataTable
            table = app.screen.query_one(DataTable)
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            assert [r[1:] for r in rows] == [["lr-1e-3", "running", "30/40", rows[0][4]],
                                             ["lr-3e-3", "completed", "40/40", rows[1][4]]]
            await pilot.press("space")  # mark the first run, then compare it alone
            await pilot.press("c")
            await pilot.pause(0.3)
            assert "lr-1e-3" in panel_text(app.screen, "#compare")
            assert "lr-3e-3" not in panel_text(app.screen, "#compare")
            freeze_clock(app)
            await pilot.pause(0.2)
            check_snapshot(app, snap_name("browser", size, theme), tmp_path / "out")
    asyncio.run(scenario())


@pytest.mark.parametrize("size,theme", SIZES)
def test_setup_screen_snapshot(tiny_run_inputs, tmp_path, monkeypatch, size, theme):
    """Relative paths, the torch backend and a fixed 8 GiB budget: the same screen on any
    machine."""
    import collections

    import psutil
    import torch

    root, folder, data, _ = tiny_run_inputs
    monkeypatch.chdir(root)
    vm = collections.namedtuple("vm", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(16 * 2**30, 8 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    async def scenario():
        from textual.widgets import Input, Select
        app = LorafitApp(runs_root="runs")
        async with app.run_test(size=size) as pilot:
            app.theme = theme
            screen = app.screen
            freeze_clock(app)
            screen.query_one("#backend", Select).value = "torch"
            for field in screen.query(Input):
                field.cursor_blink = False  # a fixed frame
            await fill(pilot, screen, model=folder.name, data=data.name, output="runs/new",
                       batch_size=2, seq_len=64)
            assert await wait_for(pilot, lambda: "8.00 GiB" in panel_text(screen,
                                                                         "#memory-panel"))
            assert await wait_for(pilot, lambda: "token lengths" in
                                  panel_text(screen, "#data-panel"))
            screen.query_one("#model").focus()
            await pilot.pause(0.3)
            check_snapshot(app, snap_name("setup", size, theme), tmp_path / "out")
    asyncio.run(scenario())


# -- real runs ------------------------------------------------------------------------------
def test_setup_screen_updates_memory_and_shows_bad_records(tiny_run_inputs):
    root, folder, data, bad = tiny_run_inputs

    async def scenario():
        app = LorafitApp(runs_root=root / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            assert isinstance(screen, SetupScreen)
            await fill(pilot, screen, model=folder, data=data, batch_size=2, seq_len=64)
            assert await wait_for(pilot, lambda: "memory estimate" in panel_text(screen, "#memory-panel"))
            before = panel_text(screen, "#memory-panel")
            await fill(pilot, screen, batch_size=16)
            assert await wait_for(pilot, lambda: panel_text(screen, "#memory-panel") != before)
            assert await wait_for(pilot, lambda: "prompt_completion" in
                                  panel_text(screen, "#data-panel"))
            assert "token lengths" in panel_text(screen, "#data-panel")
            await fill(pilot, screen, data=bad)
            assert await wait_for(pilot, lambda: f"{bad}:2:" in panel_text(screen, "#data-panel"))
            text = panel_text(screen, "#data-panel")
            assert f"{bad}:3: malformed JSON" in text
    asyncio.run(scenario())


def test_setup_screen_method_selector_checks_preference_data(tiny_run_inputs):
    """--method from the form: dpo shows beta (orpo its lambda), checks pair records, and
    says in one line that SFT data is not preference data."""
    from textual.widgets import Select

    root, folder, data, _ = tiny_run_inputs
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": f"say {w}", "chosen": f" {w}",
                                           "rejected": " no"}) for w in "a b c".split()))

    async def scenario():
        app = LorafitApp(runs_root=root / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            assert not screen.query_one("#row-beta").display
            screen.query_one("#method", Select).value = "dpo"
            await fill(pilot, screen, model=folder, data=data, seq_len=64, beta=0.3)
            # the Select's change arrives as a message: wait for the form to show its field
            assert await wait_for(pilot, lambda: screen.query_one("#row-beta").display, 20)
            assert not screen.query_one("#row-orpo_lambda").display
            assert await wait_for(pilot, lambda: "--method dpo needs prompt, chosen, "
                                  "rejected" in panel_text(screen, "#data-panel"))
            await fill(pilot, screen, data=pairs)
            assert await wait_for(pilot, lambda: "3 pairs" in panel_text(screen, "#data-panel"))
            assert "bad record" not in panel_text(screen, "#data-panel")
            cfg = screen.config()
            assert (cfg.method, cfg.beta) == ("dpo", 0.3)
            screen.query_one("#method", Select).value = "orpo"
            await fill(pilot, screen, orpo_lambda=0.5)
            assert await wait_for(pilot, lambda: screen.query_one("#row-orpo_lambda").display,
                                  20)
            assert not screen.query_one("#row-beta").display
            cfg = screen.config()
            assert (cfg.method, cfg.orpo_lambda, cfg.beta) == ("orpo", 0.5, 0.1)
    asyncio.run(scenario())


@pytest.fixture
def children():
    """Child trainers a test started; killed if the test fails before stopping them."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()


@pytest.mark.slow
def test_start_pause_resume_stop_a_real_run(tiny_run_inputs, children):
    from lorafit.tui.widgets import LossPlot

    root, folder, data, _ = tiny_run_inputs
    run_dir = root / "runs" / "ui-run"

    async def scenario():
        app = LorafitApp(runs_root=root / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await fill(pilot, screen, model=folder, data=data, batch_size=2, seq_len=32,
                       output=run_dir, max_steps=100000, lr="1e-3")
            await pilot.press("ctrl+s")
            await pilot.pause(0.5)
            run = app.screen
            assert isinstance(run, RunScreen)
            children.append(run.process)

            def step():
                return run.follower.state.last.get("step", 0)
            assert await wait_for(pilot, lambda: step() >= 3, timeout=120)
            await pilot.pause(0.3)
            assert "waiting for the first steps" not in str(run.query_one(LossPlot).render())
            await pilot.press("p")
            assert await wait_for(pilot, lambda: run.follower.state.status.get("state")
                                  == "paused")
            # the Paused record follows every step report written before the pause
            assert await wait_for(pilot, lambda: any(line.endswith(": paused")
                                                     for line in run.follower.state.log))
            paused_at = step()
            await pilot.pause(2.0)
            run.follower.poll()
            assert step() == paused_at
            await pilot.press("p")
            assert await wait_for(pilot, lambda: step() > paused_at + 2)
            await pilot.press("x", "y")  # stop asks first
            assert await wait_for(pilot, lambda: run.follower.state.status.get("state")
                                  == "stopped", timeout=60)
            run.process.wait(timeout=60)
    asyncio.run(scenario())
    final = rundir.read_status(run_dir)["step"]
    assert rundir.is_complete(rundir.checkpoint_path(run_dir, final))
    assert (rundir.adapter_path(run_dir) / "adapter_config.json").exists()
    assert "lorafit train" in rundir.config_path(run_dir).read_text()
    kinds = [r["kind"] for r in ev.read_metrics(run_dir)]
    assert kinds.count(ev.Paused.kind) == kinds.count(ev.Resumed.kind) == 1
    assert kinds[-1] == ev.RunFinished.kind


@pytest.fixture(scope="module")
def headless_run(tiny_run_inputs):
    """A run directory written by a headless `lorafit train` in another process."""
    root, folder, data, _ = tiny_run_inputs
    run_dir = root / "headless"
    env = dict(os.environ, LORAFIT_NO_REEXEC="1")
    subprocess.run([sys.executable, "-m", "lorafit.cli", "train", "--model", str(folder),
                    "--data", str(data), "--output", str(run_dir), "--max-steps", "12",
                    "--batch-size", "2", "--seq-len", "32", "--save-every", "6",
                    "--val-fraction", "0.2", "--eval-every", "4", "--backend", "torch"],
                   env=env, check=True, capture_output=True, timeout=300)
    return run_dir


@pytest.mark.slow
def test_watch_shows_the_full_history_of_a_headless_run(tiny_run_inputs, headless_run):
    root = tiny_run_inputs[0]
    run_dir = headless_run

    async def scenario():
        app = LorafitApp(watch=run_dir, runs_root=root)
        async with app.run_test(size=SIZE) as pilot:
            run = app.screen
            assert isinstance(run, RunScreen)
            st = run.follower.state
            assert await wait_for(pilot, lambda: len(st.steps) == 12)
            assert st.steps == list(range(1, 13))
            assert st.val_steps == [4, 8, 12] and st.status["state"] == "completed"
            assert st.memory.get("measured")  # measured peak beside the estimate
            await pilot.pause(0.5)
            assert "12/12" in panel_text(run, "#side")
            assert "measured" in panel_text(run, "#side")
            # torch on the CPU: the step reports' peak is the process's resident memory
            assert st.start["memory_source"].startswith("process RSS")
            assert "whole trainer at its peak (RSS)" in " ".join(
                panel_text(run, "#side").split())
            assert "saved" in log_text(run) and "run completed at step 12" in log_text(run)
            await pilot.press("escape")  # back to set-up; the browser lists the run
            await pilot.press("ctrl+r")
            await pilot.pause(0.5)
            from textual.widgets import DataTable
            table = app.screen.query_one(DataTable)
            names = [table.get_row_at(i)[1] for i in range(table.row_count)]
            assert "headless" in names
    asyncio.run(scenario())


@pytest.mark.slow
def test_a_crashing_run_shows_its_error_and_the_ui_stays_responsive(tiny_run_inputs):
    root, folder, data, _ = tiny_run_inputs
    run_dir = root / "runs" / "crash"
    broken = root / "broken-model"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("*.safetensors"))

    async def scenario():
        app = LorafitApp(runs_root=root / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            # a model folder whose weights are gone: the trainer fails after it started
            await fill(pilot, screen, model=broken, data=data, batch_size=2, seq_len=32,
                       output=run_dir, max_steps=50)
            await pilot.press("ctrl+s")
            await pilot.pause(0.5)
            run = app.screen
            assert await wait_for(pilot, lambda: run.crash_shown, timeout=120)
            assert "no *.safetensors weights found" in log_text(run)
            theme = app.theme
            await pilot.press("d")  # still responsive: the theme switches
            await pilot.pause(0.2)
            assert app.theme != theme
            await pilot.press("t")  # and the try-it panel opens
            await pilot.pause(0.2)
            assert run.query_one("#try-panel").display
    asyncio.run(scenario())
