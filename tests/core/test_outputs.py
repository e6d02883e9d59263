"""What a run leaves besides its adapter: the model card, trackers' logs (read back with each
tracker's own reader and compared with metrics.jsonl), and `lorafit push --dry-run`."""

from __future__ import annotations

import json
import os

import pytest

from conftest import build_hf_model, write_prompt_completion_data
from lorafit.cli import main as cli_main
from lorafit.core import rundir
from lorafit.core.config import TrainConfig
from lorafit.core.errors import LorafitError

STEPS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """One tiny run reporting to TensorBoard, MLflow (local file store) and W&B (offline)."""
    from lorafit.commands.train import run_training

    root = tmp_path_factory.mktemp("outputs")
    folder, _ = build_hf_model(root / "model", "llama", tokenizer, rope_scaling=None)
    data = write_prompt_completion_data(root / "train.jsonl", 24)
    env = {"MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
           "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_PROJECT": "lorafit-test",
           "TRACKIO_DIR": str(root / "trackio"), "TRACKIO_PROJECT": "lorafit-test"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = TrainConfig(model=str(folder), data=str(data), output=str(root / "run"),
                          backend="torch", rank=4, alpha=8, targets="all-linear",
                          batch_size=4, lr=3e-3, max_steps=STEPS, seq_len=32, seed=0,
                          val_fraction=0.25, eval_every=3,
                          report_to="tensorboard,mlflow,wandb,trackio")
        status = run_training(cfg, sinks=[], install_signals=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert status == "completed"
    records = rundir.read_metrics(cfg.output)
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    evals = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    assert len(train) == STEPS and set(evals) == {3, 6}
    return root, folder, cfg, train, evals


def test_tensorboard_scalars_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, cfg, train, evals = run
    acc = EventAccumulator(str(root / "run" / "tensorboard"))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert loss == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
    assert lr == pytest.approx({s: r["lr"] for s, r in train.items()}, rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("eval/loss")} == pytest.approx(evals, rel=1e-6)


def test_mlflow_metrics_equal_metrics_jsonl(run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store
    from mlflow.tracking import MlflowClient

    root, _, cfg, train, evals = run
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    runs = client.search_runs(experiment_ids=["0"])
    assert len(runs) == 1 and runs[0].info.run_name == "run"
    rid = runs[0].info.run_id
    history = {m.step: m.value for m in client.get_metric_history(rid, "train/loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
    evals_logged = {m.step: m.value for m in client.get_metric_history(rid, "eval/loss")}
    assert evals_logged == pytest.approx(evals, rel=1e-6)
    assert runs[0].data.params["rank"] == "4"


def _wandb_records(path):
    """The protobuf records of an offline run's .wandb file (LevelDB's log format: 32 KiB
    blocks of chunks with a 7-byte header), parsed with wandb's own message types."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_wandb_offline_run_holds_the_same_values(run):
    root, _, cfg, train, evals = run
    runs = list((root / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    loss, val, config = {}, {}, {}
    for rec in _wandb_records(next(runs[0].glob("*.wandb"))):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in rec.history.item}
            if "train/loss" in items:
                loss[items["_step"]] = items["train/loss"]
            if "eval/loss" in items:
                val[items["_step"]] = items["eval/loss"]
        elif kind in ("run", "config"):  # init's config rides on the run record
            updates = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    assert loss == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
    assert val == pytest.approx(evals, rel=1e-6)
    assert config["rank"] == 4


def test_trackio_logs_equal_metrics_jsonl(run):
    from trackio.sqlite_storage import SQLiteStorage

    root, _, cfg, train, evals = run
    logs = SQLiteStorage.get_logs("lorafit-test", "run")
    loss = {r["step"]: r["train/loss"] for r in logs if "train/loss" in r}
    val = {r["step"]: r["eval/loss"] for r in logs if "eval/loss" in r}
    assert loss == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
    assert val == pytest.approx(evals, rel=1e-6)


def test_model_card_in_the_adapter_folder(run):
    root, folder, cfg, train, evals = run
    card = (root / "run" / "adapter" / "README.md").read_text()
    head, body = card.split("\n---\n", 1)
    import yaml

    meta = yaml.safe_load(head.removeprefix("---\n"))
    assert meta["base_model"] == str(folder) and meta["library_name"] == "peft"
    assert "lorafit" in meta["tags"] and "datasets" not in meta  # a local file is no Hub id
    assert f"| final training loss | {train[STEPS]['loss']:.4f} |" in body
    assert f"| best validation loss | {min(evals.values()):.4f} |" in body
    assert "rank = 4" in body  # the run's config
    svg = (root / "run" / "adapter" / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2


def test_merged_export_gets_a_card_too(run, tmp_path):
    from lorafit.commands.export import export_merged

    root, folder, cfg, train, evals = run
    out = export_merged(root / "run" / "adapter", tmp_path / "merged", backend="torch")
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and f"base_model: {folder}" in card
    assert f"{train[STEPS]['loss']:.4f}" in card


def test_push_dry_run_lists_the_files_and_sends_nothing(run, capsys, monkeypatch):
    root, *_ = run
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda *a, **k: pytest.fail("dry run uploaded"))
    assert cli_main(["push", str(root / "run" / "adapter"), "me/tiny-lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 4 files" in out and "me/tiny-lora" in out
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "loss.svg"):
        assert f"  {name}  " in out
    assert cli_main(["push", str(root / "run"), "me/x", "--dry-run"]) == 2  # not a model
    assert cli_main(["push", str(root / "run" / "adapter"), "no-slash", "--dry-run"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err


def test_sparkline_and_unknown_tracker():
    from lorafit.core.model_card import sparkline

    assert sparkline([3.0, 2.0, 1.0, 1.0]) == "█▅▁▁"
    with pytest.raises(LorafitError, match="choose from tensorboard"):
        TrainConfig(report_to="tensorboard,comet")


def test_missing_tracker_package_is_one_line(monkeypatch):
    import sys

    from lorafit.core import trackers

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(LorafitError, match=r"pip install 'lorafit\[wandb\]'"):
        trackers.check_installed(["wandb"])


def test_a_failing_tracker_is_switched_off_with_one_warning(capsys):
    from lorafit.core import events as ev
    from lorafit.core.trackers import Guarded

    calls = []

    class Broken(ev.Sink):
        def __call__(self, event):
            calls.append(event)
            raise ConnectionError("server gone")

    sink = Guarded("mlflow", Broken())
    step = ev.EvalReport(step=1, val_loss=1.0, best_val_loss=1.0)
    sink(step)
    sink(step)
    sink.close()
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert err.count("warning: --report-to mlflow failed") == 1 and "server gone" in err


def _step(step, **rewards):
    from lorafit.core import events as ev

    return ev.StepReport(step=step, epoch=0.0, loss=0.5, lr=1e-3, grad_norm=1.0, tokens=8,
                         tokens_per_s=1.0, step_time=0.1, eta_s=0.0, memory_peak=0,
                         memory_current=0, **rewards)


def test_preference_rewards_reach_the_trackers(tmp_path):
    """A DPO step's reward fields are logged beside the loss (read back with TensorBoard's
    reader); an SFT step, whose reward fields are None, logs none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorafit.core.trackers import TensorBoardSink, metrics_of

    rewards = dict(reward_chosen=0.25, reward_rejected=-0.5, reward_margin=0.75,
                   reward_accuracy=1.0)
    assert not any("reward" in k for k in metrics_of(_step(1)))
    sink = TensorBoardSink(tmp_path)
    sink(_step(1, **rewards))
    sink(_step(2, reward_chosen=0.5, reward_rejected=0.0, reward_margin=0.5,
               reward_accuracy=None))  # KTO: no accuracy
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for field, value in rewards.items():
        logged = {e.step: e.value for e in acc.Scalars(f"train/{field}")}
        assert logged[1] == pytest.approx(value)
        assert (2 in logged) == (field != "reward_accuracy")


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm", "merged", "gguf"])
def test_a_failed_export_leaves_no_staging_folder_and_no_partial_output(run, tmp_path, fmt,
                                                                        monkeypatch):
    """Every export fails after its weights are written (the model card is its last file):
    neither the staging folder nor a partial destination remains; Ctrl-C is no different; a
    destination that holds something is refused and left as it was."""
    from lorafit.commands import export
    from lorafit.core import model_card

    root, *_ = run
    adapter = root / "run" / "adapter"

    def do(out):
        if fmt == "merged":
            return export.export_merged(adapter, out, backend="torch")
        if fmt == "gguf":
            return export.export_gguf(adapter, out, False, outtype="f32", backend="torch")
        return export.export_adapter(adapter, out, fmt, None)

    for error in (OSError("disk full"), KeyboardInterrupt()):
        def write_card(folder, *a, error=error, **k):
            assert any(folder.iterdir())  # midway: the weights are already there
            raise error

        monkeypatch.setattr(model_card, "write_card", write_card)
        out = tmp_path / "out"
        with pytest.raises(type(error)):
            do(out)
        assert list(tmp_path.iterdir()) == []  # no .out.tmp, no out
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("x")
    with pytest.raises(LorafitError, match="exists and is not empty"):
        do(kept)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert (kept / "mine.txt").read_text() == "x"
