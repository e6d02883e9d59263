"""Device probing without building a backend: which device a run would use, and how much
memory that device offers. Used by `lorafit estimate` and train's pre-flight check, before
any model is loaded."""

from __future__ import annotations

from lorafit.backends import choose_auto


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def metal_available() -> bool:
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return mx.metal.is_available()


def resolve_backend(backend: str, device: str | None = None) -> tuple[str, str]:
    """(backend, device) that `get_backend(backend, device)` would give, without building
    it. MLX's "gpu" is reported as "metal"."""
    if backend == "auto":
        backend, auto_device, _ = choose_auto()
        device = device or auto_device
    elif device is None:
        device = ("cuda" if backend == "torch" and cuda_available() else
                  "metal" if backend == "mlx" and metal_available() else "cpu")
    return backend, {"gpu": "metal"}.get(device, device)


def device_memory(backend: str, device: str) -> tuple[int | None, str]:
    """(bytes, description) of the memory a run on this device can use; (None, why) when
    this machine does not have the device (estimating for another machine is allowed)."""
    import psutil

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not cuda_available():
            return None, "no CUDA device on this machine"
        import torch

        i = int(index) if index.isdigit() else 0
        if i >= torch.cuda.device_count():
            return None, f"no device {device} on this machine"
        free, total = torch.cuda.mem_get_info(i)
        return total, f"{torch.cuda.get_device_name(i)} memory"
    if kind in ("metal", "mps", "gpu"):
        if not metal_available():
            try:
                import torch

                mps = torch.backends.mps.is_available()
            except ImportError:
                mps = False
            if not mps:
                return None, "no Metal device on this machine"
        try:
            import mlx.core as mx

            info = mx.metal.device_info()
            size = int(info.get("max_recommended_working_set_size") or 0)
            if size:
                return size, "Metal's recommended working set"
        except Exception:
            pass
        return psutil.virtual_memory().total, "Apple unified memory"
    return psutil.virtual_memory().available, "available host RAM"


def process_limit(backend: str, device: str | None = None) -> tuple[int, str]:
    """(most, what) data-parallel processes (`train --nproc`) this machine gives a run: one
    per CUDA GPU, else one per CPU core (CPU processes, or processes sharing one Apple GPU)."""
    import os

    backend, device = resolve_backend(backend, device)
    if device.split(":")[0] == "cuda" and cuda_available():
        import torch

        n = torch.cuda.device_count()
        return n, f"{n} CUDA device{'s' if n != 1 else ''}"
    n = os.cpu_count() or 1
    return n, f"{n} CPU core{'s' if n != 1 else ''}"
