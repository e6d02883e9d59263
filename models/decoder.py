"""The one decoder: every family is this forward pass with its `ModelArgs` switches set.

Parameters are a flat dict keyed by the Hugging Face names
(`model.layers.3.self_attn.q_proj.weight`), so safetensors, PEFT and mlx-lm names need no
mapping table. The functions take the backend object `ops` (backends/base.py) and call
only its ops; every projection goes through `core.lora.project`, which applies the adapter
leaves sitting beside a frozen weight, so this file knows nothing of LoRA or quantization.
"""

from __future__ import annotations

import math

from lorafit.core.lora import project
from lorafit.models.blocks import gated_deltanet
from lorafit.models.rope import apply_partial_rope
from lorafit.models.spec import ModelArgs

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION + MLP  # every projection an adapter can target ("all-linear")


def linear_modules(a: ModelArgs) -> tuple:
    """The projection names of this model, the names LoRA targets choose from."""
    if "linear_attention" in a.layer_types:
        return LINEAR_MODULES + gated_deltanet.names(a)
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
            p + "self_attn.q_proj.weight": (Hq * D * (2 if a.attention_output_gate else 1), C),
            p + "self_attn.k_proj.weight": (Hk * D, C),
            p + "self_attn.v_proj.weight": (Hk * D, C),
            p + "self_attn.o_proj.weight": (C, Hq * D),
            p + "mlp.gate_proj.weight": (F, C),
            p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F),
        })
        if a.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (Hq * D * (2 if a.attention_output_gate
                                                                 else 1),),
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
        if a.layer_types[i] == "linear_attention":  # a Gated DeltaNet mixer, no self_attn
            for k in [k for k in shapes if k.startswith(p + "self_attn.")]:
                del shapes[k]
            shapes.update(gated_deltanet.parameter_shapes(a, p))
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


def attention_block(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids, cache,
                    lora):
    """Self-attention of layer i (full or sliding-window, as a.layer_types says)."""
    b, t, _ = x.shape  # (B, T, C)
    D, qc = a.head_dim, a.quantization
    q = project(ops, lp, "self_attn.q_proj", x, lora, qc).reshape(b, t, -1, D)
    if a.attention_output_gate:  # per head: D query dims, then D gate dims
        q = q.reshape(b, t, -1, 2 * D)
        q, gate = q[..., :D], q[..., D:].reshape(b, t, -1)
    k = project(ops, lp, "self_attn.k_proj", x, lora, qc).reshape(b, t, -1, D)
    v = project(ops, lp, "self_attn.v_proj", x, lora, qc).reshape(b, t, -1, D)
    if a.qk_norm:
        q = rms_norm(ops, a, q, lp["self_attn.q_norm.weight"])
        k = rms_norm(ops, a, k, lp["self_attn.k_norm.weight"])
    q, k, v = (ops.swapaxes(z, 1, 2) for z in (q, k, v))  # (B, H, T, D)
    q, k = (apply_partial_rope(ops, z, cos, sin, a.rotary_dim) for z in (q, k))
    if cache is not None:
        if cache[0] is not None:
            k = ops.concat([cache[0], k], axis=2)
            v = ops.concat([cache[1], v], axis=2)
        cache[0], cache[1] = k, v
    o = ops.attention(q, k, v, 1.0 / math.sqrt(D), segment_ids, window=a.window(i))
    o = ops.swapaxes(o, 1, 2).reshape(b, t, -1)
    if a.attention_output_gate:
        o = o * ops.sigmoid(gate)
    return project(ops, lp, "self_attn.o_proj", o, lora, qc)


def mlp_block(ops, a: ModelArgs, lp: dict, x, lora):
    qc = a.quantization
    gate = project(ops, lp, "mlp.gate_proj", x, lora, qc)
    up = project(ops, lp, "mlp.up_proj", x, lora, qc)
    return project(ops, lp, "mlp.down_proj", ops.silu(gate) * up, lora, qc)


def rms_norm(ops, a: ModelArgs, x, weight):
    """The model's RMSNorm: Llama's x * w, or (norm_unit_offset) Gemma/Qwen3.5's
    x * (1 + w), formed in float32 and returned in x's dtype."""
    if not a.norm_unit_offset:
        return ops.rms_norm(x, weight, a.rms_norm_eps)
    y = ops.rms_norm(ops.cast(x, "float32"), ops.cast(weight, "float32") + 1.0, a.rms_norm_eps)
    return ops.cast(y, ops.dtype_name(x))


def decoder_layer(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids=None,
                  cache=None, lora=None):
    normed = rms_norm(ops, a, x, lp["input_layernorm.weight"])
    if a.layer_types[i] == "linear_attention":
        h = x + gated_deltanet.block(ops, a, lp, normed, segment_ids, cache, lora)
    else:
        h = x + attention_block(ops, a, i, lp, normed, cos, sin, segment_ids, cache, lora)
    normed = rms_norm(ops, a, h, lp["post_attention_layernorm.weight"])
    return h + mlp_block(ops, a, lp, normed, lora)


def hidden_states(ops, a: ModelArgs, params: dict, input_ids, positions, segment_ids=None,
                  cache=None, lora=None, recompute=False):
    """The final normed hidden states (B, T, C). positions (B, T) int; cache is a list of
    two-slot lists per layer for generation ([k, v] for attention layers, [conv state,
    recurrent state] for linear-attention ones); recompute stores only layer inputs."""
    x = ops.embedding(input_ids, params["model.embed_tokens.weight"])
    cos, sin = ops.rope_tables(positions, a.inv_freq, ops.dtype_name(x))
    for i, lp in enumerate(split_layers(params, a.num_hidden_layers)):
        if recompute:
            x = _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora)
        else:
            x = decoder_layer(ops, a, i, lp, x, cos, sin, segment_ids,
                              None if cache is None else cache[i], lora)
    return rms_norm(ops, a, x, params["model.norm.weight"])


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


def output_weight(params: dict):
    """The lm-head matrix (V, C): its own, or the tied embedding table."""
    return params.get("lm_head.weight", params["model.embed_tokens.weight"])
