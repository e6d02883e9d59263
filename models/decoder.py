"""The one decoder: every family is this forward pass with its `ModelArgs` switches set.

Parameters are a flat dict keyed by the Hugging Face names
(`model.layers.3.self_attn.q_proj.weight`), so safetensors, PEFT and mlx-lm names need no
mapping table. The functions take the backend object `ops` (backends/base.py) and call
only its ops; every projection goes through `core.lora.project`, which applies the adapter
leaves sitting beside a frozen weight, so this file knows nothing of LoRA or quantization.
"""

from __future__ import annotations

import math

import numpy as np

from lorafit.core.lora import project
from lorafit.models.spec import GELU_TANH, ModelArgs

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION + MLP  # every projection an adapter can target ("all-linear")


def linear_modules(a: ModelArgs) -> tuple:
    """The projection names of this model, the names LoRA targets choose from."""
    return LINEAR_MODULES


def parameter_shapes(a: ModelArgs) -> dict:
    """Every frozen parameter's name and logical shape: the model's whole state dict."""
    D, Hq, Hk, C, F = a.head_dim, a.num_attention_heads, a.num_key_value_heads, \
        a.hidden_size, a.intermediate_size
    shapes = {"model.embed_tokens.weight": (a.vocab_size, C), "model.norm.weight": (C,)}
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, C)
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (C,),
            p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (Hq * D, C),
            p + "self_attn.k_proj.weight": (Hk * D, C),
            p + "self_attn.v_proj.weight": (Hk * D, C),
            p + "self_attn.o_proj.weight": (C, Hq * D),
            p + "mlp.gate_proj.weight": (F, C),
            p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F),
        })
        if a.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (Hq * D,),
                           p + "self_attn.k_proj.bias": (Hk * D,),
                           p + "self_attn.v_proj.bias": (Hk * D,)})
        if a.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (C,)
        if a.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (F,), p + "mlp.up_proj.bias": (F,),
                           p + "mlp.down_proj.bias": (C,)})
        if a.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (D,),
                           p + "self_attn.k_norm.weight": (D,)})
        if a.sandwich_norms:
            shapes.update({p + "pre_feedforward_layernorm.weight": (C,),
                           p + "post_feedforward_layernorm.weight": (C,)})
    return shapes


def projection_weights(a: ModelArgs) -> set:
    """Names of the `.weight` tensors of projections (what quantization applies to)."""
    names = linear_modules(a)
    return {k for k in parameter_shapes(a) if k.rsplit(".", 2)[-2] in names}


# -- forward ------------------------------------------------------------------------------

def split_layers(params: dict, num_layers: int) -> list[dict]:
    """Per layer, its parameters under their names within the layer (one pass)."""
    layers = [{} for _ in range(num_layers)]
    for k, v in params.items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            layers[int(i)][rest] = v
    return layers


def norm(ops, a: ModelArgs, x, weight):
    """RMSNorm as the family computes it: Llama's (normalise in float32, cast, times w) or
    Gemma's (everything in float32, times (offset + w), then cast)."""
    if a.norm_offset is None:
        return ops.rms_norm(x, weight, a.rms_norm_eps)
    dtype = ops.dtype_name(x)
    w = ops.cast(weight, "float32")
    if a.norm_offset:
        w = w + a.norm_offset
    y = ops.rms_norm(ops.cast(x, "float32"), w, a.rms_norm_eps)
    return ops.cast(y, dtype)


def attention_scale(a: ModelArgs) -> float:
    if a.query_pre_attn_scalar is not None:
        return float(a.query_pre_attn_scalar) ** -0.5
    return 1.0 / math.sqrt(a.head_dim)


def attention_block(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids, cache,
                    lora):
    """Self-attention of layer i (full or sliding-window, as a.layer_types says)."""
    b, t, _ = x.shape  # (B, T, C)
    D, qc = a.head_dim, a.quantization
    q = project(ops, lp, "self_attn.q_proj", x, lora, qc).reshape(b, t, -1, D)
    k = project(ops, lp, "self_attn.k_proj", x, lora, qc).reshape(b, t, -1, D)
    v = project(ops, lp, "self_attn.v_proj", x, lora, qc).reshape(b, t, -1, D)
    if a.qk_norm:
        q = norm(ops, a, q, lp["self_attn.q_norm.weight"])
        k = norm(ops, a, k, lp["self_attn.k_norm.weight"])
    q, k, v = (ops.swapaxes(z, 1, 2) for z in (q, k, v))  # (B, H, T, D)
    q, k = ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin)
    if cache is not None:
        if cache[0] is not None:
            k = ops.concat([cache[0], k], axis=2)
            v = ops.concat([cache[1], v], axis=2)
        cache[0], cache[1] = k, v
    o = ops.attention(q, k, v, attention_scale(a), segment_ids, window=a.window(i),
                      softcap=a.attn_logit_softcapping)
    o = ops.swapaxes(o, 1, 2).reshape(b, t, -1)
    return project(ops, lp, "self_attn.o_proj", o, lora, qc)


def mlp_block(ops, a: ModelArgs, lp: dict, x, lora):
    qc = a.quantization
    gate = project(ops, lp, "mlp.gate_proj", x, lora, qc)
    up = project(ops, lp, "mlp.up_proj", x, lora, qc)
    act = ops.gelu_tanh(gate) if a.hidden_act in GELU_TANH else ops.silu(gate)
    return project(ops, lp, "mlp.down_proj", act * up, lora, qc)


def decoder_layer(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids=None,
                  cache=None, lora=None):
    if a.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention output
        attn = attention_block(ops, a, i, lp, norm(ops, a, x, lp["input_layernorm.weight"]),
                               cos, sin, segment_ids, cache, lora)
        h = x + norm(ops, a, attn, lp["post_attention_layernorm.weight"])
        mlp = mlp_block(ops, a, lp, norm(ops, a, h, lp["pre_feedforward_layernorm.weight"]), lora)
        return h + norm(ops, a, mlp, lp["post_feedforward_layernorm.weight"])
    normed = norm(ops, a, x, lp["input_layernorm.weight"])
    h = x + attention_block(ops, a, i, lp, normed, cos, sin, segment_ids, cache, lora)
    normed = norm(ops, a, h, lp["post_attention_layernorm.weight"])
    return h + mlp_block(ops, a, lp, normed, lora)


def hidden_states(ops, a: ModelArgs, params: dict, input_ids, positions, segment_ids=None,
                  cache=None, lora=None, recompute=False):
    """The final normed hidden states (B, T, C). positions (B, T) int; cache is a list of
    [k, v] pairs per layer for generation; recompute stores only layer inputs."""
    x = ops.embedding(input_ids, params["model.embed_tokens.weight"])
    if a.embed_scale:  # Gemma: sqrt(hidden) rounded to the compute dtype first
        x = x * ops.cast(ops.from_numpy(np.array(math.sqrt(a.hidden_size), np.float32)),
                         ops.dtype_name(x))
    tables = rope_tables(ops, a, positions, ops.dtype_name(x))
    for i, lp in enumerate(split_layers(params, a.num_hidden_layers)):
        cos, sin = tables[a.layer_types[i]]
        if recompute:
            x = _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora)
        else:
            x = decoder_layer(ops, a, i, lp, x, cos, sin, segment_ids,
                              None if cache is None else cache[i], lora)
    return norm(ops, a, x, params["model.norm.weight"])


def rope_tables(ops, a: ModelArgs, positions, dtype: str) -> dict:
    """{layer type: (cos, sin)}: one shared pair unless layer types have their own RoPE."""
    if not a.layer_rope:
        pair = ops.rope_tables(positions, a.inv_freq, dtype)
        return {t: pair for t in set(a.layer_types)}
    return {t: ops.rope_tables(positions, a.rope_of(t), dtype) for t in set(a.layer_types)}


def _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora):
    """A layer whose activations are recomputed in the backward pass. Only the adapter
    leaves and x are arguments: frozen weights are closed over, so no gradient is ever
    formed for them."""
    trainable = {k: v for k, v in lp.items() if ".lora_" in k}
    frozen = {k: v for k, v in lp.items() if ".lora_" not in k}

    def run(train, x_):
        return decoder_layer(ops, a, i, {**frozen, **train}, x_, cos, sin, segment_ids, None,
                             lora)
    return ops.checkpoint(run)(trainable, x)


def head(ops, a: ModelArgs, h, weight):
    """Logits of hidden states: h @ weight^T, soft-capped where the family says so."""
    logits = ops.linear(h, weight)
    if a.final_logit_softcapping:
        logits = ops.softcap(logits, float(a.final_logit_softcapping))
    return logits


def output_weight(params: dict):
    """The lm-head matrix (V, C): its own, or the tied embedding table."""
    return params.get("lm_head.weight", params["model.embed_tokens.weight"])
