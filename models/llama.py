"""The Llama family (llama, mistral, qwen2, qwen3): one decoder with a few flags.

Parameters are a flat dict keyed by the Hugging Face names
(`model.layers.3.self_attn.q_proj.weight`), so safetensors, PEFT and mlx-lm names need no
mapping table. LoRA leaves sit beside the frozen weight (`...q_proj.lora_A.weight`) and are
picked up by `project`, whatever backend the arrays live on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from lorafit.core.errors import LorafitError
from lorafit.models.rope import inverse_frequencies

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTN + MLP


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v (and o for llama)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over each head of q and k
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    torch_dtype: str | None = None
    quantization: dict | None = None  # {"bits", "group_size"}: frozen projections quantized
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.hidden_act not in ("silu", "swish"):
            raise LorafitError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LorafitError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a config.json dict: unknown keys are kept in `extra`, and the
        per-family defaults (qwen2 biases, qwen3 q/k norm) are applied."""
        cfg = dict(cfg)
        mt = cfg.get("model_type")
        rope = cfg.pop("rope_parameters", None)  # transformers >= 5 layout
        if rope:
            cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if mt == "qwen2":
            cfg["attention_bias"] = True
        elif mt == "qwen3":
            cfg["qk_norm"] = True
        elif mt == "llama" and cfg.get("attention_bias"):
            cfg["o_proj_bias"] = True
        if "torch_dtype" not in cfg and "dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [n for n in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if cfg.get(n) is None]
        if missing:
            raise LorafitError(f"config.json lacks required field(s): {', '.join(missing)}")
        known = {k: v for k, v in cfg.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in cfg.items() if k not in names})

    @property
    def inv_freq(self):
        return inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)


def parameter_shapes(a: ModelArgs) -> dict:
    """Every frozen parameter's name and shape: the model's whole state dict."""
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
    return shapes


def sanitize(weights: dict, a: ModelArgs) -> dict:
    """Drop what checkpoints carry but the model does not use."""
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if a.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return weights


# -- forward ------------------------------------------------------------------------------

_LAYER_KEYS = tuple(
    f"{group}.{m}.{leaf}"
    for group, mods in (("self_attn", ATTN), ("mlp", MLP))
    for m in mods
    for leaf in ("weight", "bias", "scales", "biases", "lora_A.weight", "lora_B.weight",
                 "lora_magnitude_vector")
) + ("input_layernorm.weight", "post_attention_layernorm.weight",
     "self_attn.q_norm.weight", "self_attn.k_norm.weight")


def layer_params(params: dict, i: int) -> dict:
    p = f"model.layers.{i}."
    return {k: params[p + k] for k in _LAYER_KEYS if p + k in params}


def _quant(lp, name, quant_cfg):
    return quant_cfg if quant_cfg and name + ".scales" in lp else None


def base_linear(B, lp, name, x, quant, bias=None):
    """The frozen projection, full precision or quantized (packed weight, scales, biases)."""
    if quant is None:
        return B.linear(x, lp[name + ".weight"], bias)
    y = B.quantized_linear(x, lp[name + ".weight"], lp[name + ".scales"],
                           lp.get(name + ".biases"), quant["bits"], quant["group_size"])
    return y + bias if bias is not None else y


def dense_weight(B, lp, name, quant):
    """The frozen weight as a dense matrix (dequantized when stored quantized)."""
    if quant is None:
        return lp[name + ".weight"]
    return B.dequantize(lp[name + ".weight"], lp[name + ".scales"], lp.get(name + ".biases"),
                        quant["bits"], quant["group_size"])


def project(B, lp: dict, name: str, x, lora, quant_cfg=None):
    """A linear projection with its LoRA pair, if any: x W^T + b + s * drop(x) A^T B^T.
    With a DoRA magnitude m the update is PEFT's: m / ||W + s B A||_row scales the
    adapted output (the norm is detached, as in the DoRA paper, section 4.3)."""
    weight, bias = lp[name + ".weight"], lp.get(name + ".bias")
    a = lp.get(name + ".lora_A.weight")
    magnitude = lp.get(name + ".lora_magnitude_vector")
    quant = _quant(lp, name, quant_cfg)
    y = base_linear(B, lp, name, x, quant, bias=bias if a is None or magnitude is None else None)
    if a is None:
        return y
    xa = B.dropout(x, lora.dropout) if lora is not None and lora.dropout else x
    adtype = B.dtype_name(a)
    if B.dtype_name(xa) != adtype:
        xa = B.cast(xa, adtype)
    b_mat = lp[name + ".lora_B.weight"]
    delta = B.linear(B.linear(xa, a), b_mat) * lora.scale
    if magnitude is not None:
        lora_weight = B.linear(b_mat, B.swapaxes(a, 0, 1))  # B @ A: (out, in)
        dense = B.cast(dense_weight(B, lp, name, quant), adtype)
        norm = B.stop_gradient(B.row_norms(dense + lora.scale * lora_weight))
        scale = magnitude / norm
        out = B.cast(y, adtype) * scale + delta * scale
        out = B.cast(out, B.dtype_name(y))
        return out + bias if bias is not None else out
    if B.dtype_name(delta) != B.dtype_name(y):
        delta = B.cast(delta, B.dtype_name(y))
    return y + delta


def attention_block(B, a: ModelArgs, lp: dict, x, cos, sin, segment_ids, cache, lora):
    b, t, _ = x.shape
    D = a.head_dim
    qc = a.quantization
    q = project(B, lp, "self_attn.q_proj", x, lora, qc).reshape(b, t, -1, D)
    k = project(B, lp, "self_attn.k_proj", x, lora, qc).reshape(b, t, -1, D)
    v = project(B, lp, "self_attn.v_proj", x, lora, qc).reshape(b, t, -1, D)
    if a.qk_norm:
        q = B.rms_norm(q, lp["self_attn.q_norm.weight"], a.rms_norm_eps)
        k = B.rms_norm(k, lp["self_attn.k_norm.weight"], a.rms_norm_eps)
    q, k, v = (B.swapaxes(z, 1, 2) for z in (q, k, v))  # (B, H, T, D)
    q, k = B.apply_rope(q, cos, sin), B.apply_rope(k, cos, sin)
    if cache is not None:
        if cache[0] is not None:
            k = B.concat([cache[0], k], axis=2)
            v = B.concat([cache[1], v], axis=2)
        cache[0], cache[1] = k, v
    o = B.attention(q, k, v, 1.0 / math.sqrt(D), segment_ids)
    o = B.swapaxes(o, 1, 2).reshape(b, t, -1)
    return project(B, lp, "self_attn.o_proj", o, lora, qc)


def mlp_block(B, lp: dict, x, lora, qc=None):
    gate = project(B, lp, "mlp.gate_proj", x, lora, qc)
    up = project(B, lp, "mlp.up_proj", x, lora, qc)
    return project(B, lp, "mlp.down_proj", B.silu(gate) * up, lora, qc)


def decoder_layer(B, a: ModelArgs, lp: dict, x, cos, sin, segment_ids=None, cache=None,
                  lora=None):
    h = x + attention_block(B, a, lp, B.rms_norm(x, lp["input_layernorm.weight"],
                                                a.rms_norm_eps), cos, sin, segment_ids,
                            cache, lora)
    return h + mlp_block(B, lp, B.rms_norm(h, lp["post_attention_layernorm.weight"],
                                           a.rms_norm_eps), lora, a.quantization)


def hidden_states(B, a: ModelArgs, params: dict, input_ids, positions, segment_ids=None,
                  cache=None, lora=None, recompute=False):
    """The final normed hidden states (B, T, C). positions (B, T) int; cache is a list of
    [k, v] pairs per layer for generation; recompute stores only layer inputs."""
    x = B.embedding(input_ids, params["model.embed_tokens.weight"])
    cos, sin = B.rope_tables(positions, a.inv_freq, B.dtype_name(x))
    for i in range(a.num_hidden_layers):
        lp = layer_params(params, i)
        if recompute:
            x = _recomputed_layer(B, a, lp, x, cos, sin, segment_ids, lora)
        else:
            x = decoder_layer(B, a, lp, x, cos, sin, segment_ids,
                              None if cache is None else cache[i], lora)
    return B.rms_norm(x, params["model.norm.weight"], a.rms_norm_eps)


def _recomputed_layer(B, a, lp, x, cos, sin, segment_ids, lora):
    """A layer whose activations are recomputed in the backward pass. Only the adapter
    leaves and x are arguments: frozen weights are closed over, so no gradient is ever
    formed for them."""
    trainable = {k: v for k, v in lp.items() if ".lora_" in k}
    frozen = {k: v for k, v in lp.items() if ".lora_" not in k}

    def run(train, x_):
        return decoder_layer(B, a, {**frozen, **train}, x_, cos, sin, segment_ids, None, lora)
    return B.checkpoint(run)(trainable, x)


def output_weight(params: dict):
    return params.get("lm_head.weight", params["model.embed_tokens.weight"])


def logits(B, a: ModelArgs, params: dict, input_ids, positions, **kw):
    h = hidden_states(B, a, params, input_ids, positions, **kw)
    return B.linear(h, output_weight(params))
