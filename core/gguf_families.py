"""The GGUF layouts of the families whose llama.cpp tensors differ from Hugging Face's by
more than a name: Qwen3-Next / Qwen3.5 (Gated DeltaNet layers) and gpt-oss (clamped SwiGLU
experts with biases, attention sinks). Done as llama.cpp's convert_hf_to_gguf.py does it;
framework-free (numpy in, numpy out), used by core/gguf_export.py's family table.

Qwen3-Next / Qwen3.5: A_log becomes A = -exp(A_log), dt_bias the dt projection's bias, the
depthwise conv1d loses its middle axis, every RMSNorm but the DeltaNet's gated one stores
1 + w. llama.cpp's qwen35 / qwen35moe broadcast key heads over value heads tiled
(k0 k1 k0 k1 ...) where Hugging Face groups them (k0 k0 k1 k1 ...), so the value heads of
those two are reordered (rows of in_proj_qkv's V part, in_proj_z, in_proj_a/b, A, dt, the
conv's V channels; out_proj's columns), in a LoRA adapter too: B's rows, out_proj's A columns.
qwen3next keeps Hugging Face's grouped order and fused projections (ssm_in, ssm_ba).

gpt-oss: experts stored (E, in, out) with gate and up interleaved become llama.cpp's
(E, out, in) stacks, gate and up apart; sinks are `attn_sinks.weight`.
"""

from __future__ import annotations

import numpy as np

from lorafit.core.errors import LorafitError

# ----------------------------------------------------------------------------- Gated DeltaNet


def text_model_config(config: dict) -> dict:
    """A Qwen3.5 vision-language config (text_config inside; the published checkpoints) as
    its text model's, which lorafit trains and llama.cpp's qwen35 / qwen35moe run."""
    kinds = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
    if config.get("model_type") not in kinds or not config.get("text_config"):
        return config
    text = {"tie_word_embeddings": config.get("tie_word_embeddings", False),
            **config["text_config"]}
    return {**text, "model_type": kinds[config["model_type"]]}


def full_attention_interval(config: dict) -> int:
    """llama.cpp's qwen3next/qwen35 place full attention on every n-th layer (n from
    `full_attention_interval`): the n that gives the config's layer_types."""
    n = config["num_hidden_layers"]
    types = config.get("layer_types")
    if not types:
        return int(config.get("full_attention_interval", 4))
    for k in range(1, n + 2):
        if [("full_attention" if (i + 1) % k == 0 else "linear_attention")
                for i in range(n)] == list(types):
            return k
    raise LorafitError("llama.cpp's Gated DeltaNet models place full attention on every "
                       f"n-th layer; this model's layer_types ({', '.join(types)}) have no "
                       "such period")


def _is_sparse_everywhere(config: dict) -> bool:
    return bool(config.get("num_experts")) and not config.get("mlp_only_layers") and \
        (config.get("decoder_sparse_step") or 1) == 1


def deltanet_problems(config: dict) -> list[str]:
    """What llama.cpp's qwen3next / qwen35(moe) cannot load at all."""
    full_attention_interval(config)  # raises with its own message
    mt = config.get("model_type")
    if config.get("linear_key_head_dim") != config.get("linear_value_head_dim"):
        return ["llama.cpp's Gated DeltaNet takes value heads as wide as key heads "
                "(linear_value_head_dim = linear_key_head_dim, as in the published models)"]
    if mt == "qwen3_next" and not _is_sparse_everywhere(config):
        return ["llama.cpp's qwen3next has mixture-of-experts MLPs on every layer (this "
                "model has dense ones: num_experts 0, mlp_only_layers or decoder_sparse_step)"]
    return []


def _deltanet_keys(w, config: dict) -> None:
    w.add_ssm_conv_kernel(config["linear_conv_kernel_dim"])
    w.add_ssm_state_size(config["linear_key_head_dim"])
    w.add_ssm_group_count(config["linear_num_key_heads"])
    w.add_ssm_time_step_rank(config["linear_num_value_heads"])
    w.add_ssm_inner_size(config["linear_value_head_dim"] * config["linear_num_value_heads"])
    w.add_full_attention_interval(full_attention_interval(config))


def _shared_expert_moe_keys(w, config: dict) -> None:
    w.add_expert_count(config["num_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    w.add_expert_shared_feed_forward_length(config.get("shared_expert_intermediate_size") or 0)


def _mrope_sections(w, config: dict) -> None:
    """qwen35 reads rope sections (interleaved M-RoPE); text alone puts one position in
    every section, so any split turns as plain RoPE: the config's, else Qwen3.5's."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    sections = list(rope.get("mrope_section") or [11, 11, 10])
    w.add_rope_dimension_sections((sections + [0, 0, 0, 0])[:4])


def qwen3_next_keys(w, config: dict) -> None:
    _deltanet_keys(w, config)
    _shared_expert_moe_keys(w, config)


def qwen3_5_keys(w, config: dict) -> None:
    _deltanet_keys(w, config)
    _mrope_sections(w, config)


def qwen3_5_moe_keys(w, config: dict) -> None:
    qwen3_5_keys(w, config)
    _shared_expert_moe_keys(w, config)


def _tile_heads(w: np.ndarray, axis: int, config: dict, head: int) -> np.ndarray:
    """Value heads grouped by key head -> tiled (llama.cpp's broadcast order) on `axis`,
    whose length is num_v_heads * head."""
    nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    w = np.moveaxis(w, axis, 0)
    rest = w.shape[1:]
    w = w.reshape(nk, nv // nk, head, *rest).swapaxes(0, 1).reshape(nv * head, *rest)
    return np.moveaxis(w, 0, axis)


def _v_tiled(name: str, w: np.ndarray, config: dict, lora_side: str | None = None):
    """qwen35's value-head order on a weight (lora_side None) or on a LoRA factor ('A' or
    'B': only the side that carries the reordered axis changes)."""
    nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    if nk == nv or ".linear_attn." not in name:
        return w
    hv, qk = config["linear_value_head_dim"], 2 * nk * config["linear_key_head_dim"]
    rows = lora_side in (None, "B")
    if ".in_proj_qkv." in name and rows:
        return np.concatenate([w[:qk], _tile_heads(w[qk:], 0, config, hv)])
    if ".in_proj_z." in name and rows:
        return _tile_heads(w, 0, config, hv)
    if (".in_proj_a." in name or ".in_proj_b." in name) and rows:
        return _tile_heads(w, 0, config, 1)
    if ".out_proj." in name and lora_side in (None, "A"):
        return _tile_heads(w, 1, config, hv)
    if lora_side is None and name.endswith((".A_log", ".dt_bias")):
        return _tile_heads(w, 0, config, 1)
    if lora_side is None and ".conv1d." in name:
        return np.concatenate([w[:qk], _tile_heads(w[qk:], 0, config, hv)])
    return w


def _deltanet_tensor(name: str, w: np.ndarray, config: dict, tiled: bool):
    if tiled:
        w = _v_tiled(name, w, config)
    if name.endswith(".A_log"):
        return [(name, -np.exp(w))]
    if name.endswith(".dt_bias"):
        return [(name[: -len("dt_bias")] + "dt_proj.bias", w)]
    if ".conv1d." in name:
        return [(name, w.reshape(w.shape[0], w.shape[-1]))]
    if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        return [(name, w + 1.0)]
    return [(name, w)]


def qwen3_next_tensor(name: str, w: np.ndarray, config: dict):
    return _deltanet_tensor(name, w, config, tiled=False)


def qwen3_5_tensor(name: str, w: np.ndarray, config: dict):
    return _deltanet_tensor(name, w, config, tiled=True)


def qwen3_5_lora(module: str, a: np.ndarray, b: np.ndarray, config: dict):
    return _v_tiled(module + ".", a, config, "A"), _v_tiled(module + ".", b, config, "B")


# ----------------------------------------------------------------------------- gpt-oss


def gpt_oss_problems(config: dict) -> list[str]:
    n = config["num_hidden_layers"]
    types = config.get("layer_types") or []
    if config.get("sliding_window") and types and list(types) != [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]:
        return ["llama.cpp's gpt-oss alternates sliding and full layers, sliding first "
                "(this model's layer_types differ)"]
    return []


def gpt_oss_keys(w, config: dict) -> None:
    w.add_expert_count(config["num_local_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    w.add_expert_feed_forward_length(config["intermediate_size"])
    if config.get("sliding_window"):
        w.add_sliding_window(int(config["sliding_window"]))
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn":
        for key, method in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                            ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                method(float(rope[key]))


def gpt_oss_notes(config: dict) -> list[str]:
    """What the model computes that llama.cpp's gpt-oss does not (it still loads)."""
    notes = []
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("truncate") is False:
        notes.append("llama.cpp's YaRN rounds its correction range to whole dimensions "
                     "(this model has truncate false)")
    if (config.get("swiglu_limit", 7.0), config.get("swiglu_alpha", 1.702)) != (7.0, 1.702):
        notes.append("llama.cpp's gpt-oss clamps its SwiGLU at limit 7 with alpha 1.702")
    return notes


def gpt_oss_tensor(name: str, w: np.ndarray, config: dict):
    """(E, in, 2F) gate/up interleaved -> (E, 2F, in) gate half then up half, as the
    qwen3_moe layout core/gguf_export.py splits; down (E, F, out) -> (E, out, F)."""
    if name.endswith("self_attn.sinks"):
        return [(name + ".weight", w)]
    if name.endswith("experts.gate_up_proj"):
        t = w.transpose(0, 2, 1)
        return [(name, np.concatenate([t[:, 0::2], t[:, 1::2]], axis=1))]
    if name.endswith("experts.gate_up_proj_bias"):
        return [(name, np.concatenate([w[:, 0::2], w[:, 1::2]], axis=1))]
    if name.endswith("experts.down_proj"):
        return [(name, w.transpose(0, 2, 1))]
    return [(name, w)]


def gpt_oss_lora(module: str, a: np.ndarray, b: np.ndarray, config: dict):
    if ".mlp.experts." in module:
        raise LorafitError(f"{module}: llama.cpp takes no adapter on gpt-oss's experts; "
                           "merge the adapter (--merge) and export the merged model instead")
    return a, b
