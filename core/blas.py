"""Which BLAS MLX's CPU path uses on Linux, and how to get a fast one.

The `mlx[cpu]` wheel for Linux links the reference BLAS (libblas.so.3), ~25x slower than
OpenBLAS. Debian's `libopenblas0-pthread` ships a drop-in libblas.so.3; preloading it
gives MLX OpenBLAS speed with identical results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/openblas-pthread/libblas.so.3",
)
REEXEC_FLAG = "LORAFIT_BLAS_REEXEC"


def optimised_blas() -> str | None:
    for path in OPENBLAS_CANDIDATES:
        if Path(path).exists():
            return path
    return None


def current_blas() -> str:
    """A description of the BLAS MLX would use in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    preload = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preload:
        return f"OpenBLAS (preloaded: {preload})"
    return "reference BLAS bundled with mlx[cpu] (slow)"


def advice() -> str | None:
    if sys.platform != "linux" or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return None
    if optimised_blas():
        return ("OpenBLAS is installed; lorafit preloads it for MLX runs automatically "
                "(or set LD_PRELOAD=" + optimised_blas() + ")")
    return ("MLX on Linux uses a slow reference BLAS: `apt-get install libopenblas0-pthread` "
            "and lorafit will preload it for MLX runs")


def runs_mlx(argv: list[str]) -> bool:
    """Whether this command line will run MLX in this process, so that preloading OpenBLAS
    helps. Torch must not get it: the preloaded libblas.so.3 takes over torch's own BLAS
    symbols and its threads fight torch's (a CPU training step measured 2.8x slower). MLX
    runs are those that ask for it (`--backend mlx`, or a config file or `--resume` run
    whose backend is mlx) and a machine where only MLX is installed. Not the TUI: the
    trainers it starts inherit its environment, and each decides for itself."""
    import importlib.util

    from lorafit.core.config import tomllib
    from lorafit.core.rundir import config_path

    configs = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if arg == "--backend" or arg.startswith("--backend="):
            return (arg.split("=", 1)[1] if "=" in arg else value) == "mlx"
        if arg.endswith(".toml"):
            configs.append(Path(arg))
        if arg == "--resume" and value:
            configs.append(config_path(value))
    for path in configs:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the command itself reports a missing or broken file
        tables = [raw, *(v for v in raw.values() if isinstance(v, dict))]
        if any(t.get("backend") == "mlx" for t in tables):
            return True
    return importlib.util.find_spec("torch") is None and \
        importlib.util.find_spec("mlx") is not None


def reexec_with_openblas(argv: list[str]) -> None:
    """Re-run this process with OpenBLAS preloaded, once, when it helps."""
    if sys.platform != "linux" or os.environ.get(REEXEC_FLAG):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = optimised_blas()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    env[REEXEC_FLAG] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lorafit.cli", *argv], env)
