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
