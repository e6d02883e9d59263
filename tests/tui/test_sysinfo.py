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


# `ioreg -r -d 1 -w 0 -c IOAccelerator` on an M1 Pro (abridged): the legend names counters
# too, and "In use system memory (driver)" is not "In use system memory"
IOREG = """\
+-o AGXAcceleratorG13X  <class AGXAcceleratorG13X, id 0x100000a1f, registered, matched, \
active, busy 0 (1 ms), retain 77>
    {
      "IOClass" = "AGXAcceleratorG13X"
      "IOReportLegend" = ({"IOReportChannels"=((1,2,"Alloc system memory"),(3,4,"In use \
system memory"))})
      "PerformanceStatistics" = {"In use system memory (driver)"=0,"Alloc system memory"=\
52967440384,"Tiler Utilization %"=10,"recoveryCount"=0,"Device Utilization %"=16,"In use \
system memory"=2363801600,"Renderer Utilization %"=14}
      "model" = "Apple M1 Pro"
      "gpu-core-count" = 16
    }
    
"""


@pytest.mark.real_usage  # the real sampler, on a make-believe Mac
def test_the_apple_gpu_is_read_from_ioreg(monkeypatch):
    gb = 32 * 2**30
    assert sysinfo.parse_ioreg(IOREG, gb) == [("Apple M1 Pro", 16.0, 2363801600, gb)]
    renderer_only = IOREG.replace('"Device Utilization %"=16,', "")
    assert sysinfo.parse_ioreg(renderer_only, gb)[0][1] == 14.0
    assert sysinfo.parse_ioreg("+-o IOAccelerator  <class X>\n    {\n    }\n", gb) == []
    assert sysinfo.parse_ioreg(IOREG.replace("=16,", "=250,"), gb) == []  # not a percentage

    calls = []

    class Done:
        stdout = IOREG

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return Done()
    monkeypatch.setattr(sysinfo.sys, "platform", "darwin")
    monkeypatch.setattr(sysinfo.shutil, "which", lambda name: f"/usr/sbin/{name}"
                        if name == "ioreg" else None)
    monkeypatch.setattr(sysinfo.subprocess, "run", fake_run)
    u = sysinfo.UsageSampler().sample(None)  # no nvidia-smi here: the Apple GPU
    assert calls == [["/usr/sbin/ioreg", "-r", "-d", "1", "-w", "0", "-c", "IOAccelerator"]]
    assert u.gpus[0][:3] == ("Apple M1 Pro", 16.0, 2363801600)
    assert sysinfo.usage_text(u).splitlines()[-1].startswith("gpu 16%  2.2/")
    monkeypatch.setattr(sysinfo.sys, "platform", "linux")
    assert sysinfo.metal_gpus() == []


@pytest.mark.real_usage
def test_the_sampler_sums_the_processes_of_a_several_process_run():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        s = sysinfo.UsageSampler()
        s.sample([os.getpid(), child.pid])
        sum(i * i for i in range(2_000_000))
        both = s.sample([os.getpid(), child.pid])
        me = s.sample(os.getpid())
        assert both.trainers == 2 and me.trainers == 1
        assert both.trainer_rss > me.trainer_rss > 10 * 2**20
        assert sysinfo.usage_text(both).startswith(f"cpu {both.cpu:.0f}%  2 trainers ")
    finally:
        child.kill()
        child.wait()
