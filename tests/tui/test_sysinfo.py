"""CPU and GPU utilisation on the run screen (issue 17)."""

from __future__ import annotations

import asyncio
import os

import pytest

from lorafit.tui import sysinfo
from test_tui import fixed_runs, panel_text  # noqa: F401


@pytest.mark.real_usage
def test_the_sampler_reads_this_machine_and_a_live_process():
    s = sysinfo.UsageSampler()
    s.sample(os.getpid())
    sum(i * i for i in range(2_000_000))  # some CPU time for the delta
    u = s.sample(os.getpid())
    assert 0 <= u.cpu <= 100 and u.trainer_cpu > 0 and u.trainer_rss > 10 * 2**20
    gone = s.sample(2**22 + 12345)  # no such process: no trainer numbers, no error
    assert gone.trainer_cpu is None


def test_nvidia_smi_lines_are_parsed_and_odd_ones_skipped():
    text = ("NVIDIA H200, 87, 10240, 143771\n"
            "Tesla T4, [N/A], 100, 15360\n"
            "garbage\n")
    assert sysinfo.parse_nvidia_smi(text) == [("NVIDIA H200", 87.0, 10240 * 2**20,
                                               143771 * 2**20)]
    u = sysinfo.Usage(cpu=12, trainer_cpu=99, trainer_rss=2**30,
                      gpus=sysinfo.parse_nvidia_smi(text))
    assert sysinfo.usage_text(u) == "cpu 12%  trainer 99% 1.0G\ngpu 87%  10.0/140.4 GiB"


def test_the_run_screen_shows_cpu_and_gpu_utilisation(fixed_runs, monkeypatch):
    from lorafit.tui.app import LorafitApp

    usage = sysinfo.Usage(cpu=55, trainer_cpu=140, trainer_rss=2**31,
                          gpus=[("GPU", 91.0, 20 * 2**30, 80 * 2**30)])
    monkeypatch.setattr(sysinfo.UsageSampler, "sample", lambda self, pid: usage)

    async def scenario():
        app = LorafitApp(watch=fixed_runs / "lr-1e-3", runs_root=fixed_runs)
        async with app.run_test(size=(120, 36)) as pilot:
            await pilot.pause(0.5)
            text = panel_text(app.screen, "#side")
            assert "cpu 55%  trainer 140% 2.0G" in text and "gpu 91%  20.0/80.0 GiB" in text
    asyncio.run(scenario())
