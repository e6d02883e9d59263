"""Gated DeltaNet: the linear-attention token mixer of qwen3_next and qwen3_5
("linear_attention" layers), under the checkpoint's names (`linear_attn.*`).

    qkv = causal_conv1d(x in_proj_qkv^T), then silu; split into q, k (Hk heads of Dk)
    and v (Hv heads of Dv)
    o, S = gated_delta_rule(q, k, v, a = x in_proj_a^T, b = x in_proj_b^T, A_log, dt_bias)
    y = out_proj(rms_norm(o) * norm.weight * silu(x in_proj_z^T))   per value head

The generation cache of such a layer holds (conv state, recurrent state) in the two slots
an attention layer uses for (k, v). With packed examples (segment_ids) neither the
convolution nor the recurrent state crosses from one example into the next.
"""

from __future__ import annotations

from lorafit.core.lora import project

P = "linear_attn."
NAMES = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")  # projections


def dims(a) -> tuple:
    """(Hk, Hv, Dk, Dv, K, conv channels)."""
    Hk, Hv = a.linear_num_key_heads, a.linear_num_value_heads
    Dk, Dv, K = a.linear_key_head_dim, a.linear_value_head_dim, a.linear_conv_kernel_dim
    return Hk, Hv, Dk, Dv, K, 2 * Hk * Dk + Hv * Dv


def parameter_shapes(a, prefix: str) -> dict:
    """The frozen parameters of one Gated DeltaNet mixer; prefix ends with the layer's '.'."""
    Hk, Hv, Dk, Dv, K, conv = dims(a)
    C, p = a.hidden_size, prefix + P
    return {p + "in_proj_qkv.weight": (conv, C), p + "in_proj_z.weight": (Hv * Dv, C),
            p + "in_proj_b.weight": (Hv, C), p + "in_proj_a.weight": (Hv, C),
            p + "conv1d.weight": (conv, 1, K), p + "dt_bias": (Hv,), p + "A_log": (Hv,),
            p + "norm.weight": (Dv,), p + "out_proj.weight": (C, Hv * Dv)}


def block(ops, a, lp: dict, x, segment_ids=None, cache=None, lora=None):
    """The mixer's output (B, T, C) for normed input x; cache is the layer's 2-slot list
    [conv state, recurrent state], updated in place."""
    b, t, _ = x.shape
    Hk, Hv, Dk, Dv, K, conv = dims(a)
    qc = a.quantization
    qkv = project(ops, lp, P + "in_proj_qkv", x, lora, qc)
    z = project(ops, lp, P + "in_proj_z", x, lora, qc).reshape(b, t, Hv, Dv)
    beta_logit = project(ops, lp, P + "in_proj_b", x, lora, qc)
    decay_logit = project(ops, lp, P + "in_proj_a", x, lora, qc)
    weight = lp[P + "conv1d.weight"]
    qkv, conv_state = ops.causal_conv1d(qkv, weight.reshape(conv, K),
                                        None if cache is None else cache[0], segment_ids)
    qkv = ops.silu(qkv)
    kd = Hk * Dk
    q = qkv[..., :kd].reshape(b, t, Hk, Dk)
    k = qkv[..., kd:2 * kd].reshape(b, t, Hk, Dk)
    v = qkv[..., 2 * kd:].reshape(b, t, Hv, Dv)
    o, state = ops.gated_delta_rule(q, k, v, decay_logit, beta_logit, lp[P + "A_log"],
                                    lp[P + "dt_bias"], None if cache is None else cache[1],
                                    segment_ids)
    if cache is not None:
        cache[0], cache[1] = conv_state, state
    o = ops.rms_norm(o, lp[P + "norm.weight"], a.rms_norm_eps) * ops.silu(z)
    return project(ops, lp, P + "out_proj", o.reshape(b, t, Hv * Dv), lora, qc)
