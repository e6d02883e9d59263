"""`lorafit env`: the backends installed, their devices and memory, and auto's choice."""

from __future__ import annotations


def main() -> int:
    from lorafit.backends.envinfo import describe

    print(describe())
    return 0
