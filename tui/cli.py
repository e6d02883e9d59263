"""`lorafit tui` and `lorafit watch RUN_DIR`."""

from __future__ import annotations

from pathlib import Path

from lorafit.core import rundir
from lorafit.core.errors import LorafitError


def cmd_tui(args) -> int:
    from lorafit.tui.app import LorafitApp

    defaults = {k: v for k, v in (("model", args.model), ("data", args.data)) if v}
    LorafitApp(runs_root=args.runs, defaults=defaults).run()
    return 0


def cmd_watch(args) -> int:
    from lorafit.tui.app import LorafitApp

    run_dir = Path(args.run_dir)
    if not rundir.is_run_dir(run_dir):
        raise LorafitError(f"{run_dir}: not a lorafit run directory (no "
                           f"{rundir.metrics_path(run_dir).name})")
    LorafitApp(watch=run_dir, runs_root=run_dir.parent).run()
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("tui", help="the terminal UI: set up, watch and compare runs")
    p.add_argument("--runs", default="runs", help="where run directories live")
    p.add_argument("--model", help="pre-fill the model field")
    p.add_argument("--data", help="pre-fill the data field")
    p.set_defaults(func=cmd_tui)
    p = sub.add_parser("watch", help="watch (and steer) a run directory in the terminal UI")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_watch)
