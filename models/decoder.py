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
from lorafit.models.blocks import moe
from lorafit.models.spec import GELU_TANH, ModelArgs

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION + MLP  # every projection an adapter can target ("all-linear")


def linear_modules(a: ModelArgs) -> tuple:
    """The projection names of this model, the names LoRA targets choose from."""
    if a.num_local_experts:
        return moe.linear_modules(a, ATTENTION, MLP)
    attention = ("qkv_proj", "o_proj") if a.fused_qkv else ATTENTION
    mlp = ("gate_up_proj", "down_proj") if a.fused_gate_up else MLP
    mlp = ("c_fc", "c_proj") if a.plain_mlp else mlp
    return attention + mlp


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
        })
        if a.is_moe_layer(i):
            shapes.update(moe.parameter_shapes(a, p))
        else:
            shapes.update({p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                           p + "mlp.down_proj.weight": (C, F)})
        if a.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (Hq * D,),
                           p + "self_attn.k_proj.bias": (Hk * D,),
                           p + "self_attn.v_proj.bias": (Hk * D,)})
        if a.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (C,)
        if a.mlp_bias and not a.is_moe_layer(i):
            shapes.update({p + "mlp.gate_proj.bias": (F,), p + "mlp.up_proj.bias": (F,),
                           p + "mlp.down_proj.bias": (C,)})
        if a.attention_sinks:
            shapes[p + "self_attn.sinks"] = (Hq,)
        if a.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (D,),
                           p + "self_attn.k_norm.weight": (D,)})
        _layer_variants(a, p, shapes)
    if a.layer_norm:
        shapes["model.norm.bias"] = (C,)
    return shapes


def _layer_variants(a: ModelArgs, p: str, shapes: dict) -> None:
    """Layer p's shapes changed for the layouts that differ from Llama's (fused projections,
    other norms, a plain MLP)."""
    D, Hq, Hk, C, F = a.head_dim, a.num_attention_heads, a.num_key_value_heads, \
        a.hidden_size, a.intermediate_size
    if a.fused_qkv:
        for n in ("q", "k", "v"):
            del shapes[p + f"self_attn.{n}_proj.weight"]
        shapes[p + "self_attn.qkv_proj.weight"] = ((Hq + 2 * Hk) * D, C)
    if a.fused_gate_up:
        del shapes[p + "mlp.gate_proj.weight"], shapes[p + "mlp.up_proj.weight"]
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * F, C)
    if a.post_norms:
        del shapes[p + "input_layernorm.weight"]
        shapes[p + "post_feedforward_layernorm.weight"] = (C,)
    if a.qk_norm_whole:
        shapes.update({p + "self_attn.q_norm.weight": (Hq * D,),
                       p + "self_attn.k_norm.weight": (Hk * D,)})
    if a.plain_mlp:
        for n in ("gate", "up", "down"):
            shapes.pop(p + f"mlp.{n}_proj.weight", None)
            shapes.pop(p + f"mlp.{n}_proj.bias", None)
        shapes.update({p + "mlp.c_fc.weight": (F, C), p + "mlp.c_proj.weight": (C, F)})
        if a.mlp_bias:
            shapes.update({p + "mlp.c_fc.bias": (F,), p + "mlp.c_proj.bias": (C,)})
    if a.sandwich_norms:
        shapes.update({p + "post_self_attn_layernorm.weight": (C,),
                       p + "post_mlp_layernorm.weight": (C,)})
    if a.layer_norm:
        shapes.update({k[:-len("weight")] + "bias": v for k, v in shapes.items()
                       if k.startswith(p) and k.endswith("layernorm.weight")})


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


def attention_block(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids, cache,
                    lora, q_scale=None):
    """Self-attention of layer i (full or sliding-window, as a.layer_types says)."""
    b, t, _ = x.shape  # (B, T, C)
    D, qc = a.head_dim, a.quantization
    if a.fused_qkv:  # one projection, its output split as q | k | v
        qkv = project(ops, lp, "self_attn.qkv_proj", x, lora, qc)
        nq, nk = a.num_attention_heads * D, a.num_key_value_heads * D
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    else:
        q = project(ops, lp, "self_attn.q_proj", x, lora, qc)
        k = project(ops, lp, "self_attn.k_proj", x, lora, qc)
        v = project(ops, lp, "self_attn.v_proj", x, lora, qc)
    if a.qk_norm_whole:
        q = ops.rms_norm(q, lp["self_attn.q_norm.weight"], a.rms_norm_eps)
        k = ops.rms_norm(k, lp["self_attn.k_norm.weight"], a.rms_norm_eps)
    q, k, v = (z.reshape(b, t, -1, D) for z in (q, k, v))
    if a.qk_norm:
        q = ops.rms_norm(q, lp["self_attn.q_norm.weight"], a.rms_norm_eps)
        k = ops.rms_norm(k, lp["self_attn.k_norm.weight"], a.rms_norm_eps)
    q, k, v = (ops.swapaxes(z, 1, 2) for z in (q, k, v))  # (B, H, T, D)
    if cos is not None:  # None on a NoPE layer
        q = _rotate(ops, q, cos, sin, a.rope_interleaved)
        k = _rotate(ops, k, cos, sin, a.rope_interleaved)
    if q_scale is not None:
        q = q * q_scale
    if cache is not None:
        if cache[0] is not None:
            k = ops.concat([cache[0], k], axis=2)
            v = ops.concat([cache[1], v], axis=2)
        cache[0], cache[1] = k, v
    scale = a.attention_multiplier if a.attention_multiplier is not None else 1.0 / math.sqrt(D)
    o = ops.attention(q, k, v, scale, segment_ids, window=a.window(i),
                      sinks=lp["self_attn.sinks"] if a.attention_sinks else None)
    o = ops.swapaxes(o, 1, 2).reshape(b, t, -1)
    return project(ops, lp, "self_attn.o_proj", o, lora, qc)


def _rotate(ops, x, cos, sin, interleaved=False):
    """RoPE on the leading dims the tables cover (all of them unless partial rotary).
    Interleaved pairs (2j, 2j+1) are gathered as (j, j + rd/2) and rotated in the half-split
    layout; q and k get the same reordering, so their dot products are those of the
    interleaved rotation and the reordering is never undone."""
    rd = cos.shape[-1]
    if interleaved:
        x = ops.concat([x[..., 0:rd:2], x[..., 1:rd:2], x[..., rd:]], axis=-1)
    if rd == x.shape[-1]:
        return ops.apply_rope(x, cos, sin)
    return ops.concat([ops.apply_rope(x[..., :rd], cos, sin), x[..., rd:]], axis=-1)


def norm(ops, a: ModelArgs, lp: dict, name: str, x):
    """The model's norm `name` (RMSNorm, or LayerNorm with its bias) applied to x."""
    if a.layer_norm:
        return ops.layer_norm(x, lp[name + ".weight"], lp[name + ".bias"], a.rms_norm_eps)
    return ops.rms_norm(x, lp[name + ".weight"], a.rms_norm_eps)


def mlp_block(ops, a: ModelArgs, lp: dict, x, lora):
    qc = a.quantization
    if a.plain_mlp:
        h = project(ops, lp, "mlp.c_fc", x, lora, qc)
        return project(ops, lp, "mlp.c_proj", _act(ops, a, h), lora, qc)
    if a.fused_gate_up:  # one projection, its output split as gate | up
        gate_up = project(ops, lp, "mlp.gate_up_proj", x, lora, qc)
        F = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :F], gate_up[..., F:]
    else:
        gate = project(ops, lp, "mlp.gate_proj", x, lora, qc)
        up = project(ops, lp, "mlp.up_proj", x, lora, qc)
    return project(ops, lp, "mlp.down_proj", _act(ops, a, gate) * up, lora, qc)


def _act(ops, a: ModelArgs, x):
    return ops.gelu_tanh(x) if a.hidden_act in GELU_TANH else ops.silu(x)


def feed_forward(ops, a: ModelArgs, i: int, lp: dict, x, lora):
    """Layer i's MLP: the sparse mixture of experts where the model has one, else dense."""
    if a.is_moe_layer(i):
        return moe.moe_block(ops, a, lp, x, lora)
    return mlp_block(ops, a, lp, x, lora)


def decoder_layer(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids=None,
                  cache=None, lora=None, q_scale=None):
    if a.post_norms:  # OLMo 2: each sublayer's output is normed before the residual add
        eps = a.rms_norm_eps
        h = x + ops.rms_norm(attention_block(ops, a, i, lp, x, cos, sin, segment_ids, cache,
                                             lora, q_scale),
                             lp["post_attention_layernorm.weight"], eps)
        return h + ops.rms_norm(feed_forward(ops, a, i, lp, h, lora),
                                lp["post_feedforward_layernorm.weight"], eps)
    normed = norm(ops, a, lp, "input_layernorm", x)
    attn = attention_block(ops, a, i, lp, normed, cos, sin, segment_ids, cache, lora, q_scale)
    if a.sandwich_norms:
        attn = norm(ops, a, lp, "post_self_attn_layernorm", attn)
    rm = a.residual_multiplier
    h = x + (attn if rm == 1.0 else attn * rm)
    normed = norm(ops, a, lp, "post_attention_layernorm", h)
    mlp = feed_forward(ops, a, i, lp, normed, lora)
    if a.sandwich_norms:
        mlp = norm(ops, a, lp, "post_mlp_layernorm", mlp)
    return h + (mlp if rm == 1.0 else mlp * rm)


def hidden_states(ops, a: ModelArgs, params: dict, input_ids, positions, segment_ids=None,
                  cache=None, lora=None, recompute=False):
    """The final normed hidden states (B, T, C). positions (B, T) int; cache is a list of
    [k, v] pairs per layer for generation; recompute stores only layer inputs."""
    x = ops.embedding(input_ids, params["model.embed_tokens.weight"])
    if a.embedding_multiplier != 1.0:
        x = x * a.embedding_multiplier
    tables = {lt: rope_tables(ops, r, positions, ops.dtype_name(x)) for lt, r in a.ropes.items()}
    q_scale = query_scales(ops, a, positions, ops.dtype_name(x))
    for i, lp in enumerate(split_layers(params, a.num_hidden_layers)):
        cos, sin = tables[a.layer_types[i]]
        if a.nope_layers is not None and a.nope_layers[i]:
            cos = sin = None
        if recompute:
            x = _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora, q_scale)
        else:
            x = decoder_layer(ops, a, i, lp, x, cos, sin, segment_ids,
                              None if cache is None else cache[i], lora, q_scale)
    h = norm(ops, a, params, "model.norm", x)
    # logits / s = (h / s) W^T: the head and the fused loss both see the scaled states
    return h if a.logits_scaling == 1.0 else h * (1.0 / a.logits_scaling)


def rope_tables(ops, r, positions, dtype):
    """cos and sin (B, 1, T, rotary dims) of a models.rope.Rope. LongRoPE takes its long set
    when the largest position + 1 exceeds its switch length, for the whole forward (as
    transformers does), chosen by arithmetic so compiled graphs need no host sync."""
    scaled = r.attention_scaling != 1.0
    tdt = "float32" if scaled else dtype
    cos, sin = ops.rope_tables(positions, r.inv_freq, tdt)
    if r.long_inv_freq is not None:
        cos_l, sin_l = ops.rope_tables(positions, r.long_inv_freq, tdt)
        use_long = ops.cast(positions.max() >= r.long_after, tdt)
        cos = cos * (1 - use_long) + cos_l * use_long
        sin = sin * (1 - use_long) + sin_l * use_long
    if scaled:
        cos = ops.cast(cos * r.attention_scaling, dtype)
        sin = ops.cast(sin * r.attention_scaling, dtype)
    return cos, sin


def query_scales(ops, a: ModelArgs, positions, dtype):
    """(B, 1, T, 1) factors 1 + beta * ln(1 + floor(position / period)) for the queries, or
    None. Few distinct values exist, so they are looked up in a numpy-built table."""
    if a.query_position_scale is None:
        return None
    beta, period = a.query_position_scale
    n = 4 * max(a.max_position_embeddings, period) // period + 2  # headroom past the max
    table = (1 + beta * np.log1p(np.arange(n, dtype=np.float64))).astype(np.float32)
    s = ops.embedding(positions // period, ops.from_numpy(table[:, None], dtype))
    b, t = positions.shape
    return s.reshape(b, 1, t, 1)


def _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora, q_scale=None):
    """A layer whose activations are recomputed in the backward pass. Only the adapter
    leaves and x are arguments: frozen weights are closed over, so no gradient is ever
    formed for them."""
    trainable = {k: v for k, v in lp.items() if ".lora_" in k}
    frozen = {k: v for k, v in lp.items() if ".lora_" not in k}

    def run(train, x_):
        return decoder_layer(ops, a, i, {**frozen, **train}, x_, cos, sin, segment_ids, None,
                             lora, q_scale)
    return ops.checkpoint(run)(trainable, x)


def output_weight(params: dict):
    """The lm-head matrix (V, C): its own, or the tied embedding table."""
    return params.get("lm_head.weight", params["model.embed_tokens.weight"])
