"""Package structure: only backends/ imports a framework, and every module imports on
Python 3.10 (no tomllib: the tomli fallback)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORK_IMPORT = re.compile(r"^\s*(import|from)\s+(torch|mlx)\b", re.M)


def package_modules() -> list[Path]:
    """Every .py file of the lorafit package: the repository root less tests/ and any
    virtual environment or build folder."""
    skip = {"tests", "build", "dist"}
    return [p for p in ROOT.rglob("*.py")
            if not (set(p.relative_to(ROOT).parts[:-1]) & skip)
            and not any(part.startswith(".") or part.endswith(".egg-info")
                        for part in p.relative_to(ROOT).parts)]


def test_only_backends_import_torch_or_mlx():
    mods = package_modules()
    assert ROOT / "cli.py" in mods and ROOT / "commands" / "train.py" in mods
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}"
                 for p in mods if p.relative_to(ROOT).parts[0] != "backends"
                 for m in FRAMEWORK_IMPORT.finditer(p.read_text())]
    assert not offenders, "import torch/mlx only in backends/:\n" + "\n".join(offenders)


BLOCK_TOMLLIB = r"""
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "tomllib" or name.startswith("tomllib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.modules.pop("tomllib", None)
sys.meta_path.insert(0, Block())
import lorafit
names = ["lorafit"] + [m.name for m in pkgutil.walk_packages(lorafit.__path__, "lorafit.")
                       if ".tests" not in m.name]
for name in names:
    importlib.import_module(name)
from lorafit.core import config
assert config.tomllib.__name__ == "tomli", config.tomllib
assert "tomllib" not in sys.modules
print(len(names))
"""


def test_every_module_imports_without_tomllib(tmp_path):
    pytest.importorskip("tomli")
    proc = subprocess.run([sys.executable, "-c", BLOCK_TOMLLIB], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 20


def test_toml_config_reads_through_tomli(tmp_path):
    pytest.importorskip("tomli")
    (tmp_path / "c.toml").write_text('[lora]\nrank = 4\n[train]\nlr = 0.01\n')
    code = (BLOCK_TOMLLIB.split("import lorafit")[0] +
            "from lorafit.core.config import resolve, tomllib\n"
            "assert tomllib.__name__ == 'tomli'\n"
            f"c = resolve({str(tmp_path / 'c.toml')!r}, {{}}); print(c.rank, c.lr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4", "0.01"]
