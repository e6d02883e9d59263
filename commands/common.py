"""What several commands share: a base model loaded with an adapter on it."""

from __future__ import annotations

from pathlib import Path

from lorafit.core import adapter_io, lora


def attach_adapter(model, adapter_dir: str | Path) -> None:
    """Put the adapter in `adapter_dir` (PEFT or mlx-lm layout, or a checkpoint folder) on
    an already loaded model, in the model's dtype."""
    cfg, adapter = adapter_io.load_any(adapter_dir)
    lora.attach(model, cfg, adapter, dtype=model.dtype)


def load_model_with_adapter(model_path: str, adapter_dir: str | Path | None = None,
                            backend="auto", device: str | None = None,
                            dtype: str | None = None, quantize: str | None = None,
                            verbose: bool = False):
    """Load a base model (folder or hub id) and attach an adapter to it, if one is given.
    `backend` is a name (auto, torch, mlx; built here on `device`) or a backend object."""
    from lorafit.backends import get_backend
    from lorafit.models.loader import load_model

    cfg, adapter = adapter_io.load_any(adapter_dir) if adapter_dir else (None, None)
    ops = get_backend(backend, device, verbose=verbose) if isinstance(backend, str) else backend
    model = load_model(model_path, ops, dtype, quantize)
    if adapter_dir:  # the adapter was read first: its errors come before a slow load
        lora.attach(model, cfg, adapter, dtype=model.dtype)
    return model
