"""`lorafit env`: the backends installed, their devices and memory, and auto's choice."""

from __future__ import annotations

import platform
import sys

import psutil

from lorafit.backends import INSTALL_HINT, choose_auto, is_installed
from lorafit.core.blas import advice, current_blas


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def torch_lines() -> list[str]:
    if not is_installed("torch"):
        return [f"torch: not installed ({INSTALL_HINT['torch']})"]
    import torch

    lines = [f"torch {torch.__version__}: cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            lines.append(f"  cuda:{i} {torch.cuda.get_device_name(i)}: {_gib(total)} "
                         f"({_gib(free)} free), bf16 "
                         f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append("  cuda: none")
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"  mps: {'available' if mps and mps.is_available() else 'none'}")
    return lines


def mlx_lines() -> list[str]:
    if not is_installed("mlx"):
        return [f"mlx: not installed ({INSTALL_HINT['mlx']})"]
    import mlx.core as mx

    lines = [f"mlx {mx.__version__}: cpu (BLAS: {current_blas()})"]
    if mx.metal.is_available():
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        lines.append(f"  metal: {info.get('device_name', 'Apple GPU')}, "
                     f"{_gib(info.get('memory_size', 0))} unified memory")
    else:
        lines.append("  metal: none")
    tip = advice()
    if tip:
        lines.append(f"  note: {tip}")
    return lines


def describe() -> str:
    vm = psutil.virtual_memory()
    lines = [f"host: {platform.system()} {platform.machine()}, Python "
             f"{sys.version.split()[0]}, {psutil.cpu_count(logical=True)} CPUs, "
             f"{_gib(vm.total)} RAM ({_gib(vm.available)} available)"]
    lines += torch_lines() + mlx_lines()
    try:
        name, device, reason = choose_auto()
        lines.append(f"auto: {name} on {device} ({reason})")
    except Exception as e:  # no backend at all
        lines.append(f"auto: none ({e})")
    return "\n".join(lines)
