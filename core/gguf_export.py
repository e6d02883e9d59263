"""GGUF files for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's own
writer): a whole model, or a LoRA adapter alone (llama.cpp's `--lora` file).

Framework-free: Hugging Face tensor names and numpy arrays in, a .gguf file out. What
llama.cpp's converters do that the arrays do not say is done here the same way: tensor names
through gguf's TensorNameMap, the Llama q/k row permutation (llama.cpp's `llama` architecture
rotates interleaved pairs, Hugging Face checkpoints rotate halves), Llama 3's rope scaling as a
`rope_freqs` tensor, and the byte-level BPE tokenizer as token list, types and merges (a
SentencePiece-style one, byte fallback and `▁`, as llama.cpp's `llama` vocabulary with scores).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.core import gguf_families
from lorafit.core.errors import LorafitError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# tensors llama.cpp's converter keeps in f32 whatever the type (ggml's ssm_conv and the
# experts' bias add take f32 only; routers stay exact), biases too
KEEP_F32 = (".ssm_conv1d.", ".ffn_gate_inp.")


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp rotates interleaved pairs: undo HF's permutation
    scales: tuple = ()  # (config key, GGUFWriter method) pairs of multipliers
    norm_plus_one: bool = False  # Gemma's (1 + w) RMSNorm: llama.cpp stores 1 + w
    keys: object = None  # config -> writer: the family's own hyperparameters
    view: object = None  # config -> the config as the generic keys read it (Gemma 4)
    tensors: object = None  # (gguf, names, hf name, array, config) -> [(GGUF name, array)]
    extra: object = None  # config -> {GGUF name: array}: tensors the checkpoint has not
    no_lora: tuple = ()  # modules whose LoRA llama.cpp does not apply (matmul without it)
    tensor: object = None  # (HF name, array, config) -> [(HF name, array)]: llama.cpp's layout
    lora: object = None  # (module, A, B, config) -> (A, B): the same for an adapter's factors


def _layer_types(config: dict, pattern: int) -> list[str]:
    """The config's layer_types, or transformers' default from a period (every n-th layer
    full, as Gemma's older configs say with sliding_window_pattern)."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    n = config.get("sliding_window_pattern") or pattern
    return ["sliding_attention" if (i + 1) % n else "full_attention"
            for i in range(config["num_hidden_layers"])]


def _swa_keys(w, config: dict, pattern: int) -> None:
    """The window, and which layers use it, as llama.cpp reads them (a bool per layer)."""
    if config.get("sliding_window"):
        w.add_sliding_window(int(config["sliding_window"]))
        w.add_sliding_window_pattern([t == "sliding_attention"
                                      for t in _layer_types(config, pattern)])


def _gemma2_keys(w, config: dict) -> None:
    for key, method in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                        ("final_logit_softcapping", w.add_final_logit_softcapping)):
        if config.get(key) is not None:
            method(float(config[key]))
    _swa_keys(w, config, 2)


def _gemma3_keys(w, config: dict) -> None:
    if config.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    _swa_keys(w, config, 6)
    local = _rope_by_type(config).get("sliding_attention") or \
        {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
    w.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))


def _moe_keys(w, config: dict) -> None:
    w.add_expert_count(config.get("num_local_experts") or config["num_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])


def _phi3_keys(w, config: dict) -> None:
    if config.get("sliding_window"):
        w.add_sliding_window(int(config["sliding_window"]))
    s = _longrope(config)
    if s:
        orig = config.get("original_max_position_embeddings",
                          s.get("original_max_position_embeddings"))
        w.add_rope_scaling_orig_ctx_len(int(orig))
        scale = config.get("max_position_embeddings", orig) / orig
        w.add_rope_scaling_attn_factors(s.get("attention_factor") or (
            1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))))


def olmo3_rope(config: dict) -> dict:
    """OLMo 3's RoPE per layer type as lorafit reads it (transformers 5's per-type
    rope_parameters, or the older rope_theta + rope_scaling: the scaling on full layers)."""
    from lorafit.models.families.olmo import CONFIGURE

    return CONFIGURE["olmo3"](dict(config))["rope_by_layer_type"]


def _olmo3_view(config: dict) -> dict:
    """OLMo 3's config with its layer types and window filled in (transformers' defaults)
    and the full layers' RoPE as the one the generic keys write."""
    from lorafit.models.families.olmo import CONFIGURE

    cfg = CONFIGURE["olmo3"](dict(config))
    view = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}
    view.update(layer_types=cfg["layer_types"], sliding_window=cfg["sliding_window"],
                rope_parameters=dict(cfg["rope_by_layer_type"].get("full_attention") or
                                     next(iter(cfg["rope_by_layer_type"].values()))))
    return view


def _olmo3_keys(w, config: dict) -> None:
    """llama.cpp's olmo2 with a window: its sliding layers run plain RoPE at the full
    layers' base (_olmo3_unexportable holds OLMo 3 to that), the full ones the generic
    rope keys (default, linear or YaRN with its betas and attention factor)."""
    _swa_keys(w, config, 4)
    full = config["rope_parameters"]
    if full.get("rope_type") == "yarn":
        _yarn_keys(w, full)


def _olmo3_unexportable(config: dict) -> list[str]:
    """llama.cpp's olmo2 runs plain RoPE on sliding layers, at the full layers' base, and
    plain, linear or YaRN RoPE on full ones."""
    by_type = olmo3_rope(config)
    local, full = by_type.get("sliding_attention"), by_type.get("full_attention")
    if full and full.get("rope_type", "default") not in ("default", "linear", "yarn"):
        return ["llama.cpp's olmo2 has plain, linear or YaRN RoPE on full layers (this "
                f"model: {full.get('rope_type')!r})"]
    if local and local.get("rope_type", "default") != "default":
        return ["llama.cpp's olmo2 has plain RoPE only on sliding layers (this model: "
                f"{local.get('rope_type')!r})"]
    if local and full and float(local["rope_theta"]) != float(full["rope_theta"]):
        return ["llama.cpp's olmo2 runs sliding layers' RoPE at the full layers' base "
                f"(this model: {local['rope_theta']} and {full['rope_theta']})"]
    return []


def _exaone4_keys(w, config: dict) -> None:
    """llama.cpp's exaone4 has windows only in the 64-layer (32B) layout, every 4th layer
    full; a window key on other layouts would turn RoPE off everywhere."""
    if config.get("sliding_window") and config["num_hidden_layers"] == 64:
        w.add_sliding_window(int(config["sliding_window"]))


# -- Gemma 4 (llama.cpp's gemma4) and Ministral 3 / Mistral 3's text tower (mistral3) ------

def _gemma4_args(config: dict):
    """lorafit's own reading of a Gemma 4 config (per-type head sizes and kv heads, kv
    sharing, double-wide MLPs, per-type RoPE): the GGUF says what lorafit computes."""
    from lorafit.models.families import model_args

    return model_args(dict(config))


def _gemma4_view(config: dict) -> dict:
    """Gemma 4's config as the generic keys read it: the full layers' head size (llama.cpp's
    key_length; the sliding layers' is key_length_swa), a width and a kv head count per
    layer, and one plain RoPE base (the full layers' proportional RoPE is `rope_freqs`)."""
    a = _gemma4_args(config)
    n, full = a.num_hidden_layers, "full_attention"
    view = {k: v for k, v in config.items()
            if k not in ("rope_theta", "rope_scaling", "partial_rotary_factor")}
    view.update(head_dim=a.head_dim_of_type(full),
                intermediate_size=[a.intermediate_of(i) for i in range(n)],
                num_key_value_heads=[a.kv_heads_of(i) for i in range(n)],
                rope_parameters={"rope_type": "default",
                                 "rope_theta": a.rope_by_layer_type[full]["rope_theta"]},
                _args=a)
    return view


def _gemma4_keys(w, config: dict) -> None:
    a, sliding = config["_args"], "sliding_attention"
    w.add_sliding_window(int(a.sliding_window or 512))
    w.add_sliding_window_pattern([t == sliding for t in a.layer_types])
    w.add_key_length_swa(a.head_dim_of_type(sliding))
    w.add_value_length_swa(a.head_dim_of_type(sliding))
    w.add_rope_dimension_count_swa(a.head_dim_of_type(sliding))
    w.add_rope_freq_base_swa(float((a.rope_by_layer_type.get(sliding) or {})
                                   .get("rope_theta", 10000.0)))
    w.add_shared_kv_layers(a.kv_shared_layers)
    w.add_embedding_length_per_layer_input(a.per_layer_input_size or 0)
    if a.final_logit_softcapping:
        w.add_final_logit_softcapping(float(a.final_logit_softcapping))
    if a.num_local_experts:
        _moe_keys(w, {**config, "num_experts_per_tok": a.num_experts_per_tok})


def gemma4_rope_freqs(config: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Gemma 4's full layers (what each frequency of a
    head_dim-wide RoPE is divided by): transformers' proportional RoPE turns the first
    partial_rotary_factor * head_dim / 2 frequencies of theta^(-2i / head_dim), divided by
    `factor`, and leaves the rest still (frequency 0: divided by 1e30 here)."""
    a = config["_args"]
    full = a.rope_by_layer_type["full_attention"]
    half = a.head_dim_of_type("full_attention") // 2
    turned = int(full.get("partial_rotary_factor", 1.0) * 2 * half // 2) \
        if full.get("rope_type") == "proportional" else half
    return np.array([float(full.get("factor", 1.0))] * turned + [1e30] * (half - turned),
                    dtype=np.float32)


def _gemma4_tensors(gguf, names, hf: str, w: np.ndarray, config: dict):
    """Gemma 4's tensors that the name map alone does not place: the per-layer embedding
    rows of the vocabulary (llama.cpp sizes it by n_vocab), the stored layer scalar and
    stacked experts (llama.cpp adds `.weight`), the router's input scale and per-expert
    output scale (`.scale` beside ffn_gate_inp / ffn_down_exps)."""
    t, tn = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    if hf == "model.embed_tokens_per_layer.weight":
        if w.shape[0] < config["vocab_size"]:
            raise LorafitError("llama.cpp's gemma4 needs vocab_size_per_layer_input >= "
                               "vocab_size")
        return [(gguf_name(names, hf), w[:config["vocab_size"]])]
    if hf.endswith((".layer_scalar", ".experts.gate_up_proj", ".experts.down_proj")):
        return [(gguf_name(names, hf) + ".weight", w)]
    for leaf, kind in ((".router.scale", t.FFN_GATE_INP),
                       (".router.per_expert_scale", t.FFN_DOWN_EXP)):
        if hf.endswith(leaf):
            return [(tn[kind].format(bid=int(hf.split(".")[2])) + ".scale", w)]
    return [(gguf_name(names, hf), w)]


def _gemma4_extra(config: dict) -> dict:
    return {"rope_freqs.weight": gemma4_rope_freqs(config)}


def text_model_config(config: dict) -> dict:
    """A vision-language config's text tower: Mistral 3's (text_config, the head tied by the
    top-level flag, as transformers reads it), Qwen3.5's (core/gguf_families.py); other
    configs as they are."""
    if config.get("model_type") != "mistral3":
        return gguf_families.text_model_config(config)
    text = dict(config.get("text_config") or {})
    text.setdefault("model_type", "mistral")
    text["tie_word_embeddings"] = config.get("tie_word_embeddings",
                                             text.get("tie_word_embeddings", False))
    return text


def yarn_attn_factor(s: dict) -> float:
    """transformers' YaRN attention factor over the 1 + 0.1 ln(factor) that ggml's YaRN
    RoPE multiplies in itself: llama.cpp's rope.scaling.attn_factor (its own YaRN factor,
    from yarn_log_multiplier, assumes mscale 1 and comes out 1 without that key)."""
    def mscale(m=1.0):
        return 1.0 if s["factor"] <= 1 else 0.1 * m * math.log(s["factor"]) + 1.0
    factor = s.get("attention_factor")
    if factor is None:
        factor = mscale(s["mscale"]) / mscale(s["mscale_all_dim"]) \
            if s.get("mscale") and s.get("mscale_all_dim") else mscale()
    return float(factor) / mscale()


def _yarn_keys(w, s: dict) -> None:
    """YaRN's betas (those the RoPE parameters s give) and, for YaRN, the attention factor
    llama.cpp should multiply (yarn_attn_factor)."""
    for key, method in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                        ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
        if s.get(key) is not None:
            method(float(s[key]))
    if s.get("rope_type", s.get("type")) == "yarn":
        w.add_rope_scaling_attn_factors(yarn_attn_factor(s))


def _ministral3_keys(w, config: dict) -> None:
    """YaRN's betas and attention factor, and Llama 4's query temperature, stepping every
    original_max_position_embeddings positions."""
    _, s = _rope(config)
    _yarn_keys(w, s)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("llama_4_scaling_beta") is not None:  # its period: llama.cpp's YaRN context
        w.add_attn_temperature_scale(float(rope["llama_4_scaling_beta"]))
        if not s:
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


# Hugging Face model_type -> how llama.cpp knows it (checked end to end in
# tests/core/test_gguf_export.py through llama-cpp-python).
FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "mixtral": Family("LLAMA", permute_qk=True, keys=_moe_keys),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "qwen3_moe": Family("QWEN3MOE", keys=_moe_keys),
    "olmo2": Family("OLMO2"),
    # llama.cpp's olmo2 with sliding layers
    "olmo3": Family("OLMO2", keys=_olmo3_keys, view=_olmo3_view),
    "granite": Family("GRANITE", permute_qk=True, scales=(
        ("embedding_multiplier", "add_embedding_scale"),
        ("residual_multiplier", "add_residual_scale"),
        ("attention_multiplier", "add_attention_scale"),
        ("logits_scaling", "add_logit_scale"))),
    "starcoder2": Family("STARCODER2"),
    "gemma2": Family("GEMMA2", norm_plus_one=True, keys=_gemma2_keys),
    "gemma3_text": Family("GEMMA3", norm_plus_one=True, keys=_gemma3_keys),
    "phi3": Family("PHI3", keys=_phi3_keys),
    "smollm3": Family("SMOLLM3", permute_qk=True),
    "exaone4": Family("EXAONE4", keys=_exaone4_keys),
    "glm4": Family("GLM4"),
    "gemma4_text": Family("GEMMA4", keys=_gemma4_keys, view=_gemma4_view,
                          tensors=_gemma4_tensors, extra=_gemma4_extra,
                          no_lora=("per_layer_model_projection",)),
    "ministral3": Family("MISTRAL3", permute_qk=True, keys=_ministral3_keys),
    # Gated DeltaNet hybrids and gpt-oss (core/gguf_families.py)
    "qwen3_next": Family("QWEN3NEXT", keys=gguf_families.qwen3_next_keys,
                         tensor=gguf_families.qwen3_next_tensor),
    "qwen3_5_text": Family("QWEN35", keys=gguf_families.qwen3_5_keys,
                           tensor=gguf_families.qwen3_5_tensor, lora=gguf_families.qwen3_5_lora),
    "qwen3_5_moe_text": Family("QWEN35MOE", keys=gguf_families.qwen3_5_moe_keys,
                               tensor=gguf_families.qwen3_5_tensor,
                               lora=gguf_families.qwen3_5_lora),
    "gpt_oss": Family("GPT_OSS", keys=gguf_families.gpt_oss_keys,
                      tensor=gguf_families.gpt_oss_tensor, lora=gguf_families.gpt_oss_lora),
}

# Families lorafit trains that have no GGUF export, and why (said in the one-line error).
NO_GGUF: dict[str, str] = {}


# The pre-tokenizer regexes of tokenizer.json that llama.cpp knows by name.
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
               "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def family(config: dict) -> Family:
    config = text_model_config(config)
    mt = config.get("model_type")
    if mt not in FAMILIES:
        why = f" ({NO_GGUF[mt]})" if mt in NO_GGUF else ""
        raise LorafitError(f"GGUF export supports {', '.join(sorted([*FAMILIES, 'mistral3']))}; "
                           f"this model is {mt!r}{why}")
    for problem in _unexportable(config):
        raise LorafitError(f"GGUF export of {mt}: {problem}")
    return FAMILIES[mt]


def _unexportable(config: dict) -> list[str]:
    """What llama.cpp's implementation of the family cannot load at all."""
    mt = config.get("model_type")
    if mt == "qwen3_moe" and (config.get("mlp_only_layers")
                              or (config.get("decoder_sparse_step") or 1) != 1):
        return ["llama.cpp's qwen3moe has no dense layers (mlp_only_layers / "
                "decoder_sparse_step)"]
    if mt == "exaone4" and head_dim(config) * config["num_attention_heads"] != \
            config["hidden_size"]:
        return ["llama.cpp's exaone4 needs head_dim x heads = hidden_size"]
    if mt == "gemma4_text":
        return _gemma4_unexportable(config)
    if mt == "olmo3":
        return _olmo3_unexportable(config)
    if mt in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"):
        return gguf_families.deltanet_problems(config)
    if mt == "gpt_oss":
        return gguf_families.gpt_oss_problems(config)
    return []


def _gemma4_unexportable(config: dict) -> list[str]:
    """The RoPE layouts llama.cpp's gemma4 has: plain RoPE on the sliding layers, plain or
    proportional RoPE (as `rope_freqs`) on the full ones."""
    a = _gemma4_args(config)
    local = a.rope_by_layer_type.get("sliding_attention") or {}
    full = a.rope_by_layer_type.get("full_attention") or {}
    if local.get("rope_type", "default") != "default" or \
            local.get("partial_rotary_factor", 1.0) != 1.0:
        return ["llama.cpp's gemma4 has plain RoPE only on sliding layers (this model: "
                f"{local.get('rope_type')!r}, partial_rotary_factor "
                f"{local.get('partial_rotary_factor', 1.0)})"]
    if full.get("rope_type", "default") not in ("default", "proportional") or \
            full.get("rope_type", "default") == "default" and \
            full.get("partial_rotary_factor", 1.0) != 1.0:
        return ["llama.cpp's gemma4 has plain or proportional RoPE on full layers (this "
                f"model: {full.get('rope_type')!r})"]
    return []


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LorafitError("GGUF export needs the gguf package: pip install 'lorafit[gguf]'") from None
    return gguf


def _rope_by_type(config: dict) -> dict:
    """transformers 5's per-layer-type rope_parameters ({} for one rope for all layers)."""
    params = config.get("rope_parameters") or {}
    return params if "full_attention" in params or "sliding_attention" in params else {}


def _rope(config: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from transformers v4 (rope_theta + rope_scaling) or v5
    (rope_parameters) configs; the full-attention layers' where they differ by type."""
    params = _rope_by_type(config).get("full_attention") or config.get("rope_parameters") or {}
    if "rope_theta" not in config and config.get("rope_local_base_freq"):  # gemma3, v4
        params = {"rope_theta": 1_000_000.0, **params}
    scaling = config.get("rope_scaling") or params
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), (scaling if kind != "default" else {})


def _longrope(config: dict) -> dict:
    """Phi-3's LongRoPE dict (transformers' phi3 reads su, yarn and longrope all as it)."""
    _, s = _rope(config)
    if config.get("model_type") == "phi3" and \
            s.get("rope_type", s.get("type")) in ("longrope", "su", "yarn"):
        return s
    return {}


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rotary_dim(config: dict) -> int:
    """How many dimensions of each head RoPE turns (partial rotary: phi3, glm4)."""
    fraction = config.get("partial_rotary_factor") or \
        (config.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0
    return int(head_dim(config) * fraction)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs`: what each rotary frequency is divided by (Llama 3.1's
    scaling), i.e. the unscaled inverse frequency over transformers' llama3 one."""
    theta, s = _rope(config)
    dim = head_dim(config)
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return (inv / scaled).astype(np.float32)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved one (the inverse of
    transformers' convert_llama_weights_to_hf permutation), on a weight's (or LoRA B's)
    output rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _prepare(name: str, w: np.ndarray, config: dict, fam: Family) -> np.ndarray:
    if fam.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.lora_B",
                                         "self_attn.q_proj.bias")):
        return permute_rows(w, config["num_attention_heads"])
    if fam.permute_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.lora_B",
                                         "self_attn.k_proj.bias")):
        return permute_rows(w, config.get("num_key_value_heads")
                            or config["num_attention_heads"])
    if fam.norm_plus_one and name.endswith("norm.weight"):
        return w + 1.0
    return w


def _model_tensors(gguf, names, hf: str, w: np.ndarray):
    """(GGUF name, array) pairs for one Hugging Face tensor: the stacked experts of a MoE
    layer (E, 2F, C gate | up; E, C, F down) become llama.cpp's ffn_{gate,up,down}_exps."""
    if ".mlp.experts." not in hf:
        return [(gguf_name(names, hf), w)]
    layer = int(hf.split(".")[2])
    t, n = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    if hf.endswith("experts.gate_up_proj"):
        f = w.shape[1] // 2
        return [(n[t.FFN_GATE_EXP].format(bid=layer) + ".weight", w[:, :f]),
                (n[t.FFN_UP_EXP].format(bid=layer) + ".weight", w[:, f:])]
    if hf.endswith("experts.down_proj"):
        return [(n[t.FFN_DOWN_EXP].format(bid=layer) + ".weight", w)]
    if hf.endswith("experts.gate_up_proj_bias"):  # (E, 2F): gate | up
        f = w.shape[1] // 2
        return [(n[t.FFN_GATE_EXP].format(bid=layer) + ".bias", w[:, :f]),
                (n[t.FFN_UP_EXP].format(bid=layer) + ".bias", w[:, f:])]
    if hf.endswith("experts.down_proj_bias"):
        return [(n[t.FFN_DOWN_EXP].format(bid=layer) + ".bias", w)]
    raise LorafitError(f"{hf}: llama.cpp has no tensor of that name for this architecture")


def _encode(gguf, w: np.ndarray, outtype: str):
    """(data, raw_dtype) for the writer: 1-D tensors stay f32 as llama.cpp's converter
    keeps them; q8_0 needs rows of a multiple of 32 (others fall back to f16)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if outtype == "f32" or w.ndim == 1:
        return w, None
    if outtype == "f16":
        return w.astype(np.float16), None
    q = gguf.GGMLQuantizationType
    if outtype == "bf16":
        return gguf.quants.quantize(w, q.BF16), q.BF16
    if outtype == "q8_0":
        if w.shape[-1] % 32:
            return w.astype(np.float16), None
        return gguf.quants.quantize(w, q.Q8_0), q.Q8_0
    raise LorafitError(f"unknown GGUF type {outtype!r}: {', '.join(OUTTYPES)}")


def _file_type(gguf, outtype: str) -> int:
    t = gguf.LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "bf16": t.MOSTLY_BF16,
            "q8_0": t.MOSTLY_Q8_0}[outtype]


def _name_map(gguf, fam: Family, config: dict):
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch], config["num_hidden_layers"])


def gguf_name(name_map, hf_name: str) -> str:
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise LorafitError(f"{hf_name}: llama.cpp has no tensor of that name for this "
                           "architecture")
    return new


def _hyperparameters(w, gguf, config: dict, fam: Family, outtype: str) -> None:
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config.get("intermediate_size") or 4 * config["hidden_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    if config.get("norm_epsilon") is None:
        w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_key_length(head_dim(config))
    w.add_value_length(head_dim(config))
    w.add_rope_dimension_count(rotary_dim(config))
    w.add_vocab_size(config["vocab_size"])
    theta, scaling = _rope(config)
    w.add_rope_freq_base(theta)
    kind = scaling.get("rope_type", scaling.get("type"))
    if _longrope(config):
        pass  # rope_factors_long / _short tensors and _phi3_keys
    elif kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    elif kind not in (None, "llama3"):
        raise LorafitError(f"rope scaling {kind!r} has no GGUF export yet")
    for key, method in fam.scales:
        if config.get(key) is not None:
            getattr(w, method)(float(config[key]))
    if config.get("norm_epsilon") is not None:  # LayerNorm families (starcoder2)
        w.add_layer_norm_eps(config["norm_epsilon"])
    if fam.keys:
        fam.keys(w, config)
    w.add_file_type(_file_type(gguf, outtype))


def unsupported_features(config: dict) -> list[str]:
    """What the model computes that llama.cpp's implementation of the family does not
    (the GGUF runs, but its outputs differ): said to the user at export."""
    config = text_model_config(config)
    notes = []
    mt, window = config.get("model_type"), config.get("sliding_window")
    if mt in ("qwen2", "qwen3_moe", "smollm3") and config.get("use_sliding_window") or \
            mt in ("mistral", "starcoder2", "mixtral", "phi3", "ministral3") and window or \
            mt == "exaone4" and window and config["num_hidden_layers"] != 64:
        notes.append(f"llama.cpp's {mt} ignores sliding_window={window}")
    if mt == "qwen3_moe" and not config.get("norm_topk_prob"):
        notes.append("llama.cpp's qwen3moe always renormalises the top-k expert weights "
                     "(this model has norm_topk_prob false)")
    scalar = config.get("query_pre_attn_scalar")
    if mt in ("gemma2", "gemma3_text") and scalar and scalar not in (
            head_dim(config), config["hidden_size"] // config["num_attention_heads"]):
        notes.append(f"llama.cpp's {mt} scales attention by head_dim, not "
                     f"query_pre_attn_scalar={scalar}")
    if mt == "smollm3" and _smollm3_nope(config) != [
            int((i + 1) % 4 != 0) for i in range(config["num_hidden_layers"])]:
        notes.append("llama.cpp's smollm3 leaves RoPE out of every 4th layer, not as "
                     "no_rope_layers says")
    yarn = olmo3_rope(config).get("full_attention") or {} if mt == "olmo3" \
        else _rope(config)[1] if mt == "ministral3" else {}
    if yarn.get("truncate") is False:
        notes.append("llama.cpp's YaRN always truncates its correction range (this model "
                     "has truncate false)")
    if mt == "gpt_oss":
        notes += gguf_families.gpt_oss_notes(config)
    if mt == "qwen3_next" and not config.get("norm_topk_prob", True):
        notes.append("llama.cpp's qwen3next always renormalises the top-k expert weights "
                     "(this model has norm_topk_prob false)")
    if _longrope(config):
        notes.append("llama.cpp picks Phi-3's long or short RoPE factors by the context "
                     "size it is run with, transformers by the sequence length")
    return notes


def _smollm3_nope(config: dict) -> list[int]:
    """SmolLM3's per-layer use of RoPE (1: RoPE, 0: none), as transformers reads it."""
    if config.get("no_rope_layers") is not None:
        return list(config["no_rope_layers"])
    n = config.get("no_rope_layer_interval") or 4
    return [int((i + 1) % n != 0) for i in range(config["num_hidden_layers"])]


# ----------------------------------------------------------------------------- tokenizer

def _read_tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorafitError(f"{folder}: no tokenizer.json (GGUF export writes the tokenizer "
                           "from it)") from None


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's name for the text splitting of a byte-level BPE tokenizer.json."""
    pt = tj.get("pre_tokenizer") or {}
    parts = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    for p in parts:
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return "gpt-2"
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
    raise LorafitError("tokenizer.json: a pre-tokenizer llama.cpp does not know by name "
                       f"({json.dumps(pt)[:120]}); GGUF export supports GPT-2, Llama 3 and "
                       "Qwen2 byte-level BPE tokenizers")


def add_tokenizer(w, gguf, folder: str | Path, vocab_size: int) -> None:
    """Tokens, their types, merges, special ids, add-BOS and the chat template."""
    folder = Path(folder)
    tj = _read_tokenizer_json(folder)
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _add_sentencepiece_tokenizer(w, gguf, tj, folder, vocab_size)
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            (tj.get("decoder") or {}).get("type") not in ("ByteLevel", None):
        raise LorafitError(f"{folder}: GGUF export supports byte-level and SentencePiece-style "
                           "(byte-fallback) BPE tokenizers "
                           f"(this one is {model.get('type')}"
                           f"{' with byte fallback' if model.get('byte_fallback') else ''})")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for a in tj.get("added_tokens") or []:
        if a["id"] < vocab_size:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") \
                else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_add_bos_token(_adds_bos(tj, folder))
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def _add_sentencepiece_tokenizer(w, gguf, tj: dict, folder: Path, vocab_size: int) -> None:
    """A SentencePiece-style BPE tokenizer.json (byte fallback, `▁` for spaces: Llama 2,
    Mistral v0.1-0.3, Gemma) as llama.cpp's `llama` vocabulary. llama.cpp merges the
    adjacent pair whose joined piece scores highest, so each piece scores minus the rank
    of the first merge that makes it: the same order as the BPE merges."""
    model = tj["model"]
    rank = {}
    for i, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, i)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1e9] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i >= vocab_size:
            continue
        # (a piece no merge makes is never formed by BPE: it must lose every comparison)
        tokens[i], scores[i] = text, -float(rank[text]) if text in rank else -1e9
        types[i] = gguf.TokenType.BYTE if len(text) == 6 and text.startswith("<0x") \
            else gguf.TokenType.UNKNOWN if text == model.get("unk_token") \
            else gguf.TokenType.NORMAL
    for a in tj.get("added_tokens") or []:
        if a["id"] < vocab_size and types[a["id"]] != gguf.TokenType.BYTE:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.UNKNOWN if a["content"] == model.get("unk_token") \
                else gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(_prepends_space(tj))
    w.add_add_bos_token(_adds_bos(tj, folder))
    gguf.SpecialVocab(folder, load_merges=False, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def _prepends_space(tj: dict) -> bool:
    """Whether the tokenizer puts `▁` before the text (Llama 2's Prepend normalizer or a
    Metaspace pre-tokenizer that prepends; Gemma does neither)."""
    def parts(x):
        x = x or {}
        key = "normalizers" if "normalizers" in x else "pretokenizers"
        return x.get(key, [x]) if x.get("type") == "Sequence" else [x]
    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581"
           for n in parts(tj.get("normalizer"))):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in parts(tj.get("pre_tokenizer")))


def _adds_bos(tj: dict, folder: Path) -> bool:
    """Whether the Hugging Face tokenizer puts BOS in front when encoding."""
    try:
        tc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tc = {}
    if "add_bos_token" in tc:
        return bool(tc["add_bos_token"])
    pp = tj.get("post_processor") or {}
    procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    return any(p.get("type") == "TemplateProcessing" and p.get("special_tokens")
               and "SpecialToken" in json.dumps(p.get("single", [])[:1]) for p in procs)


# ----------------------------------------------------------------------------- writers

def _as_written(config: dict, fam: Family) -> dict:
    """The config the writers read: the text tower's, as the family views it."""
    config = text_model_config(config)
    return fam.view(config) if fam.view else config


def _writer(gguf, path: Path, fam: Family):
    path.parent.mkdir(parents=True, exist_ok=True)
    return gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[fam.arch]])


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _writing(config: dict):
    """(gguf module, family, config as written, tensor name map): what both writers, the
    model's and the adapter's, start from, so their names always agree."""
    gguf = _gguf()
    fam = family(config)
    config = _as_written(config, fam)
    return gguf, fam, config, _name_map(gguf, fam, config)


def write_model(path: str | Path, config: dict, weights: dict, tokenizer_dir: str | Path,
                outtype: str = "f16", name: str | None = None) -> Path:
    """A whole model as one GGUF file. `weights`: Hugging Face names -> float arrays."""
    gguf, fam, config, names = _writing(config)
    path = Path(path)
    tensors = {}
    for hf in sorted(weights):
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        w = _prepare(hf, np.asarray(weights[hf]), config, fam)
        if fam.tensors:  # Gemma 4 names and places its own
            for key, v in fam.tensors(gguf, names, hf, w, config):
                tensors[key] = _encode(gguf, v, outtype)
            continue
        for name, v in fam.tensor(hf, w, config) if fam.tensor else [(hf, w)]:
            for key, u in _model_tensors(gguf, names, name, v):
                tensors[key] = _encode(gguf, u, "f32" if not key.endswith(".weight") or any(
                    kind in key for kind in KEEP_F32) else outtype)
    for key, v in (fam.extra(config) if fam.extra else {}).items():
        tensors[key] = (v, None)
    scaling = _rope(config)[1]
    if scaling.get("rope_type") == "llama3":
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = \
            (llama3_rope_factors(config), None)
    if _longrope(config):  # Phi-3's LongRoPE: both factor sets, as tensors
        for kind, tensor in (("long", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                             ("short", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            tensors[gguf.TENSOR_NAMES[tensor] + ".weight"] = \
                (np.asarray(scaling[f"{kind}_factor"], dtype=np.float32), None)
    w = _writer(gguf, path, fam)
    w.add_type(gguf.GGUFType.MODEL)
    if name:
        w.add_name(name)
    _hyperparameters(w, gguf, config, fam, outtype)
    add_tokenizer(w, gguf, tokenizer_dir, config["vocab_size"])
    for key, (data, raw) in tensors.items():
        w.add_tensor(key, data, raw_dtype=raw)
    _finish(w)
    return path


def _lora_pairs(gguf, names, module: str, a: np.ndarray, b: np.ndarray, config: dict,
                r: int):
    """(GGUF base tensor name, lora_a, lora_b) for one adapted module. An MoE's stacked
    experts (PEFT's ParamWrapper: A (E*r', in), B (out, r'*E)) become per-expert stacks
    A (E, r', in), B (E, out, r') on llama.cpp's ffn_{gate,up,down}_exps, which it applies
    per routed expert; the fused gate_up splits by B's rows with A shared. llama.cpp scales
    each tensor by alpha over its own rank r', so B carries r' / r to keep lorafit's alpha / r
    (PEFT's fused gate_up: r' = 2r with twice alpha)."""
    if ".mlp.experts." not in module:
        return [(gguf_name(names, module + ".weight"), a, b)]
    leaf = module.rsplit(".", 1)[-1]
    n = config.get("num_local_experts") or config.get("num_experts")
    if leaf not in ("gate_up_proj", "down_proj") or not n or a.shape[0] % n:
        raise LorafitError(f"{module}: this expert adapter has no llama.cpp layout; merge "
                           "the adapter (--merge) and export the merged model instead")
    a3 = a.reshape(n, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, n).transpose(2, 0, 1) * (a3.shape[1] / r)
    layer = int(module.split(".")[2])
    t, tn = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    name = lambda kind: tn[kind].format(bid=layer) + ".weight"  # noqa: E731
    if leaf == "down_proj":
        return [(name(t.FFN_DOWN_EXP), a3, b3)]
    f = b3.shape[1] // 2
    return [(name(t.FFN_GATE_EXP), a3, b3[:, :f]), (name(t.FFN_UP_EXP), a3, b3[:, f:])]


def write_lora(path: str | Path, config: dict, adapter: dict, r: int, alpha: float,
               rslora: bool = False, outtype: str = "f32") -> Path:
    """A LoRA adapter as llama.cpp loads it with `--lora`: `<tensor>.lora_a` (r x in) and
    `.lora_b` (out x r) beside the base tensor's GGUF name; llama.cpp scales by
    adapter.lora.alpha / r. `adapter`: PEFT module names (`...q_proj.lora_A.weight`)."""
    gguf, fam, config, names = _writing(config)
    path = Path(path)
    tensors = {}
    for key in sorted(adapter):
        if key.endswith("lora_magnitude_vector"):
            raise LorafitError("llama.cpp has no DoRA: merge the adapter (--merge) and "
                               "export the merged model instead")
        if ".lora_A." not in key and ".lora_B." not in key:
            raise LorafitError(f"{key}: only LoRA A/B tensors go into a GGUF adapter")
        if key.replace(".lora_B.", ".lora_A.") not in adapter:
            raise LorafitError(f"{key.split('.lora_', 1)[0]}: the adapter has lora_B but "
                               "no lora_A")
        if fam.no_lora and key.split(".lora_", 1)[0].endswith(fam.no_lora):
            raise LorafitError(f"{key.split('.lora_', 1)[0]}: llama.cpp's {fam.arch.lower()} "
                               "applies no LoRA there; export with --merge, or train "
                               "without it (--targets)")
    for key in sorted(k for k in adapter if ".lora_A." in k):
        module = key.split(".lora_", 1)[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in adapter:
            raise LorafitError(f"{module}: the adapter has lora_A but no lora_B")
        a = np.asarray(adapter[key], dtype=np.float32)
        b = _prepare(module + ".lora_B", np.asarray(adapter[b_key], dtype=np.float32),
                     config, fam)
        if fam.lora:
            a, b = fam.lora(module, a, b, config)
        for base, pa, pb in _lora_pairs(gguf, names, module, a, b, config, r):
            tensors[f"{base}.lora_a"] = _encode(gguf, pa, outtype)
            tensors[f"{base}.lora_b"] = _encode(gguf, pb, outtype)
    if not tensors:
        raise LorafitError("the adapter holds no tensors")
    w = _writer(gguf, path, fam)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha * math.sqrt(r) if rslora else alpha))
    w.add_file_type(_file_type(gguf, outtype))
    for key, (data, raw) in tensors.items():
        w.add_tensor(key, data, raw_dtype=raw)
    _finish(w)
    return path
