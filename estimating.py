"""`lorafit estimate` and the pre-flight check of `lorafit train`.

The arithmetic lives in core/estimate.py (no framework); this module finds the model's
shape (folder, config.json, cached hub id or preset) and the memory of the chosen device,
which needs the frameworks, and prints the verdict.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorafit.core.errors import LorafitError
from dataclasses import asdict

from lorafit.core.estimate import (Shape, estimate, fmt_bytes, largest_fitting, parse_bytes,
                                   settings_from_config, suggestions)
from lorafit.models import memory_shape


def model_config(model: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a preset, config.json, folder or hub id."""
    from lorafit.models.presets import find_preset, load_preset

    if not model:
        raise LorafitError("no model given: pass --model (a folder, config.json, hub id or "
                           "preset name)")
    p = Path(model).expanduser()
    if p.is_file():
        try:
            return json.loads(p.read_text()), str(p)
        except json.JSONDecodeError as e:
            raise LorafitError(f"{p}: not valid JSON ({e.msg})") from None
    if p.is_dir():
        from lorafit.models.loader import read_config
        return read_config(p), str(p)
    if find_preset(model):
        cfg = load_preset(model)
        return cfg, f"preset {find_preset(model)} ({cfg.get('source', '')})"
    if model.count("/") == 1:
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(model, "config.json", local_files_only=True)
            return json.loads(Path(path).read_text()), f"{model} (Hugging Face cache)"
        except Exception:
            pass
    load_preset(model)  # raises with close matches
    raise AssertionError


def resolve_backend(cfg) -> tuple[str, str]:
    """(backend, device) the run would use, without loading any model."""
    if cfg.backend == "auto":
        from lorafit.backends import choose_auto
        name, device, _ = choose_auto()
    else:
        name = cfg.backend
        device = cfg.device or ("cuda" if name == "torch" and _cuda() else
                                "metal" if name == "mlx" and _metal() else "cpu")
    device = cfg.device or device
    return name, {"gpu": "metal"}.get(device, device)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _metal() -> bool:
    try:
        import mlx.core as mx
        return mx.metal.is_available()
    except ImportError:
        return False


def device_memory(backend: str, device: str) -> tuple[int, str]:
    """(bytes, description) of the memory a run on this device can use."""
    import psutil

    if device == "cuda":
        import torch
        free, total = torch.cuda.mem_get_info(0)
        return total, f"{torch.cuda.get_device_name(0)} memory"
    if device in ("metal", "mps"):
        return psutil.virtual_memory().total, "Apple unified memory"
    return psutil.virtual_memory().available, "available host RAM"


def estimate_for_config(cfg, budget_bytes: int | None = None) -> dict:
    """The estimate of a TrainConfig with budget, verdict and suggestions (for the runner,
    the CLI and the TUI)."""
    config, source = model_config(cfg.model)
    backend, device = resolve_backend(cfg)
    settings = settings_from_config(cfg, backend, device)
    shape = memory_shape(config)
    est = estimate(shape, settings)
    if budget_bytes is None:
        budget_bytes, budget_source = device_memory(backend, device)
    else:
        budget_source = "--budget"
    fits = est["total"] <= budget_bytes
    est.update(model_source=source, shape=asdict(shape), budget=budget_bytes,
               budget_source=budget_source, fits=fits,
               suggestions=[] if fits else suggestions(shape, settings, budget_bytes))
    return est


def preflight(cfg) -> dict | None:
    """Before any weight is loaded: stop with the estimate and what would fit when the run
    cannot fit the device (unless --force)."""
    try:
        est = estimate_for_config(cfg)
    except LorafitError:
        raise
    if not est["fits"] and not cfg.force:
        raise LorafitError(
            f"this run needs about {fmt_bytes(est['total'])} but {est['budget_source']} is "
            f"{fmt_bytes(est['budget'])}; would fit: {'; '.join(est['suggestions'])} "
            "(or --force to try anyway)")
    return est


def render(est: dict) -> str:
    lines = [f"model: {est['model_source']}",
             f"backend: {est['backend']} on {est['device']} (peak during the "
             f"{est['phase']} phase)", ""]
    width = max(len(k) for k in est["breakdown"]) + 2
    for name, value in est["breakdown"].items():
        lines.append(f"  {name:<{width}} {fmt_bytes(value):>12}")
    lines.append(f"  {'total':<{width}} {fmt_bytes(est['total']):>12}")
    lines.append(f"  {est['budget_source']:<{width}} {fmt_bytes(est['budget']):>12}")
    lines.append("")
    if est["fits"]:
        lines.append(f"verdict: fits ({100 * est['total'] / est['budget']:.0f}% of "
                     f"{est['budget_source']})")
    else:
        lines.append("verdict: does NOT fit. What would:")
        lines += [f"  {s}" for s in est["suggestions"]]
    return "\n".join(lines)


def cmd_estimate(args, config_from_args) -> int:
    cfg = config_from_args(args)
    budget = parse_bytes(args.budget) if args.budget else None
    est = estimate_for_config(cfg, budget)
    if args.fit:
        settings = settings_from_config(cfg, est["backend"], est["device"])
        value = largest_fitting(Shape(**est["shape"]), settings, args.fit, est["budget"])
        est["fit"] = {"variable": args.fit, "largest": value}
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        print(render(est))
        if args.fit:
            v = est["fit"]["largest"]
            print(f"\nlargest {args.fit} that fits: {v}" if v else
                  f"\nno {args.fit} fits: even 1 needs more than the budget")
    return 0


def add_parser(sub, add_train_flags, config_from_args) -> None:
    p = sub.add_parser("estimate", help="predict peak memory of a run before loading anything")
    add_train_flags(p)
    p.add_argument("--budget", help="memory to fit in, e.g. 24GiB (default: the device's)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--fit", choices=["batch", "seq-len", "rank"],
                   help="the largest value of this setting that fits")
    p.set_defaults(func=lambda args: cmd_estimate(args, config_from_args))
