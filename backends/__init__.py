"""Backend selection. A backend is an object passed explicitly; nothing is chosen at import.

`auto` prefers CUDA, then MLX on Apple Silicon, then MPS, then the CPU (torch, or MLX when
torch is absent), and says why it picked what it picked.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

from lorafit.backends.base import Backend
from lorafit.core.config import BACKENDS as NAMES
from lorafit.core.errors import LorafitError

INSTALL_HINT = {
    "torch": "pip install torch",
    "mlx": "pip install mlx" if sys.platform == "darwin" else "pip install 'mlx[cpu]'",
}


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def choose_auto() -> tuple[str, str, str]:
    """(backend, device, reason) that `--backend auto` would pick on this machine."""
    if is_installed("torch"):
        import torch

        if torch.cuda.is_available():
            return "torch", "cuda", f"CUDA device found: {torch.cuda.get_device_name(0)}"
    if is_apple_silicon() and is_installed("mlx"):
        return "mlx", "gpu", "Apple Silicon with MLX installed (Metal)"
    if is_installed("torch"):
        import torch

        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "torch", "mps", "Apple GPU via PyTorch MPS (MLX not installed)"
        return "torch", "cpu", "no GPU found; PyTorch on the CPU"
    if is_installed("mlx"):
        return "mlx", "cpu", "no GPU found and PyTorch not installed; MLX on the CPU"
    raise LorafitError("no backend installed: install PyTorch (pip install torch) or MLX "
                       f"({INSTALL_HINT['mlx']})")


def get_backend(name: str = "auto", device: str | None = None,
                verbose: bool = False) -> Backend:
    """A backend object by name ('auto', 'torch', 'mlx') and optional device."""
    if name not in NAMES:
        raise LorafitError(f"unknown backend {name!r}: choose one of {', '.join(NAMES)}")
    reason = None
    if name == "auto":
        name, auto_device, reason = choose_auto()
        device = device or auto_device
    if not is_installed(name):
        raise LorafitError(f"backend {name!r} is not installed: {INSTALL_HINT[name]}")
    if name == "torch":
        from lorafit.backends.torch import TorchBackend

        backend = TorchBackend(device or "cpu")
    else:
        from lorafit.backends.mlx import MLXBackend

        backend = MLXBackend(device)
    if verbose and reason:
        print(f"backend: {backend.name} on {backend.device} ({reason})", file=sys.stderr)
    return backend
