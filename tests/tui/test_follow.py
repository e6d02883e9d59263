"""Issue 12 item 17, the reader's side: the TUI follows metrics.jsonl incrementally, keeps
bounded series, and the runs list reads status files, not metrics files."""

from __future__ import annotations

import asyncio
import math

import pytest

from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.tui import runfiles
from lorafit.tui.runfiles import MAX_POINTS, RunFollower, RunState, Series
from lorafit.tui.widgets import smooth


def step(i: int, loss: float | None = None) -> ev.StepReport:
    return ev.StepReport(step=i, epoch=i / 10, loss=3.0 / i if loss is None else loss,
                         lr=1e-3, grad_norm=1.0, tokens=64, tokens_per_s=1000.0,
                         step_time=0.1, eta_s=1.0, memory_peak=1, memory_current=1)


def test_a_refresh_parses_only_the_lines_appended_since_the_last(tmp_path, monkeypatch):
    sink = ev.JsonlSink(tmp_path)
    for i in range(1, 501):
        sink(step(i))
    follower = RunFollower(tmp_path)
    assert follower.poll() and follower.state.train.count == 500
    folded = []
    original = RunState.add
    monkeypatch.setattr(RunState, "add", lambda self, rec: (folded.append(rec),
                                                            original(self, rec)))
    offset = follower.tail.offset
    for i in range(501, 508):
        sink(step(i))
    follower.poll()
    assert [r["step"] for r in folded] == list(range(501, 508))  # the 7 new lines only
    assert follower.tail.offset - offset == \
        rundir.metrics_path(tmp_path).stat().st_size - offset
    folded.clear()
    assert not follower.poll() and folded == []  # nothing new: nothing parsed
    sink.close()
    with open(rundir.metrics_path(tmp_path), "a") as f:  # a torn last line waits
        f.write('{"kind": "train", "step": 508')
    follower.poll()
    assert folded == []
    with open(rundir.metrics_path(tmp_path), "a") as f:
        f.write(', "epoch": 1, "loss": 1.0, "lr": 0.001, "grad_norm": 1, "tokens": 1, '
                '"tokens_per_s": 1, "step_time": 1, "eta_s": 1, "memory_peak": 1, '
                '"memory_current": 1}\n')
    follower.poll()
    assert [r["step"] for r in folded] == [508] and follower.state.last["step"] == 508


def test_series_stay_bounded_and_keep_the_mean():
    s = Series(cap=64)
    ys = [math.sin(i / 50) + 2 for i in range(10_000)]
    for i, y in enumerate(ys):
        s.add(i + 1, y)
    assert s.count == 10_000 and 32 <= len(s.xs) <= 64
    assert s.xs[0] < 200 and s.xs[-1] > 9_800  # the whole run stays in view
    weights = s.weights()
    assert sum(weights) == 10_000
    mean = sum(y * w for y, w in zip(s.ys, weights)) / 10_000
    assert mean == pytest.approx(sum(ys) / len(ys), rel=1e-9)


def test_the_smoothed_line_is_folded_in_as_records_arrive():
    st = RunState()
    losses = [3.0, 2.5, math.nan, 2.0, 1.8, 1.7]
    for i, loss in enumerate(losses, 1):
        st.add(step(i, loss).to_dict())
    finite = [x for x in losses if math.isfinite(x)]
    assert st.smoothed.ys == pytest.approx(smooth(finite))
    assert st.train.count == 6 and len(st.lr.ys) == 6


def test_a_long_run_costs_the_plot_no_more_than_a_short_one(tmp_path):
    sink = ev.JsonlSink(tmp_path)
    for i in range(1, 5 * MAX_POINTS):
        sink(step(i))
    sink.close()
    follower = RunFollower(tmp_path)
    follower.poll()
    st = follower.state
    assert len(st.steps) <= MAX_POINTS and len(st.smoothed.xs) <= MAX_POINTS
    assert st.train.count == 5 * MAX_POINTS - 1


def test_the_runs_list_reads_status_files_and_metrics_tails_only(tmp_path, monkeypatch):
    from lorafit.tui.app import LorafitApp
    from lorafit.tui.browser import BrowserScreen

    run_dir = tmp_path / "runs" / "long"
    run_dir.mkdir(parents=True)
    sinks = [ev.JsonlSink(run_dir), ev.StatusSink(run_dir)]
    for s in sinks:
        s(ev.RunStarted(total_steps=3000, examples=8, val_examples=0, backend="torch",
                        device="cpu", trainable="", config={}, estimate=None))
    for i in range(1, 3001):
        for s in sinks:
            s(step(i, 0.5 if i == 3000 else 1.0))
    for s in sinks:
        s.close()
    assert rundir.metrics_path(run_dir).stat().st_size > 500_000

    def refuse(*a, **k):
        raise AssertionError("the runs list read a whole metrics file")

    monkeypatch.setattr(runfiles.RunFollower, "poll", refuse)
    monkeypatch.setattr(rundir.MetricsTail, "read_new", refuse)
    monkeypatch.setattr(rundir, "read_metrics", refuse)
    reads = []
    real_open = open

    def counting_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith("metrics.jsonl"):
            read = f.read
            f = type("F", (), {"__enter__": lambda s: s, "__exit__": lambda s, *e: f_.close(),
                               "seek": lambda s, *x: f_.seek(*x), "tell": lambda s: f_.tell(),
                               "read": lambda s, *x: reads.append(len(b := read(*x))) or b})()
            f_ = real_open(path, mode, *a, **k)
            read = f_.read
        return f

    monkeypatch.setattr(runfiles, "open", counting_open, raising=False)
    assert runfiles.last_train_record(run_dir, max_bytes=4096)["step"] == 3000
    assert reads and max(reads) <= 4096

    async def scenario():
        from textual.widgets import DataTable

        app = LorafitApp(runs_root=tmp_path / "runs")
        async with app.run_test(size=(100, 24)) as pilot:
            app.push_screen(BrowserScreen(tmp_path / "runs"))
            await pilot.pause(0.3)
            table = app.screen.query_one(DataTable)
            assert [str(c) for c in table.get_row_at(0)][1:] == ["long", "running",
                                                                  "3000/3000", "0.5000"]
    reads.clear()
    asyncio.run(scenario())
    assert reads and max(reads) <= 1 << 16  # a bounded tail per refresh
