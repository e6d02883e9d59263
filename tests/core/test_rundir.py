"""The run folder contract (core/rundir.py): one owner for every file name, the atomic
folder write, the metrics records and their typed events, status and control files."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.control import Control, send_command

PACKAGE = Path(rundir.__file__).resolve().parent.parent
RUN_FILE_NAMES = ("metrics.jsonl", "status.json", "control.json", "config.toml",
                  "trainer_state.json", "optimizer.safetensors", "COMPLETE", "train.log")


def _string_constants(tree: ast.AST):
    """Every string literal of a module except documentation (module, class, function and
    attribute docstrings: string expressions that stand alone as statements)."""
    docs = {id(n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            yield n


def _package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("tests", ".venv", "build") or rel.parts[0].endswith(".egg-info"):
            continue
        yield rel, ast.parse(path.read_text(encoding="utf-8"))


def test_each_run_folder_file_name_is_written_in_exactly_one_module():
    users: dict[str, set] = {name: set() for name in RUN_FILE_NAMES}
    for rel, tree in _package_modules():
        for node in _string_constants(tree):
            for name in RUN_FILE_NAMES:
                if re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", node.value):
                    users[name].add(f"{rel}:{node.lineno}")
    owner = str(Path("core") / "rundir.py")
    for name, where in users.items():
        modules = {w.rsplit(":", 1)[0] for w in where}
        assert modules == {owner}, f"{name!r} is spelled out in {sorted(where)}; use " \
                                   "lorafit.core.rundir"


def test_the_scan_sees_literals_but_not_documentation():
    tree = ast.parse('"""metrics.jsonl"""\nX = 1\n"""status.json"""\n'
                     'def f():\n    "control.json"\n    return p / "config.toml"\n')
    assert [n.value for n in _string_constants(tree)] == ["config.toml"]


# -- the atomic folder write --------------------------------------------------------------
def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_atomic_folder_creates_then_replaces_and_leaves_nothing_aside(tmp_path):
    target = tmp_path / "out"
    with rundir.atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        (tmp / "a.txt").write_text("one")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("two")
    assert _tree(target) == {"a.txt": "one", "sub/b.txt": "two"}
    with rundir.atomic_folder(target) as tmp:
        (tmp / "c.txt").write_text("three")
        assert _tree(target) == {"a.txt": "one", "sub/b.txt": "two"}  # old one still whole
    assert _tree(target) == {"c.txt": "three"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_keeps_the_old_target_when_writing_fails(tmp_path):
    target = tmp_path / "out"
    with rundir.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with rundir.atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert _tree(target) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_old_folder_is_deleted_only_after_the_new_one_is_in_place(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with rundir.atomic_folder(target) as tmp:
        (tmp / "v").write_text("1")
    deleted = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **kw):
        deleted.append((Path(path).name, _tree(target)))
        real_rmtree(path, *a, **kw)
    monkeypatch.setattr(rundir.shutil, "rmtree", rmtree)
    with rundir.atomic_folder(target) as tmp:
        (tmp / "v").write_text("2")
    assert deleted == [(".out.old", {"v": "2"})]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(src, dst):
        renamed.append((str(src), set(synced)))
        real_rename(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    target = tmp_path / "out"
    with rundir.atomic_folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        (tmp / "a.txt").write_text("a")
    (src, synced_before), = renamed
    assert src == str(tmp)
    assert {str(tmp / "sub" / "w.bin"), str(tmp / "a.txt"), str(tmp / "sub"),
            str(tmp)} <= synced_before
    assert synced[-1] == str(tmp_path)  # the parent, after the rename


def test_an_interrupted_replacement_is_recovered(tmp_path):
    """A crash between 'old aside' and 'new in place' leaves only .out.old: the next write
    puts it back first, so the last whole folder is never lost."""
    target = tmp_path / "out"
    with rundir.atomic_folder(target) as tmp:
        (tmp / "v").write_text("1")
    os.rename(target, tmp_path / ".out.old")
    tmp = rundir.staging_folder(target)
    assert _tree(target) == {"v": "1"} and tmp.is_dir() and not any(tmp.iterdir())


# -- checkpoints --------------------------------------------------------------------------
def test_checkpoint_folder_contents_and_completeness(tmp_path):
    from lorafit.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from lorafit.core.lora import LoraConfig

    adapter = {"model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 4), np.float32),
               "model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((4, 2), np.float32)}
    opt = {"m.0": np.arange(3, dtype=np.float32)}
    for step in (2, 4, 4, 6):  # step 4 twice: a checkpoint is replaced whole
        path = save_checkpoint(tmp_path, step, adapter, LoraConfig(r=2), "base", opt,
                               {"step": step}, keep=2)
        assert path == rundir.checkpoint_path(tmp_path, step)
    assert [s for s, _ in rundir.checkpoint_dirs(tmp_path)] == [4, 6]
    assert sorted(p.name for p in rundir.checkpoints_path(tmp_path).iterdir()) == \
        ["step-4", "step-6"]
    latest = latest_checkpoint(tmp_path, report=pytest.fail)
    assert latest.name == "step-6" and rundir.is_complete(latest)
    loaded = load_checkpoint(latest)
    assert loaded["state"] == {"step": 6}
    np.testing.assert_array_equal(loaded["optimizer"]["m.0"], opt["m.0"])
    (latest / rundir.COMPLETE).unlink()
    messages = []
    assert latest_checkpoint(tmp_path, report=messages.append).name == "step-4"
    assert len(messages) == 1 and "step-6" in messages[0]


# -- metrics, typed events ----------------------------------------------------------------
def _one_of_each() -> list[ev.Event]:
    return [ev.RunStarted(total_steps=4, examples=8, val_examples=2, backend="torch",
                          device="cpu", trainable="t", config={"rank": 4}),
            ev.StepReport(step=1, epoch=0.5, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=64,
                          tokens_per_s=100.0, step_time=0.1, eta_s=0.3, memory_peak=10,
                          memory_current=5),
            ev.EvalReport(step=1, val_loss=2.1, best_val_loss=2.1),
            ev.MemoryMeasured(step=2, measured=100, estimated=110),
            ev.CheckpointSaved(step=2, path="x"),
            ev.StepSkipped(step=3, reason="nan", in_a_row=1),
            ev.Paused(step=3), ev.Resumed(step=3),
            ev.Message(level="info", text="paused"),  # a text, not a state change
            ev.RunFinished(status="completed", step=4, adapter="a", final_loss=1.0,
                           measured_peak=100, estimated_peak=110),
            ev.ControlApplied(command="stop", step=4, request={"command": "stop", "seq": 1})]


def test_every_event_type_has_its_own_kind_and_round_trips(tmp_path):
    events = _one_of_each()
    assert {type(e) for e in events} == set(ev.EVENT_TYPES.values())
    assert len({e.kind for e in events}) == len(events)
    sink = ev.JsonlSink(tmp_path)
    for e in events:
        sink(e)
    sink.close()
    records = ev.read_metrics(tmp_path)
    assert [ev.from_record(r) for r in records] == events
    assert ev.from_record({"kind": "no-such-kind"}) is None
    assert ev.from_record({"kind": "train", "step": 1}) is None  # fields missing
    newer = dict(records[6], added_later=1)
    assert ev.from_record(newer) == events[6]


def test_metrics_readers_skip_a_torn_last_line(tmp_path):
    f = rundir.open_metrics(tmp_path)
    rundir.append_record(f, {"kind": "paused", "step": 1})
    f.write('{"kind": "resumed", "st')
    f.flush()
    tail = rundir.MetricsTail(tmp_path)
    assert tail.read_new() == [{"kind": "paused", "step": 1}]
    assert rundir.read_metrics(rundir.metrics_path(tmp_path)) == [{"kind": "paused", "step": 1}]
    assert tail.read_new() == []
    f.write('ep": 1}\n')
    f.close()
    assert tail.read_new() == [{"kind": "resumed", "step": 1}]


def test_status_follows_typed_pause_and_resume_not_message_texts(tmp_path):
    run, tmp_path = tmp_path, tmp_path / "run"
    tmp_path.mkdir()
    sink = ev.StatusSink(tmp_path)
    assert rundir.read_status(tmp_path)["state"] == "starting"
    sink(_one_of_each()[0])
    sink(ev.Message(level="info", text="paused"))
    assert rundir.read_status(tmp_path)["state"] == "running"
    sink(ev.Paused(step=3))
    assert rundir.read_status(tmp_path)["state"] == "paused"
    sink(ev.Resumed(step=3))
    assert rundir.read_status(tmp_path)["state"] == "running"
    assert rundir.is_run_dir(tmp_path) and rundir.find_runs(run) == [tmp_path]


def test_tui_run_state_folds_typed_records(tmp_path):
    from lorafit.tui.runfiles import RunFollower

    sink = ev.JsonlSink(tmp_path)
    for e in _one_of_each():
        sink(e)
    sink.close()
    follower = RunFollower(tmp_path)
    assert follower.poll()
    st = follower.state
    assert st.steps == [1] and st.val_losses == [2.1] and st.memory["measured"] == 100
    assert st.log == ["started: 8 examples, 4 steps on torch/cpu", "step 1: validation loss "
                      "2.1000", "step 2: saved x", "step 3: skipped (nan)", "step 3: paused",
                      "step 3: resumed", "paused", "run completed at step 4"]
    assert not follower.poll()


def test_control_file_commands_reach_the_trainer(tmp_path):
    control = Control(tmp_path)
    assert control.poll() is None
    send_command(tmp_path, "pause")
    assert control.poll() == "pause" and control.paused
    assert control.poll() is None  # the same command is applied once
    os.utime(rundir.control_path(tmp_path), ns=(1, 1))  # an mtime change alone is no command
    assert control.poll() is None and control.paused
    send_command(tmp_path, "resume")
    assert control.poll() == "resume" and not control.paused
    assert rundir.read_control(tmp_path)["seq"] == 2
    with pytest.raises(ValueError):
        send_command(tmp_path, "explode")
