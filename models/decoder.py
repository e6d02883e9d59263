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

from lorafit.backends.base import LAYERS, SHARDED_LAYER
from lorafit.core.lora import project, project_shared
from lorafit.models.blocks import gated_deltanet, moe
from lorafit.models.spec import GELU_TANH, ModelArgs

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION + MLP  # every projection an adapter can target ("all-linear")
PER_LAYER_INPUT = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")


def linear_modules(a: ModelArgs) -> tuple:
    """The projection names of this model, the names LoRA targets choose from."""
    mixer = gated_deltanet.names(a) if "linear_attention" in a.layer_types else ()
    if a.num_local_experts:
        return moe.linear_modules(a, ATTENTION + mixer, MLP) + \
            (PER_LAYER_INPUT if a.per_layer_input_size else ())
    attention = ("qkv_proj", "o_proj") if a.fused_qkv else ATTENTION
    mlp = ("gate_up_proj", "down_proj") if a.fused_gate_up else MLP
    mlp = ("c_fc", "c_proj") if a.plain_mlp else mlp
    return attention + mlp + mixer + (PER_LAYER_INPUT if a.per_layer_input_size else ())


def sublayer_norms(a: ModelArgs) -> tuple:
    """A layer's norm names: (on the attention input, on its output, on the MLP input, on
    its output), None where the family has none."""
    if a.post_norms:  # OLMo 2, EXAONE 4
        return None, "post_attention_layernorm", None, "post_feedforward_layernorm"
    if a.sandwich_norms:  # GLM-4
        return ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                "post_mlp_layernorm")
    if a.feedforward_norms:  # Gemma
        return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
    return "input_layernorm", None, "post_attention_layernorm", None


def parameter_shapes(a: ModelArgs) -> dict:
    """Every frozen parameter's name and logical shape: the model's whole state dict."""
    Hq, C = a.num_attention_heads, a.hidden_size
    shapes = {"model.embed_tokens.weight": (a.vocab_size, C), "model.norm.weight": (C,)}
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab_size, C)
    for i in range(a.num_hidden_layers):
        p = f"{LAYERS}{i}."
        D, Hk, F = a.head_dim_of(i), a.kv_heads_of(i), a.intermediate_of(i)
        shapes.update({p + n + ".weight": (C,) for n in sublayer_norms(a) if n})
        shapes.update({
            p + "self_attn.q_proj.weight": (Hq * D, C),
            p + "self_attn.k_proj.weight": (Hk * D, C),
            p + "self_attn.v_proj.weight": (Hk * D, C),
            p + "self_attn.o_proj.weight": (C, Hq * D),
        })
        if a.is_moe_layer(i):
            shapes.update(moe.parameter_shapes(a, p))
        if not a.is_moe_layer(i) or a.experts_beside_mlp:
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
        _layer_variants(a, i, p, shapes)
        _gemma4_layer(a, i, p, shapes)
    if a.layer_norm:
        shapes["model.norm.bias"] = (C,)
    if a.per_layer_input_size:
        LP = a.num_hidden_layers * a.per_layer_input_size
        shapes.update({"model.embed_tokens_per_layer.weight": (a.per_layer_vocab or a.vocab_size,
                                                               LP),
                       "model.per_layer_model_projection.weight": (LP, C),
                       "model.per_layer_projection_norm.weight": (a.per_layer_input_size,)})
    return shapes


def _layer_variants(a: ModelArgs, i: int, p: str, shapes: dict) -> None:
    """Layer i's shapes changed for the layouts that differ from Llama's (fused
    projections, whole-projection q/k norms, q's output gate, a plain MLP, LayerNorm biases,
    a Gated DeltaNet in place of self-attention)."""
    D, Hq, Hk, C, F = a.head_dim_of(i), a.num_attention_heads, a.kv_heads_of(i), \
        a.hidden_size, a.intermediate_of(i)
    if a.fused_qkv:
        for n in ("q", "k", "v"):
            del shapes[p + f"self_attn.{n}_proj.weight"]
        shapes[p + "self_attn.qkv_proj.weight"] = ((Hq + 2 * Hk) * D, C)
    if a.fused_gate_up:
        del shapes[p + "mlp.gate_proj.weight"], shapes[p + "mlp.up_proj.weight"]
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * F, C)
    if a.qk_norm_whole:
        shapes.update({p + "self_attn.q_norm.weight": (Hq * D,),
                       p + "self_attn.k_norm.weight": (Hk * D,)})
    if a.attention_output_gate:  # q_proj makes the gate too: 2 * D per head
        for k in [k for k in shapes if k.startswith(p + "self_attn.q_proj.")]:
            shapes[k] = (2 * shapes[k][0],) + shapes[k][1:]
    if a.plain_mlp:
        for n in ("gate", "up", "down"):
            shapes.pop(p + f"mlp.{n}_proj.weight", None)
            shapes.pop(p + f"mlp.{n}_proj.bias", None)
        shapes.update({p + "mlp.c_fc.weight": (F, C), p + "mlp.c_proj.weight": (C, F)})
        if a.mlp_bias:
            shapes.update({p + "mlp.c_fc.bias": (F,), p + "mlp.c_proj.bias": (C,)})
    if a.layer_norm:
        shapes.update({k[:-len("weight")] + "bias": v for k, v in shapes.items()
                       if k.startswith(p) and k.endswith("layernorm.weight")})
    if a.layer_types[i] == "linear_attention":  # a Gated DeltaNet mixer, no self_attn
        for k in [k for k in shapes if k.startswith(p + "self_attn.")]:
            del shapes[k]
        shapes.update(gated_deltanet.parameter_shapes(a, p))


def _gemma4_layer(a: ModelArgs, i: int, p: str, shapes: dict) -> None:
    """Gemma 4's layer i: no k/v projections where it reuses an earlier layer's k, v, no
    v_proj where v is k's projection, per-layer input projections, a stored scalar."""
    gone = (p + "self_attn.k_", p + "self_attn.v_") if a.kv_source(i) is not None else \
        (p + "self_attn.v_proj.",) if not a.has_v_proj(i) else ()
    for k in [k for k in shapes if gone and k.startswith(gone)]:
        del shapes[k]
    if a.per_layer_input_size:
        P, C = a.per_layer_input_size, a.hidden_size
        shapes.update({p + "per_layer_input_gate.weight": (P, C),
                       p + "per_layer_projection.weight": (C, P),
                       p + "post_per_layer_input_norm.weight": (C,)})
    if a.layer_scalar:
        shapes[p + "layer_scalar"] = (1,)


def projection_weights(a: ModelArgs) -> set:
    """Names of the `.weight` tensors of projections (what quantization applies to; their
    biases stay dense, added after the quantized matmul)."""
    names = linear_modules(a)
    return {k for k in parameter_shapes(a)
            if k.endswith(".weight") and k.rsplit(".", 2)[-2] in names}


# -- forward ------------------------------------------------------------------------------

def split_layers(params: dict, num_layers: int) -> list[dict]:
    """Per layer, its parameters under their names within the layer (one pass)."""
    layers = [{} for _ in range(num_layers)]
    for k, v in params.items():
        if k.startswith(LAYERS):
            i, rest = k[len(LAYERS):].split(".", 1)
            layers[int(i)][rest] = v
    return layers


def rms_norm(ops, a: ModelArgs, x, weight):
    """The family's RMSNorm of x: Llama's (normalised in float32, cast, times w) or, with
    a.norm_offset, computed wholly in float32 times (offset + w), then cast."""
    if a.norm_offset is None:
        return ops.rms_norm(x, weight, a.rms_norm_eps)
    w = ops.cast(weight, "float32")
    if a.norm_offset:
        w = w + a.norm_offset
    return ops.cast(ops.rms_norm(ops.cast(x, "float32"), w, a.rms_norm_eps), ops.dtype_name(x))


def norm(ops, a: ModelArgs, lp: dict, name: str, x):
    """The model's norm `name` (the family's RMSNorm, or LayerNorm with its bias) of x."""
    if a.layer_norm:
        return ops.layer_norm(x, lp[name + ".weight"], lp[name + ".bias"], a.rms_norm_eps)
    return rms_norm(ops, a, x, lp[name + ".weight"])


def attention_scale(a: ModelArgs, i: int) -> float:
    """The score scale of layer i: attention_multiplier (granite), query_pre_attn_scalar
    ** -0.5 (Gemma), else 1/sqrt(head_dim)."""
    if a.attention_multiplier is not None:
        return a.attention_multiplier
    if a.query_pre_attn_scalar is not None:
        return float(a.query_pre_attn_scalar) ** -0.5
    return 1.0 / math.sqrt(a.head_dim_of(i))


def _project_qkv(ops, a: ModelArgs, i: int, lp: dict, x, lora, own_kv: bool):
    """q, k, v of layer i as projected, (B, T, width) each (k, v None without own_kv)."""
    qc = a.quantization
    if a.fused_qkv:  # one projection, its output split as q | k | v
        D = a.head_dim_of(i)
        qkv = project(ops, lp, "self_attn.qkv_proj", x, lora, qc)
        nq, nk = a.num_attention_heads * D, a.kv_heads_of(i) * D
        return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    if not own_kv:
        return project(ops, lp, "self_attn.q_proj", x, lora, qc), None, None
    if not a.has_v_proj(i):
        q, k = project_shared(ops, lp, ("self_attn.q_proj", "self_attn.k_proj"), x, lora, qc)
        return q, k, k
    return tuple(project_shared(ops, lp, ("self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj"), x, lora, qc))


def _heads(ops, a: ModelArgs, lp: dict, name: str, z, b: int, t: int, D: int):
    """z (B, T, H*D) as (B, H, T, D), with the per-head norm `name` where the model has it."""
    z = z.reshape(b, t, -1, D)
    if name == "v" and a.v_norm:  # RMSNorm without weight
        z = rms_norm(ops, a, z, ops.cast(ops.from_numpy(np.ones(D, np.float32)),
                                         ops.dtype_name(z)))
    elif name != "v" and a.qk_norm:
        z = rms_norm(ops, a, z, lp[f"self_attn.{name}_norm.weight"])
    return ops.swapaxes(z, 1, 2)


def attention_block(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids, cache,
                    lora, q_scale=None, shared=None):
    """Self-attention of layer i (full or sliding-window, as a.layer_types says). shared
    ({layer: (k, v)}, Gemma 4) receives this layer's k, v, or gives those of the layer
    whose k, v this one reuses."""
    b, t, _ = x.shape  # (B, T, C)
    D, source = a.head_dim_of(i), a.kv_source(i)
    q, k, v = _project_qkv(ops, a, i, lp, x, lora, source is None)
    lengths = None  # per-row key lengths, with the engine's cache
    if a.qk_norm_whole:
        q = rms_norm(ops, a, q, lp["self_attn.q_norm.weight"])
        k = rms_norm(ops, a, k, lp["self_attn.k_norm.weight"])
    gate = None
    if a.attention_output_gate:  # per head: D query dims, then D gate dims
        q = q.reshape(b, t, -1, 2 * D)
        q, gate = q[..., :D].reshape(b, t, -1), q[..., D:].reshape(b, t, -1)
    q = _heads(ops, a, lp, "q", q, b, t, D)  # (B, H, T, D)
    if cos is not None:  # None on a NoPE layer
        q = _rotate(ops, q, cos, sin, a.rope_interleaved)
    if q_scale is not None:
        q = q * q_scale
    if source is not None:
        k, v = shared[source]
    else:
        k, v = _heads(ops, a, lp, "k", k, b, t, D), _heads(ops, a, lp, "v", v, b, t, D)
        if cos is not None:
            k = _rotate(ops, k, cos, sin, a.rope_interleaved)
        if isinstance(cache, list):
            if cache[0] is not None:
                k = ops.concat([cache[0], k], axis=2)
                v = ops.concat([cache[1], v], axis=2)
            cache[0], cache[1] = k, v
        elif cache is not None:  # the engine's preallocated cache (models/kv_cache.py)
            k, v, lengths = cache.update(k, v)
        if shared is not None:
            shared[i] = (k, v)
    o = ops.attention(q, k, v, attention_scale(a, i), segment_ids, window=a.window(i),
                      softcap=a.attn_logit_softcapping,
                      sinks=lp["self_attn.sinks"] if a.attention_sinks else None,
                      lengths=lengths)
    o = ops.swapaxes(o, 1, 2).reshape(b, t, -1)
    if gate is not None:
        o = o * ops.sigmoid(gate)
    return project(ops, lp, "self_attn.o_proj", o, lora, a.quantization)


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
        gate, up = project_shared(ops, lp, ("mlp.gate_proj", "mlp.up_proj"), x, lora, qc)
    return project(ops, lp, "mlp.down_proj", _act(ops, a, gate) * up, lora, qc)


def _act(ops, a: ModelArgs, x):
    return ops.gelu_tanh(x) if a.hidden_act in GELU_TANH else ops.silu(x)


def feed_forward(ops, a: ModelArgs, i: int, lp: dict, x, lora, residual=None):
    """Layer i's MLP: the sparse mixture of experts where the model has one, else dense;
    Gemma 4's dense MLP with experts beside it, which read the residual stream."""
    if a.experts_beside_mlp and a.is_moe_layer(i):
        return moe.experts_beside_mlp(ops, a, lp, mlp_block(ops, a, lp, x, lora), residual,
                                      lora, lambda name, z: norm(ops, a, lp, name, z))
    if a.is_moe_layer(i):
        return moe.moe_block(ops, a, lp, x, lora)
    return mlp_block(ops, a, lp, x, lora)


def decoder_layer(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids=None,
                  cache=None, lora=None, q_scale=None, shared=None, per_layer_input=None):
    """Layer i: attention, then the feed-forward, each between its norms (sublayer_norms)
    and added to the residual stream; Gemma 4's per-layer input and scalar last."""
    pre_attn, post_attn, pre_mlp, post_mlp = sublayer_norms(a)
    h = x if pre_attn is None else norm(ops, a, lp, pre_attn, x)
    h = token_mixer(ops, a, i, lp, h, cos, sin, segment_ids, cache, lora, q_scale, shared)
    x = _residual(a, x, h if post_attn is None else norm(ops, a, lp, post_attn, h))
    h = x if pre_mlp is None else norm(ops, a, lp, pre_mlp, x)
    h = feed_forward(ops, a, i, lp, h, lora, x)
    x = _residual(a, x, h if post_mlp is None else norm(ops, a, lp, post_mlp, h))
    if per_layer_input is not None:
        x = per_layer_input_block(ops, a, lp, x, per_layer_input, lora)
    if a.layer_scalar:
        x = x * lp["layer_scalar"]
    return x


def token_mixer(ops, a: ModelArgs, i: int, lp: dict, x, cos, sin, segment_ids, cache, lora,
                q_scale=None, shared=None):
    """Layer i's token mixer: a Gated DeltaNet on linear_attention layers, else attention."""
    if a.layer_types[i] == "linear_attention":
        return gated_deltanet.block(ops, a, lp, x, segment_ids, cache, lora)
    return attention_block(ops, a, i, lp, x, cos, sin, segment_ids, cache, lora, q_scale,
                           shared)


def _residual(a: ModelArgs, x, y):
    """x + y, y times the residual multiplier (granite)."""
    rm = a.residual_multiplier
    return x + (y if rm == 1.0 else y * rm)


def embed(ops, a: ModelArgs, params: dict, input_ids):
    """Token embeddings, times embedding_multiplier (granite) or sqrt(hidden) rounded to the
    compute dtype first (Gemma's embed_scale)."""
    x = ops.embedding(input_ids, params["model.embed_tokens.weight"])
    if a.embed_scale:
        x = x * ops.cast(ops.from_numpy(np.array(math.sqrt(a.hidden_size), np.float32)),
                         ops.dtype_name(x))
    if a.embedding_multiplier != 1.0:
        x = x * a.embedding_multiplier
    return x


def hidden_states(ops, a: ModelArgs, params: dict, input_ids, positions, segment_ids=None,
                  cache=None, lora=None, recompute=False):
    """The final normed hidden states (B, T, C). positions (B, T) int; cache is a list of
    two-slot lists per layer for generation ([k, v] for attention layers, [conv state,
    recurrent state] for linear-attention ones); recompute stores only layer inputs."""
    x = embed(ops, a, params, input_ids)
    tables = {lt: rope_tables(ops, r, positions, ops.dtype_name(x)) for lt, r in a.ropes.items()}
    q_scale = query_scales(ops, a, positions, ops.dtype_name(x))
    per_layer = per_layer_inputs(ops, a, params, input_ids, x, lora) \
        if a.per_layer_input_size else None
    shared = {} if a.kv_shared_layers else None
    layers = split_layers(params, a.num_hidden_layers)
    # a base sharded across processes (--shard): each layer gathers its weights and runs
    # recomputed, so the gathered weights live for one layer only (backends/torch/
    # sharded_base.py); with a cache (generation) they are gathered for the forward alone
    sharded = cache is None and any(SHARDED_LAYER in lp for lp in layers)
    for i, lp in enumerate(layers):
        cos, sin = tables[a.layer_types[i]]
        if a.nope_layers is not None and a.nope_layers[i]:
            cos = sin = None
        pli = None if per_layer is None else per_layer[:, :, i, :]
        if recompute or sharded:
            x = _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora, q_scale,
                                  shared, pli)
        elif cache is None and shared is None and pli is None and _compilable(a, i):
            # the same code for every layer of a kind: compiled once under --compile
            run = ops.compiled_layer(layer_kind(a, i), _layer_function(ops, a, i, lora))
            x = run(ops.gather_frozen(lp), x, cos, sin, segment_ids, q_scale)
        else:
            x = decoder_layer(ops, a, i, ops.gather_frozen(lp), x, cos, sin, segment_ids,
                              None if cache is None else cache[i], lora, q_scale, shared, pli)
    h = norm(ops, a, params, "model.norm", x)
    # logits / s = (h / s) W^T: the head and the fused loss both see the scaled states
    return h if a.logits_scaling == 1.0 else h * (1.0 / a.logits_scaling)


def layer_kind(a: ModelArgs, i: int) -> tuple:
    """Everything layer i's code reads of its index (its shapes and switches): layers of one
    kind run the same code on other weights, so they share one compiled layer (--compile)."""
    return (a.layer_types[i], a.head_dim_of(i), a.kv_heads_of(i), a.intermediate_of(i),
            a.is_moe_layer(i), a.has_v_proj(i), a.kv_source(i), a.window(i),
            attention_scale(a, i), bool(a.nope_layers is not None and a.nope_layers[i]))


def _compilable(a: ModelArgs, i: int) -> bool:
    """Layers that go through ops.compiled_layer: dense self-attention layers. Experts
    (their row counts read on the host) and Gated DeltaNet mixers stay as they are."""
    return a.layer_types[i] != "linear_attention" and not a.is_moe_layer(i)


def _layer_function(ops, a: ModelArgs, i: int, lora):
    """Layer i as a function of its weights and activations alone (ops.compiled_layer)."""
    def layer(lp, x, cos, sin, segment_ids, q_scale):
        return decoder_layer(ops, a, i, lp, x, cos, sin, segment_ids, None, lora, q_scale)
    return layer


def per_layer_inputs(ops, a: ModelArgs, params: dict, input_ids, x, lora):
    """Gemma 4's per-layer inputs (B, T, L, P): the token's row of the per-layer table
    (times sqrt(P)) and a projection of the scaled embeddings (times C^-1/2, normed per
    layer), summed and times 2^-1/2."""
    b, t = input_ids.shape
    L, P = a.num_hidden_layers, a.per_layer_input_size
    tok = ops.embedding(input_ids, params["model.embed_tokens_per_layer.weight"])
    tok = tok * ops.cast(ops.from_numpy(np.array(math.sqrt(P), np.float32)), ops.dtype_name(tok))
    proj = project(ops, params, "model.per_layer_model_projection", x, lora, a.quantization)
    proj = rms_norm(ops, a, (proj * a.hidden_size ** -0.5).reshape(b, t, L, P),
                    params["model.per_layer_projection_norm.weight"])
    return (proj + tok.reshape(b, t, L, P)) * 2.0 ** -0.5


def per_layer_input_block(ops, a: ModelArgs, lp: dict, x, per_layer_input, lora):
    """x + norm(W_up (gelu(W_gate x) * per_layer_input)): Gemma 4's per-layer residual."""
    qc = a.quantization
    gate = ops.gelu_tanh(project(ops, lp, "per_layer_input_gate", x, lora, qc))
    y = project(ops, lp, "per_layer_projection", gate * per_layer_input, lora, qc)
    return x + norm(ops, a, lp, "post_per_layer_input_norm", y)


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


def _recomputed_layer(ops, a, i, lp, x, cos, sin, segment_ids, lora, q_scale=None,
                      shared=None, pli=None):
    """A layer whose activations are recomputed in the backward pass. Only the adapter
    leaves, x (and what carries gradients from elsewhere: per-layer input, reused k, v) are
    arguments: frozen weights are closed over, so no gradient is ever formed for them.
    A layer whose k, v later layers reuse returns them as outputs too."""
    trainable = {k: v for k, v in lp.items() if ".lora_" in k}
    frozen = {k: v for k, v in lp.items() if ".lora_" not in k}
    source, produces = a.kv_source(i), shared is not None and i in a.kv_producers()
    extra = (() if pli is None else (pli,)) + (shared[source] if source is not None else ())

    # a plain layer runs as compiled_layer gives it now (--compile), the re-run included
    plain = None if shared is not None or pli is not None or not _compilable(a, i) else \
        ops.compiled_layer(layer_kind(a, i), _layer_function(ops, a, i, lora))

    def run(train, x_, *rest):
        if plain is not None:
            return plain({**ops.gather_frozen(frozen), **train}, x_, cos, sin, segment_ids,
                         q_scale)
        p_ = rest[0] if pli is not None else None
        local = {source: tuple(rest[-2:])} if source is not None else {}
        out = decoder_layer(ops, a, i, {**ops.gather_frozen(frozen), **train}, x_, cos, sin,
                            segment_ids, None,
                            lora, q_scale, local if shared is not None else None, p_)
        return (out, *local[i]) if produces else out
    out = ops.checkpoint(run)(trainable, x, *extra)
    if produces:
        out, k, v = out
        shared[i] = (k, v)
    return out


def head(ops, a: ModelArgs, h, weight):
    """Logits of final hidden states: h @ weight^T, soft-capped where the family says so."""
    logits = ops.linear(h, weight)
    if a.final_logit_softcapping:
        logits = ops.softcap(logits, float(a.final_logit_softcapping))
    return logits


def output_weight(params: dict):
    """The lm-head matrix (V, C): its own, or the tied embedding table."""
    return params.get("lm_head.weight", params["model.embed_tokens.weight"])
