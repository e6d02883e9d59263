"""`lorafit estimate` and the pre-flight check of `lorafit train`.

The arithmetic lives in core/estimate.py (no framework); this module finds the model's
shape (folder, config.json, cached hub id or preset), asks backends/devices.py for the
device and its memory, and prints the verdict.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lorafit.backends.devices import device_memory, resolve_backend
from lorafit.core.errors import LorafitError
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


def estimate_for_config(cfg, budget_bytes: int | None = None) -> dict:
    """The estimate of a TrainConfig with budget, verdict and suggestions (for the runner,
    the CLI and the TUI)."""
    config, source = model_config(cfg.model)
    backend, device = resolve_backend(cfg.backend, cfg.device)
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
    est = estimate_for_config(cfg)
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


def main(cfg, budget: str | None = None, fit: str | None = None,
         as_json: bool = False) -> int:
    """Print the estimate of `cfg` (a table, or JSON); with `fit` ("batch", "seq-len" or
    "rank") also the largest value of that setting that fits."""
    est = estimate_for_config(cfg, parse_bytes(budget) if budget else None)
    if fit:
        settings = settings_from_config(cfg, est["backend"], est["device"])
        est["fit"] = {"variable": fit, "largest": largest_fitting(
            Shape(**est["shape"]), settings, fit, est["budget"])}
    if as_json:
        print(json.dumps(est, indent=2))
    else:
        print(render(est))
        if fit:
            v = est["fit"]["largest"]
            print(f"\nlargest {fit} that fits: {v}" if v else
                  f"\nno {fit} fits: even 1 needs more than the budget")
    return 0
