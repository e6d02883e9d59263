"""CPU and GPU utilisation for the run screen, without a framework: psutil for the host and
the trainer process, `nvidia-smi` for NVIDIA GPUs, and on a Mac the Apple GPU's own counters
as `ioreg` prints them (no root needed, unlike `powermetrics`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field


@dataclass
class Usage:
    cpu: float | None = None  # whole machine, percent
    trainer_cpu: float | None = None  # the trainer process(es), percent of one core
    trainer_rss: int | None = None  # bytes
    gpus: list = field(default_factory=list)  # (name, utilisation %, used, total bytes)
    trainers: int = 1  # processes summed in trainer_cpu / trainer_rss (`train --nproc`)


class UsageSampler:
    """Call `sample()` every second or two: CPU percentages are deltas since the last call."""

    def __init__(self):
        self._procs: dict = {}  # pid -> psutil.Process, kept for the CPU deltas

    def sample(self, pids) -> Usage:
        """The machine, and the trainer: one pid, or the pids of its ranks (summed)."""
        import psutil

        u = Usage(cpu=psutil.cpu_percent(interval=None))
        pids = [p for p in ([pids] if isinstance(pids, int) else pids or []) if p]
        cpu, rss, alive = 0.0, 0, 0
        for pid in pids:
            try:
                proc = self._procs.get(pid)
                if proc is None:
                    proc = self._procs[pid] = psutil.Process(pid)
                    proc.cpu_percent(interval=None)  # starts the delta
                cpu += proc.cpu_percent(interval=None)
                rss += proc.memory_info().rss
                alive += 1
            except (psutil.Error, OSError):
                self._procs.pop(pid, None)
        self._procs = {p: v for p, v in self._procs.items() if p in pids}
        if alive:
            u.trainer_cpu, u.trainer_rss, u.trainers = cpu, rss, alive
        u.gpus = nvidia_gpus() or metal_gpus()
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


IOREG_QUERY = ["-r", "-d", "1", "-w", "0", "-c", "IOAccelerator"]


def metal_gpus() -> list[tuple[str, float, int, int]]:
    """[(name, utilisation %, used bytes, total bytes)] of a Mac's GPU from the IOKit
    registry (`ioreg`, the accelerator's PerformanceStatistics); [] elsewhere. Its memory
    is the machine's unified memory, so total is the RAM."""
    exe = shutil.which("ioreg") if sys.platform == "darwin" else None
    if not exe:
        return []
    try:
        out = subprocess.run([exe, *IOREG_QUERY], capture_output=True, text=True,
                             timeout=2).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    import psutil

    return parse_ioreg(out, psutil.virtual_memory().total)


_STATS = re.compile(r'"PerformanceStatistics"\s*=\s*\{([^}]*)\}')
_MODEL = re.compile(r'"model"\s*=\s*"([^"]*)"')


def parse_ioreg(text: str, total: int) -> list[tuple[str, float, int, int]]:
    """Each accelerator node of `ioreg -r -d 1 -w 0 -c IOAccelerator`: its model, "Device
    Utilization %" (else "Renderer Utilization %") and "In use system memory" (the key
    matched whole: "In use system memory (driver)" is another counter)."""
    gpus = []
    for node in text.split("+-o ")[1:]:
        stats = _STATS.search(node)
        if not stats:
            continue
        values = {k: int(v) for k, v in re.findall(r'"([^"]+)"\s*=\s*(\d+)', stats.group(1))}
        util = values.get("Device Utilization %", values.get("Renderer Utilization %"))
        if util is None or not 0 <= util <= 100:
            continue
        model = _MODEL.search(node)
        name = model.group(1) if model else node.split()[0]
        gpus.append((name, float(util), values.get("In use system memory", 0), total))
    return gpus


def usage_text(u: Usage) -> str:
    """One or two short lines: 'cpu 45%  trainer 180% 1.2 GiB' / 'gpu 80% 10.1/24.0 GiB'."""
    parts = []
    if u.cpu is not None:
        parts.append(f"cpu {u.cpu:.0f}%")
    if u.trainer_cpu is not None:
        who = f"{u.trainers} trainers" if u.trainers > 1 else "trainer"
        parts.append(f"{who} {u.trainer_cpu:.0f}%"
                     + (f" {u.trainer_rss / 2**30:.1f}G" if u.trainer_rss else ""))
    lines = ["  ".join(parts)] if parts else []
    for i, (_, util, used, total) in enumerate(u.gpus):
        lines.append(f"gpu{i if len(u.gpus) > 1 else ''} {util:.0f}%  "
                     f"{used / 2**30:.1f}/{total / 2**30:.1f} GiB")
    return "\n".join(lines)
