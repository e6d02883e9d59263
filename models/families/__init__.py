"""The families lorafit can load, found by config.json's `model_type`.

A family is a small description: how its config.json maps onto `ModelArgs` switches
(`configure`) and which checkpoint tensors to drop or rename (`sanitize`). The forward code
is shared (models/decoder.py), so adding a variant is a few lines here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lorafit.core.errors import LorafitError
from lorafit.models.families import llama, qwen3_5, qwen3_next


@dataclass(frozen=True)
class Family:
    model_type: str
    configure: Callable[[dict], dict]  # config.json -> the same dict with switches set
    sanitize: Callable[[dict, object], dict]  # checkpoint tensors -> the model's
    rename: Callable[[str], str] = str  # a checkpoint tensor's name -> the model's, as read


# Each family module holds CONFIGURE {model_type: config.json -> switches} and sanitize.
FAMILY_MODULES = (llama, qwen3_5, qwen3_next)
FAMILIES = {mt: Family(mt, configure, module.sanitize, vars(module).get("rename", str))
            for module in FAMILY_MODULES for mt, configure in module.CONFIGURE.items()}


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise LorafitError(f"model_type {model_type!r} is not supported; supported: "
                           f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def model_args(cfg: dict):
    """The decoder description of a config.json dict (one-line error for unknown types)."""
    from lorafit.models.spec import ModelArgs

    fam = family(cfg.get("model_type"))
    return ModelArgs.from_config(fam.configure(dict(cfg)))
