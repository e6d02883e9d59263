"""The adapters a server offers, by name: given on the command line (NAME=PATH) or found as
folders of --adapter-dir, read from disk on first use, at most `max_loaded` held by the
engine and, with `max_bytes`, at most that many bytes of stacked adapter factors (least
recently used first out, never one a request is using; an evicted one is read again when a
request names it).

A request only ever names an adapter; the path comes from this table, never from the
request, so no request can make the server read a file it was not given. Names are plain
folder names (letters, digits, `._-`), and a folder in --adapter-dir is only found by
listing that folder.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import OrderedDict
from pathlib import Path

from lorafit.core import adapter_io, rundir
from lorafit.core.errors import LorafitError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def adapter_folder(path: str | Path) -> Path:
    """The adapter a folder stands for: itself (PEFT or mlx-lm layout), or a lorafit run's
    final adapter (else its best one, else its latest checkpoint)."""
    path = Path(path)
    if rundir.is_run_dir(path):
        for candidate in (rundir.adapter_path(path), rundir.best_adapter_path(path)):
            if candidate.is_dir():
                return candidate
        checkpoints = rundir.checkpoint_dirs(path)
        if checkpoints:
            return checkpoints[-1][1]
        raise LorafitError(f"{path}: a lorafit run with no adapter saved yet")
    return path


def is_adapter_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / adapter_io.PEFT_CONFIG).exists() or rundir.is_run_dir(path))


class AdapterStore:
    def __init__(self, engine, named: dict | None = None, folder: str | Path | None = None,
                 max_loaded: int = 8, reserved: tuple = (), max_bytes: int | None = None):
        self.engine, self.max_loaded = engine, max(1, max_loaded)
        self.max_bytes = max_bytes
        self.folder = Path(folder) if folder else None
        self.reserved = set(reserved)  # names that are not adapters (the base model's)
        self.named: dict = {}
        for name, path in (named or {}).items():
            self._check_name(name)
            self.named[name] = Path(path)
        self._loaded: OrderedDict = OrderedDict()  # name -> None, oldest first
        self._locks: dict = {}
        self._mutex = threading.Lock()
        self._pins: dict = {}  # name -> requests between ensure() and their submit
        self.loads = 0

    def _check_name(self, name: str) -> None:
        if not NAME.match(name) or name in self.reserved:
            raise LorafitError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-', "
                               "and not the base model's name")

    def names(self) -> list:
        """Every adapter name on offer (listed, not loaded)."""
        found = set(self.named)
        if self.folder is not None and self.folder.is_dir():
            found |= {p.name for p in self.folder.iterdir()
                      if NAME.match(p.name) and p.name not in self.reserved
                      and is_adapter_folder(p)}
        return sorted(found)

    def loaded(self) -> list:
        return list(self._loaded)

    def path_of(self, name: str) -> Path | None:
        """The folder of an adapter name, or None when there is no such adapter."""
        if name in self.named:
            return self.named[name]
        if self.folder is None or not NAME.match(name) or name in self.reserved:
            return None
        for p in self.folder.iterdir():  # found by listing, never by joining a request's text
            if p.name == name and is_adapter_folder(p):
                return p
        return None

    def load_now(self, name: str) -> None:
        """Read an adapter and hand it to the engine (blocking: startup, or a worker thread).
        Raises LorafitError for a broken adapter or one made for another base model."""
        path = self.path_of(name)
        if path is None:
            raise KeyError(name)
        cfg, adapter = adapter_io.load_any(adapter_folder(path))
        try:
            self.engine.add_adapter(name, cfg, adapter)
        except LorafitError as e:
            raise LorafitError(f"adapter {name} does not fit this base model: {e}") from None
        with self._mutex:
            self._loaded[name] = None
            self._loaded.move_to_end(name)
            self.loads += 1
            self._evict(keep=name)

    def resident_bytes(self) -> int:
        """Bytes the engine holds for the loaded adapters (their stacked factors)."""
        return self.engine.memory_bytes()["adapters"]

    def _over(self) -> bool:
        return len(self._loaded) > self.max_loaded or (
            self.max_bytes is not None and self.resident_bytes() > self.max_bytes)

    def _evict(self, keep: str) -> None:
        """Drop least recently used adapters while over max_loaded or max_bytes, never
        `keep` (just asked for) nor one a request is using: the bound is met once they are
        done, at the next load."""
        for old in list(self._loaded):
            if not self._over():
                return
            if old == keep or self.engine.in_use(old) or self._pins.get(old):
                continue
            try:
                self.engine.remove_adapter(old)
            except LorafitError:  # became in use meanwhile
                continue
            del self._loaded[old]

    def pin(self, name: str) -> None:
        """Keep `name` from eviction until unpin (a request about to be submitted)."""
        self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        self._pins[name] -= 1
        if not self._pins[name]:
            del self._pins[name]

    async def ensure(self, name: str) -> None:
        """Have `name` loaded (reading it in a worker thread on first use, so requests for
        other adapters keep running). KeyError: no such adapter; LorafitError: unusable."""
        with self._mutex:
            if name in self._loaded and name in self.engine.adapters():
                self._loaded.move_to_end(name)
                return
        if self.path_of(name) is None:  # before a lock is made for a made-up name
            raise KeyError(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self.engine.adapters():
                await asyncio.to_thread(self.load_now, name)
