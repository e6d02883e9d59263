"""The terminal UI, driven headless with Textual's Pilot against real runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_hf_model
from lorafit.tui.app import LorafitApp
from lorafit.tui.run_screen import RunScreen
from lorafit.tui.setup_screen import SetupScreen

SNAPSHOTS = Path(__file__).parent / "snapshots"
SIZE = (80, 24)


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tui")
    folder, _ = build_hf_model(root / "model", "llama", tokenizer, num_hidden_layers=2,
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


def snapshot(app, name):
    SNAPSHOTS.mkdir(exist_ok=True)
    app.save_screenshot(filename=f"{name}.svg", path=str(SNAPSHOTS))
    return (SNAPSHOTS / f"{name}.svg").read_text()


def test_setup_screen_updates_memory_and_shows_bad_records(tiny_run_inputs):
    root, folder, data, bad = tiny_run_inputs

    async def scenario():
        app = LorafitApp(runs_root=root / "runs")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            assert isinstance(screen, SetupScreen)
            await fill(pilot, screen, model=folder, data=data, batch_size=2, seq_len=64)
            assert await wait_for(pilot, lambda: "total" in panel_text(screen, "#memory-panel"))
            before = panel_text(screen, "#memory-panel")
            await fill(pilot, screen, batch_size=16)
            assert await wait_for(pilot, lambda: panel_text(screen, "#memory-panel") != before)
            assert await wait_for(pilot, lambda: "prompt_completion" in
                                  panel_text(screen, "#data-panel"))
            assert "token lengths" in panel_text(screen, "#data-panel")
            svg = snapshot(app, "setup-80x24")
            assert "memory" in svg
            await fill(pilot, screen, data=bad)
            assert await wait_for(pilot, lambda: f"{bad}:2:" in panel_text(screen, "#data-panel"))
            text = panel_text(screen, "#data-panel")
            assert f"{bad}:3: malformed JSON" in text
    asyncio.run(scenario())


@pytest.fixture
def children():
    """Child trainers a test started; killed if the test fails before stopping them."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()


def test_start_pause_resume_stop_a_real_run(tiny_run_inputs, children):
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
            assert len(run.follower.state.losses) >= 3  # the plot has points
            snapshot(app, "run-80x24")
            await pilot.press("p")
            assert await wait_for(pilot, lambda: run.follower.state.status.get("state")
                                  == "paused")
            paused_at = step()
            await pilot.pause(2.0)
            assert step() <= paused_at + 1
            await pilot.press("p")
            assert await wait_for(pilot, lambda: step() > paused_at + 2)
            await pilot.press("x")
            assert await wait_for(pilot, lambda: run.follower.state.status.get("state")
                                  == "stopped", timeout=60)
            run.process.wait(timeout=60)
    asyncio.run(scenario())
    final = json.loads((run_dir / "status.json").read_text())["step"]
    assert (run_dir / "checkpoints" / f"step-{final}" / "COMPLETE").exists()
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert "lorafit train" in (run_dir / "config.toml").read_text()


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


def test_watch_shows_the_full_history_of_a_headless_run(tiny_run_inputs, headless_run):
    root = tiny_run_inputs[0]
    run_dir = headless_run

    async def scenario():
        app = LorafitApp(watch=run_dir, runs_root=root)
        async with app.run_test(size=SIZE) as pilot:
            run = app.screen
            assert isinstance(run, RunScreen)
            assert await wait_for(pilot, lambda: len(run.follower.state.steps) == 12)
            assert run.follower.state.val_losses and run.follower.state.status["state"] == \
                "completed"
            assert run.follower.state.memory.get("measured")  # measured peak beside estimate
            await pilot.pause(0.5)
            assert "12/12" in panel_text(run, "#side")
            await pilot.press("escape")  # back to set-up; the browser lists the run
            await pilot.press("ctrl+r")
            await pilot.pause(0.5)
            from textual.widgets import DataTable
            assert app.screen.query_one(DataTable).row_count >= 1
            await pilot.press("c")
            await pilot.pause(0.3)
            snapshot(app, "browser-80x24")
    asyncio.run(scenario())


def test_a_crashing_run_shows_its_error_and_the_ui_stays_responsive(tiny_run_inputs):
    import shutil
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
            from textual.widgets import RichLog
            log_text = " ".join("".join(str(line.text) for line in run.query_one(RichLog).lines)
                                .split())
            assert "no *.safetensors weights found" in log_text
            await pilot.press("t")  # still responsive: the try-it panel opens
            await pilot.pause(0.2)
            assert run.query_one("#try-panel").display
            await pilot.press("d")  # and the theme switches
            await pilot.pause(0.2)
    asyncio.run(scenario())


@pytest.mark.parametrize("size,theme", [((200, 60), "textual-dark"), ((80, 24), "textual-light"),
                                        ((200, 60), "textual-light")])
def test_run_screen_at_other_sizes_and_themes(headless_run, size, theme):
    async def scenario():
        app = LorafitApp(watch=headless_run, runs_root=headless_run.parent)
        async with app.run_test(size=size) as pilot:
            app.theme = theme
            run = app.screen
            assert await wait_for(pilot, lambda: len(run.follower.state.steps) == 12)
            await pilot.pause(0.5)
            plot = run.query_one("#plot")
            assert plot.size.height >= (size[1] - 12 if size[1] > 30 else 8)
            assert "12/12" in panel_text(run, "#side")
            svg = snapshot(app, f"run-{size[0]}x{size[1]}-{theme.split('-')[1]}")
            assert "loss" in svg
    asyncio.run(scenario())
