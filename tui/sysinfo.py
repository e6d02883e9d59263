"""CPU and GPU utilisation for the run screen, without a framework: psutil for the host and
the trainer process, `nvidia-smi` for NVIDIA GPUs (Metal has no such counter to read)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field


@dataclass
class Usage:
    cpu: float | None = None  # whole machine, percent
    trainer_cpu: float | None = None  # the trainer process, percent of one core
    trainer_rss: int | None = None  # bytes
    gpus: list = field(default_factory=list)  # (name, utilisation %, used, total bytes)


class UsageSampler:
    """Call `sample()` every second or two: CPU percentages are deltas since the last call."""

    def __init__(self):
        self._proc = None

    def sample(self, pid: int | None) -> Usage:
        import psutil

        u = Usage(cpu=psutil.cpu_percent(interval=None))
        if pid:
            try:
                if self._proc is None or self._proc.pid != pid:
                    self._proc = psutil.Process(pid)
                    self._proc.cpu_percent(interval=None)  # starts the delta
                u.trainer_cpu = self._proc.cpu_percent(interval=None)
                u.trainer_rss = self._proc.memory_info().rss
            except (psutil.Error, OSError):
                self._proc = None
        u.gpus = nvidia_gpus()
        return u


NVIDIA_QUERY = ["--query-gpu=name,utilization.gpu,memory.used,memory.total",
                "--format=csv,noheader,nounits"]


def nvidia_gpus() -> list[tuple[str, float, int, int]]:
    """[(name, utilisation %, used bytes, total bytes)] of each NVIDIA GPU; [] without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, *NVIDIA_QUERY], capture_output=True, text=True,
                             timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> list[tuple[str, float, int, int]]:
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            gpus.append((parts[0], float(parts[1]), int(float(parts[2])) * 2**20,
                         int(float(parts[3])) * 2**20))
        except ValueError:
            continue  # "[N/A]" on some boards
    return gpus


def usage_text(u: Usage) -> str:
    """One or two short lines: 'cpu 45%  trainer 180% 1.2 GiB' / 'gpu 80% 10.1/24.0 GiB'."""
    parts = []
    if u.cpu is not None:
        parts.append(f"cpu {u.cpu:.0f}%")
    if u.trainer_cpu is not None:
        parts.append(f"trainer {u.trainer_cpu:.0f}%"
                     + (f" {u.trainer_rss / 2**30:.1f}G" if u.trainer_rss else ""))
    lines = ["  ".join(parts)] if parts else []
    for i, (_, util, used, total) in enumerate(u.gpus):
        lines.append(f"gpu{i if len(u.gpus) > 1 else ''} {util:.0f}%  "
                     f"{used / 2**30:.1f}/{total / 2**30:.1f} GiB")
    return "\n".join(lines)
