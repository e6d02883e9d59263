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
from lorafit.core.estimate import (Settings, Shape, adapter_params, estimate, fmt_bytes,
                                   largest_fitting, parse_bytes, settings_from_config,
                                   suggestions)
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


def estimate_for_config(cfg, budget_bytes: int | None = None, nproc: int | None = None) -> dict:
    """The estimate of a TrainConfig with budget, verdict and suggestions (for the runner,
    the CLI and the TUI), per device of `nproc` processes (default: this launch's world
    size, so each worker's pre-flight check is its own device's)."""
    from lorafit.core.launch import detect

    config, source = model_config(cfg.model)
    backend, device = resolve_backend(cfg.backend, cfg.device)
    settings = settings_from_config(cfg, backend, device).replace(
        nproc=nproc or detect().world_size)
    if cfg.dtype is None:
        settings = settings.replace(dtype=load_dtype(config, device))
    shape = memory_shape(config)
    est = estimate(shape, settings)
    if budget_bytes is None:
        budget_bytes, budget_source = device_memory(backend, device)
    else:
        budget_source = "--budget"
    fits = None if budget_bytes is None else est["total"] <= budget_bytes
    est.update(model_source=source, shape=asdict(shape), budget=budget_bytes,
               budget_source=budget_source, fits=fits,
               trainable_params=adapter_params(shape, settings),
               suggestions=suggestions(shape, settings, budget_bytes) if fits is False
               else [])
    return est


def load_dtype(config: dict, device: str) -> str:
    """The dtype the loader gives base weights without --dtype: float32 on a CPU, the
    checkpoint's own (bf16, fp16) on a GPU."""
    if device.split(":")[0] == "cpu":
        return "float32"
    stored = config.get("torch_dtype") or config.get("dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "float32"


def preflight(cfg) -> dict | None:
    """Before any weight is loaded: stop with the estimate and what would fit when the run
    cannot fit the device (unless --force)."""
    est = estimate_for_config(cfg)
    if est["fits"] is False and not cfg.force:
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
    if est["budget"] is not None:
        lines.append(f"  {est['budget_source']:<{width}} {fmt_bytes(est['budget']):>12}")
    lines.append("")
    if est.get("split"):
        lines.append(f"per device, {est['split']['nproc']} processes: {est['split']['note']}")
        lines.append("")
    lines.append(f"trainable parameters: {est['trainable_params']:,}")
    if est["fits"] is None:
        lines.append(f"verdict: no budget known ({est['budget_source']}); pass --budget "
                     "(e.g. --budget 24GiB) to check a fit")
    elif est["fits"]:
        lines.append(f"verdict: fits ({100 * est['total'] / est['budget']:.0f}% of "
                     f"{est['budget_source']})")
    else:
        lines.append("verdict: does NOT fit.")
        if est["suggestions"]:
            lines.append("suggestions (each alone would fit):")
            lines += [f"  {s}" for s in est["suggestions"]]
    return "\n".join(lines)


def main(cfg, budget: str | None = None, fit: str | None = None,
         as_json: bool = False, nproc: int | None = None) -> int:
    """Print the estimate of `cfg` (a table, or JSON); with `fit` ("batch", "seq-len" or
    "rank") also the largest value of that setting that fits; with nproc, per device of
    that many processes."""
    if nproc is not None and nproc < 1:
        raise LorafitError(f"--nproc must be at least 1, got {nproc}")
    est = estimate_for_config(cfg, parse_bytes(budget) if budget else None, nproc)
    if fit:
        settings = Settings(**est["settings"])
        if est["budget"] is None:
            raise LorafitError(f"--fit needs a budget: {est['budget_source']}; pass "
                               "--budget")
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
