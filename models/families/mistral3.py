"""The text tower of Mistral 3 vision-language checkpoints (Mistral3ForConditionalGeneration:
Ministral 3, Mistral Small 3.x), trained as a text-only model.

config.json nests the language model under `text_config` (model_type ministral3 or
mistral), configured here by that family; its weights are under `model.language_model.`
(what transformers 5 writes) or `language_model.model.` / `language_model.lm_head.` (the
Hub's older layout), renamed to the causal-LM names as they are read. The vision tower
and the multi-modal projector keep names the model does not have, so they are not loaded.
"""

from __future__ import annotations

from lorafit.core.errors import LorafitError
from lorafit.models.families import llama, ministral3, qwen3_5

rename = qwen3_5.rename  # the same prefixes

TEXT_FAMILIES = {"mistral": llama.CONFIGURE["mistral"], **ministral3.CONFIGURE}


def _mistral3(cfg: dict) -> dict:
    text = dict(cfg.get("text_config") or {})
    inner = text.get("model_type", "mistral")
    if inner not in TEXT_FAMILIES:
        raise LorafitError(f"mistral3 with a {inner!r} text model is not supported; "
                           f"supported: {', '.join(sorted(TEXT_FAMILIES))}")
    # transformers ties the head by the top-level flag (the text config's is not read)
    text["tie_word_embeddings"] = cfg.get("tie_word_embeddings",
                                          text.get("tie_word_embeddings", False))
    text = TEXT_FAMILIES[inner](text)
    text["model_type"] = cfg["model_type"]
    return text


CONFIGURE = {"mistral3": _mistral3}


def sanitize(weights: dict, args) -> dict:
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights
