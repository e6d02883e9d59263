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
PER_LAYER_INPUT = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")


def linear_modules(a: ModelArgs) -> tuple:
    """The projection names of this model, the names LoRA targets choose from."""
    if a.per_layer_input_size:
        return LINEAR_MODULES + PER_LAYER_INPUT
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
        D, Hk, F = a.head_dim_of(i), a.kv_heads_of(i), a.intermediate_of(i)
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
        if a.kv_source(i) is not None:  # Gemma 4: k, v come from an earlier layer
            for k in [k for k in shapes if k.startswith((p + "self_attn.k_", p + "self_attn.v_"))]:
                del shapes[k]
        elif not a.has_v_proj(i):
            for k in [k for k in shapes if k.startswith(p + "self_attn.v_proj.")]:
                del shapes[k]
        if a.per_layer_input_size:
            P = a.per_layer_input_size
            shapes.update({p + "per_layer_input_gate.weight": (P, C),
                           p + "per_layer_projection.weight": (C, P),
                           p + "post_per_layer_input_norm.weight": (C,)})
        if a.layer_scalar:
            shapes[p + "layer_scalar"] = (1,)
    if a.per_layer_input_size:
        LP = a.num_hidden_layers * a.per_layer_input_size
        shapes.update({"model.embed_tokens_per_layer.weight": (a.per_layer_vocab or a.vocab_size,
                                                               LP),
                       "model.per_layer_model_projection.weight": (LP, C),
                       "model.per_layer_projection_norm.weight": (a.per_layer_input_size,)})
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
                    lora, shared=None):
    """Self-attention of layer i (full or sliding-window, as a.layer_types says). shared
    ({layer: (k, v)}, Gemma 4) receives this layer's k, v, or gives those of the layer
    whose k, v this one reuses."""
    b, t, _ = x.shape  # (B, T, C)
    D, qc = a.head_dim_of(i), a.quantization
    q = project(ops, lp, "self_attn.q_proj", x, lora, qc).reshape(b, t, -1, D)
    if a.qk_norm:
        q = norm(ops, a, q, lp["self_attn.q_norm.weight"])
    q = ops.apply_rope(ops.swapaxes(q, 1, 2), cos, sin)  # (B, H, T, D)
    source = a.kv_source(i)
    if source is not None:
        k, v = shared[source]
    else:
        k = project(ops, lp, "self_attn.k_proj", x, lora, qc).reshape(b, t, -1, D)
        v = project(ops, lp, "self_attn.v_proj", x, lora, qc).reshape(b, t, -1, D) \
            if a.has_v_proj(i) else k
        if a.qk_norm:
            k = norm(ops, a, k, lp["self_attn.k_norm.weight"])
        if a.v_norm:
            v = norm(ops, a, v, ops.cast(ops.from_numpy(np.ones(D, np.float32)),
                                         ops.dtype_name(v)))
        k, v = ops.swapaxes(k, 1, 2), ops.swapaxes(v, 1, 2)
        k = ops.apply_rope(k, cos, sin)
        if cache is not None:
            if cache[0] is not None:
                k = ops.concat([cache[0], k], axis=2)
                v = ops.concat([cache[1], v], axis=2)
            cache[0], cache[1] = k, v
        if shared is not None:
            shared[i] = (k, v)
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
                  cache=None, lora=None, shared=None, per_layer_input=None):
    if a.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention output
        attn = attention_block(ops, a, i, lp, norm(ops, a, x, lp["input_layernorm.weight"]),
                               cos, sin, segment_ids, cache, lora, shared)
        h = x + norm(ops, a, attn, lp["post_attention_layernorm.weight"])
        mlp = mlp_block(ops, a, lp, norm(ops, a, h, lp["pre_feedforward_layernorm.weight"]), lora)
        out = h + norm(ops, a, mlp, lp["post_feedforward_layernorm.weight"])
        if per_layer_input is not None:  # Gemma 4
            out = per_layer_input_block(ops, a, lp, out, per_layer_input, lora)
        if a.layer_scalar:
            out = out * lp["layer_scalar"]
        return out
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
    per_layer = per_layer_inputs(ops, a, params, input_ids, x, lora) \
        if a.per_layer_input_size else None
    shared = {} if a.kv_shared_layers else None
    for i, lp in enumerate(split_layers(params, a.num_hidden_layers)):
        cos, sin = tables[a.layer_types[i]]
        pli = None if per_layer is None else per_layer[:, :, i, :]
        if recompute:
            x = _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora, shared, pli)
        else:
            x = decoder_layer(ops, a, i, lp, x, cos, sin, segment_ids,
                              None if cache is None else cache[i], lora, shared, pli)
    return norm(ops, a, x, params["model.norm.weight"])


def per_layer_inputs(ops, a: ModelArgs, params: dict, input_ids, x, lora):
    """Gemma 4's per-layer inputs (B, T, L, P): the token's row of the per-layer table
    (times sqrt(P)) and a projection of the scaled embeddings (times C^-1/2, normed per
    layer), summed and times 2^-1/2."""
    b, t = input_ids.shape
    L, P = a.num_hidden_layers, a.per_layer_input_size
    tok = ops.embedding(input_ids, params["model.embed_tokens_per_layer.weight"])
    tok = tok * ops.cast(ops.from_numpy(np.array(math.sqrt(P), np.float32)), ops.dtype_name(tok))
    proj = project(ops, params, "model.per_layer_model_projection", x, lora, a.quantization)
    proj = norm(ops, a, (proj * a.hidden_size ** -0.5).reshape(b, t, L, P),
                params["model.per_layer_projection_norm.weight"])
    return (proj + tok.reshape(b, t, L, P)) * 2.0 ** -0.5


def per_layer_input_block(ops, a: ModelArgs, lp: dict, x, per_layer_input, lora):
    """x + norm(W_up (gelu(W_gate x) * per_layer_input)): Gemma 4's per-layer residual."""
    qc = a.quantization
    gate = ops.gelu_tanh(project(ops, lp, "per_layer_input_gate", x, lora, qc))
    y = project(ops, lp, "per_layer_projection", gate * per_layer_input, lora, qc)
    return x + norm(ops, a, y, lp["post_per_layer_input_norm.weight"])


def rope_tables(ops, a: ModelArgs, positions, dtype: str) -> dict:
    """{layer type: (cos, sin)}: one shared pair unless layer types have their own RoPE."""
    if not a.layer_rope:
        pair = ops.rope_tables(positions, a.inv_freq, dtype)
        return {t: pair for t in set(a.layer_types)}
    return {t: ops.rope_tables(positions, a.rope_of(t), dtype) for t in set(a.layer_types)}


def _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora, shared=None,
                      pli=None):
    """A layer whose activations are recomputed in the backward pass. Only the adapter
    leaves, x (and what carries gradients from elsewhere: per-layer input, reused k, v) are
    arguments: frozen weights are closed over, so no gradient is ever formed for them.
    A layer whose k, v later layers reuse returns them as outputs too."""
    trainable = {k: v for k, v in lp.items() if ".lora_" in k}
    frozen = {k: v for k, v in lp.items() if ".lora_" not in k}
    source, produces = a.kv_source(i), shared is not None and i in a.kv_producers()
    extra = (() if pli is None else (pli,)) + (shared[source] if source is not None else ())

    def run(train, x_, *rest):
        p_ = rest[0] if pli is not None else None
        local = {source: tuple(rest[-2:])} if source is not None else {}
        out = decoder_layer(ops, a, i, {**frozen, **train}, x_, cos, sin, segment_ids, None,
                            lora, local if shared is not None else None, p_)
        return (out, *local[i]) if produces else out
    out = ops.checkpoint(run)(trainable, x, *extra)
    if produces:
        out, k, v = out
        shared[i] = (k, v)
    return out


def head(ops, a: ModelArgs, h, weight):
    """Logits of hidden states: h @ weight^T, soft-capped where the family says so."""
    logits = ops.linear(h, weight)
    if a.final_logit_softcapping:
        logits = ops.softcap(logits, float(a.final_logit_softcapping))
    return logits


def output_weight(params: dict):
    """The lm-head matrix (V, C): its own, or the tied embedding table."""
    return params.get("lm_head.weight", params["model.embed_tokens.weight"])
