"""Help with typing paths on the set-up screen: completion for the model field (presets,
models in the Hugging Face cache, local folders) and a file picker for the data file.
Typing the path by hand always works too."""

from __future__ import annotations

import os
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import DirectoryTree, Label

DATA_SUFFIXES = (".jsonl", ".json")


def cached_hub_models() -> list[str]:
    """Repo ids of the models in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import scan_cache_dir

        return sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
    except Exception:  # no cache yet, or an unreadable one
        return []


def folder_completions(text: str) -> list[str]:
    """Folders that complete a typed path ('./mod' -> './models/'), sorted."""
    if not text or ("/" not in text and not text.startswith(("~", "."))):
        return []
    head, _, prefix = text.rpartition("/")
    base = Path(os.path.expanduser(head or "/")) if "/" in text else Path(".")
    try:
        names = sorted(e.name for e in os.scandir(base) if e.is_dir()
                       and e.name.startswith(prefix) and not e.name.startswith("."))
    except OSError:
        return []
    return [f"{head}/{n}/" if "/" in text else f"{n}/" for n in names]


class ModelSuggester(Suggester):
    """Ghost-text completion for the model field: a local folder as you type a path,
    otherwise a preset name or a cached hub id starting with what was typed (right arrow
    accepts)."""

    def __init__(self):
        super().__init__(use_cache=False, case_sensitive=True)
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            from lorafit.models.presets import list_presets

            self._names = sorted(set(list_presets()) | set(cached_hub_models()))
        return self._names

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        for candidate in folder_completions(value):
            if candidate != value:
                return candidate
        low = value.lower()
        for name in self.names():
            if name.lower().startswith(low) and name != value:
                return value + name[len(value):]
        return None


class DataTree(DirectoryTree):
    """Folders and data files only (JSONL / JSON), hidden entries left out."""

    def filter_paths(self, paths):
        return [p for p in paths if not p.name.startswith(".") and
                (p.is_dir() or p.suffix in DATA_SUFFIXES)]


class DataFilePicker(ModalScreen):
    """Choose the data file from a folder tree; Enter on a file picks it, Esc cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, start: str | Path = "."):
        super().__init__()
        start = Path(start).expanduser()
        self.start = start if start.is_dir() else (start.parent if start.parent.is_dir()
                                                    else Path("."))

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-dialog", classes="dialog"):
            yield Label(f"Choose a data file (.jsonl / .json) under {self.start.resolve()}; "
                        "Enter picks, Esc cancels")
            yield DataTree(self.start, id="picker-tree")

    def on_mount(self) -> None:
        self.query_one(DataTree).focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.dismiss(str(event.path))

    def action_cancel(self) -> None:
        self.dismiss(None)
