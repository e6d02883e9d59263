"""Experiment trackers as event sinks: TensorBoard, Weights & Biases, MLflow, Trackio.

Each is one more listener beside metrics.jsonl (`--report-to tensorboard,wandb,mlflow,trackio`) and
logs the same numbers at the same steps: training loss, learning rate, gradient norm and
tokens/s per reported step (and a preference run's rewards), validation loss per
evaluation, the run's config as parameters.
Every package is optional; a missing one stops the run before any weight loads with the
extra to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lorafit.core import events as ev
from lorafit.core.errors import LorafitError

TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
# name -> (module, lorafit extra)
TRAIN_KEYS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s"}
EVAL_KEYS = {"val_loss": "eval/loss"}
# preference tuning's step fields (core/preference_train.py); None, and not logged, for SFT
REWARD_KEYS = {f: f"train/{f}" for f in ("reward_chosen", "reward_rejected", "reward_margin",
                                           "reward_accuracy")}


def parse(text: str | None) -> list[str]:
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise LorafitError(f"--report-to {','.join(bad)}: choose from "
                           f"{', '.join(TRACKERS)} (comma-separated)")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    for name in names:
        module, extra = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise LorafitError(f"--report-to {name} needs the {module} package: "
                               f"pip install 'lorafit[{extra}]'") from None


def metrics_of(event) -> dict[str, float]:
    """{tracker key: value} of a step or evaluation report; {} for other events."""
    if isinstance(event, ev.StepReport):
        values = {key: float(getattr(event, f)) for f, key in TRAIN_KEYS.items()}
        return values | {key: float(getattr(event, f)) for f, key in REWARD_KEYS.items()
                         if getattr(event, f) is not None}
    if isinstance(event, ev.EvalReport):
        return {key: float(getattr(event, f)) for f, key in EVAL_KEYS.items()}
    return {}


def _flat_params(config: dict) -> dict:
    return {k: ("" if v is None else v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in config.items()}


class TensorBoardSink(ev.Sink):
    """Scalars in an event file under RUN/tensorboard/, written with tensorboard's own
    event writer (no TensorFlow, no torch)."""

    def __init__(self, run_dir: str | Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = Path(run_dir) / "tensorboard"
        self.writer = EventFileWriter(str(self.logdir))

    def __call__(self, event):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = metrics_of(event)
        if isinstance(event, ev.RunStarted):
            text = "\n".join(f"{k} = {v!r}" for k, v in event.config.items())
            values = {}
            meta = Summary.Value(tag="config", metadata=None)
            meta.tensor.dtype = 7  # DT_STRING
            meta.tensor.string_val.append(text.encode())
            meta.metadata.plugin_data.plugin_name = "text"
            self.writer.add_event(Event(wall_time=event.time, step=0,
                                        summary=Summary(value=[meta])))
        if values:
            summary = Summary(value=[Summary.Value(tag=k, simple_value=v)
                                     for k, v in values.items()])
            self.writer.add_event(Event(wall_time=event.time, step=event.step, summary=summary))
        if isinstance(event, (ev.EvalReport, ev.RunFinished)):
            self.writer.flush()

    def close(self):
        self.writer.close()


class MlflowSink(ev.Sink):
    """An MLflow run (the tracking URI from MLFLOW_TRACKING_URI, else mlflow's default),
    named after the run folder, with the config as parameters."""

    def __init__(self, run_dir: str | Path):
        import mlflow

        self.mlflow = mlflow
        self.run = None
        self.name = Path(run_dir).name

    def __call__(self, event):
        if isinstance(event, ev.RunStarted):
            self.run = self.mlflow.start_run(run_name=self.name)
            self.mlflow.log_params(_flat_params(event.config))
        elif self.run is not None and (values := metrics_of(event)):
            self.mlflow.log_metrics(values, step=event.step)
        elif self.run is not None and isinstance(event, ev.RunFinished):
            self.mlflow.set_tag("lorafit.status", event.status)

    def close(self):
        if self.run is not None:
            self.mlflow.end_run()
            self.run = None


class WandbSink(ev.Sink):
    """A W&B run (WANDB_PROJECT or "lorafit"; WANDB_MODE=offline works), its files under
    RUN/wandb/."""

    def __init__(self, run_dir: str | Path):
        import wandb

        self.wandb, self.run_dir, self.run = wandb, Path(run_dir), None

    def __call__(self, event):
        if isinstance(event, ev.RunStarted):
            import os

            self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "lorafit"),
                                       name=self.run_dir.name, dir=str(self.run_dir),
                                       config=_flat_params(event.config))
        elif self.run is not None and (values := metrics_of(event)):
            self.run.log(values, step=event.step)
        elif self.run is not None and isinstance(event, ev.RunFinished):
            self.run.summary["status"] = event.status

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


class TrackioSink(ev.Sink):
    """A Trackio run (local-first: TRACKIO_DIR's SQLite database; TRACKIO_PROJECT or
    "lorafit"), named after the run folder."""

    def __init__(self, run_dir: str | Path):
        import trackio

        self.trackio, self.name, self.run = trackio, Path(run_dir).name, None

    def __call__(self, event):
        if isinstance(event, ev.RunStarted):
            import os

            self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "lorafit"),
                                         name=self.name, config=_flat_params(event.config))
        elif self.run is not None and (values := metrics_of(event)):
            self.trackio.log(values, step=event.step)

    def close(self):
        if self.run is not None:
            self.trackio.finish()
            self.run = None


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink,
         "trackio": TrackioSink}


class Guarded(ev.Sink):
    """A tracker that fails (a server gone, a full disk) is switched off with one warning;
    the run and its metrics.jsonl go on."""

    def __init__(self, name: str, sink: ev.Sink):
        self.name, self.sink = name, sink

    def _try(self, fn, *args):
        if self.sink is None:
            return
        try:
            fn(*args)
        except Exception as e:
            import sys

            print(f"warning: --report-to {self.name} failed and is off for this run "
                  f"({type(e).__name__}: {' '.join(str(e).split())[:160]})", file=sys.stderr)
            self.sink = None

    def __call__(self, event):
        self._try(lambda: self.sink(event))

    def close(self):
        self._try(lambda: self.sink.close())


def make_sinks(report_to: str | None, run_dir: str | Path) -> list[ev.Sink]:
    names = parse(report_to)
    check_installed(names)
    return [Guarded(n, SINKS[n](run_dir)) for n in names]
