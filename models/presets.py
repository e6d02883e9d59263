"""Shape-only model configs (no weights) for the models users fine-tune most.

Each `presets/<name>.json` is the architecture part of the model's published config.json,
with `source` (where the numbers come from) and `hub_id`. Used by the estimator, so a user
can ask whether a run fits before downloading anything.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from lorafit.core.errors import LorafitError

PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _by_hub_id() -> dict:
    out = {}
    for name in list_presets():
        hub = json.loads((PRESET_DIR / f"{name}.json").read_text()).get("hub_id")
        if hub:
            out[hub.lower()] = name
    return out


def find_preset(name: str) -> str | None:
    """A preset name for a preset name or a known hub id (case-insensitive)."""
    key = name.lower()
    if key in list_presets():
        return key
    return _by_hub_id().get(key)


def load_preset(name: str) -> dict:
    found = find_preset(name)
    if found is None:
        close = difflib.get_close_matches(name.lower(), list_presets() + list(_by_hub_id()),
                                          n=4, cutoff=0.4)
        hint = f"; close matches: {', '.join(close)}" if close else \
            f"; presets: {', '.join(list_presets())}"
        raise LorafitError(f"unknown model or preset {name!r}{hint}")
    return json.loads((PRESET_DIR / f"{found}.json").read_text())
