"""The families lorafit can load, found by config.json's `model_type`.

A family is a small description: how its config.json maps onto `ModelArgs` switches
(`configure`) and which checkpoint tensors to drop or rename (`sanitize`). The forward code
is shared (models/decoder.py), so adding a variant is a few lines here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lorafit.core.errors import LorafitError
from lorafit.models.families import (exaone4, gemma, glm4, gpt_oss, granite, llama,
                                     ministral3, mistral3, mixtral, olmo, phi3, qwen3_5,
                                     qwen3_moe, qwen3_next, smollm3, starcoder2)


@dataclass(frozen=True)
class Family:
    model_type: str
    configure: Callable[[dict], dict]  # config.json -> the same dict with switches set
    sanitize: Callable[[dict, object], dict]  # checkpoint tensors -> the model's
    # checkpoint keys the model does not have but the family converts (e.g. per-expert
    # MoE weights), and the conversion (ops, weights, args) -> weights, run after reading
    checkpoint_key: object = None  # a compiled regex, matched at the start of a key
    convert: Callable | None = None
    rename: Callable[[str], str] = str  # a checkpoint tensor's name -> the model's, as read
    # config.json as written for other readers (mlx-lm, the Hub's layout), for exports
    published: Callable[[dict], dict] = dict
    # (model array name, shape) -> the checkpoint tensors [(name as renamed, shape)] whose
    # contents laid end to end are that array (the per-expert tensors convert stacks), or
    # None: what lets --shard read a slice of a converted array (models/loader.py)
    stacked: Callable | None = None


# Each family module holds CONFIGURE {model_type: config.json -> switches} and sanitize.
FAMILY_MODULES = (llama, phi3, olmo, ministral3, mistral3, granite, smollm3, exaone4,
                  starcoder2, glm4, gemma, qwen3_5, qwen3_next, mixtral, qwen3_moe, gpt_oss)
FAMILIES = {mt: Family(mt, configure, module.sanitize, getattr(module, "CHECKPOINT_KEY", None),
                       getattr(module, "convert", None), getattr(module, "rename", str),
                       getattr(module, "PUBLISHED", {}).get(mt, dict),
                       getattr(module, "stacked", None))
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


def published_config(cfg: dict) -> dict:
    """A copy of config.json with the keys other readers expect beside transformers' own
    (an exported model's config): unchanged for most families."""
    f = FAMILIES.get(cfg.get("model_type"))
    return f.published(cfg) if f else dict(cfg)
