"""Gated DeltaNet: the linear-attention token mixer of qwen3_next and qwen3_5
("linear_attention" layers), under the checkpoint's names (`linear_attn.*`).

    qkv = causal_conv1d(x in_proj_qkv^T), then silu; split into q, k (Hk heads of Dk)
    and v (Hv heads of Dv)
    o, S = gated_delta_rule(q, k, v, a = x in_proj_a^T, b = x in_proj_b^T, A_log, dt_bias)
    y = out_proj(rms_norm(o) * norm.weight * silu(x in_proj_z^T))   per value head

qwen3_next fuses the input projections per key head (linear_fused_projections):
in_proj_qkvz holds, for each of the Hk key heads, [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] and
in_proj_ba [b (r), a (r)], r = Hv/Hk; the convolution sees all q, then all k, then all v.

The generation cache of such a layer holds (conv state, recurrent state) in the two slots
an attention layer uses for (k, v). With packed examples (segment_ids) neither the
convolution nor the recurrent state crosses from one example into the next.
"""

from __future__ import annotations

from lorafit.core.lora import project

P = "linear_attn."
NAMES = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")  # projections
FUSED_NAMES = ("in_proj_qkvz", "in_proj_ba", "out_proj")  # qwen3_next's


def names(a) -> tuple:
    return FUSED_NAMES if a.linear_fused_projections else NAMES


def dims(a) -> tuple:
    """(Hk, Hv, Dk, Dv, K, conv channels)."""
    Hk, Hv = a.linear_num_key_heads, a.linear_num_value_heads
    Dk, Dv, K = a.linear_key_head_dim, a.linear_value_head_dim, a.linear_conv_kernel_dim
    return Hk, Hv, Dk, Dv, K, 2 * Hk * Dk + Hv * Dv


def parameter_shapes(a, prefix: str) -> dict:
    """The frozen parameters of one Gated DeltaNet mixer; prefix ends with the layer's '.'."""
    Hk, Hv, Dk, Dv, K, conv = dims(a)
    C, p = a.hidden_size, prefix + P
    if a.linear_fused_projections:
        inputs = {p + "in_proj_qkvz.weight": (conv + Hv * Dv, C),
                  p + "in_proj_ba.weight": (2 * Hv, C)}
    else:
        inputs = {p + "in_proj_qkv.weight": (conv, C), p + "in_proj_z.weight": (Hv * Dv, C),
                  p + "in_proj_b.weight": (Hv, C), p + "in_proj_a.weight": (Hv, C)}
    return {**inputs, p + "conv1d.weight": (conv, 1, K), p + "dt_bias": (Hv,),
            p + "A_log": (Hv,), p + "norm.weight": (Dv,), p + "out_proj.weight": (C, Hv * Dv)}


def _fused_inputs(ops, a, lp, x, lora):
    """qwen3_next: (qkv in the convolution's channel order, z, b, a) from the fused
    per-key-head projections."""
    b, t, _ = x.shape
    Hk, Hv, Dk, Dv, _, _ = dims(a)
    r, qc = Hv // Hk, a.quantization
    qkvz = project(ops, lp, P + "in_proj_qkvz", x, lora, qc).reshape(b, t, Hk, -1)
    ba = project(ops, lp, P + "in_proj_ba", x, lora, qc).reshape(b, t, Hk, 2 * r)
    q, k = qkvz[..., :Dk], qkvz[..., Dk:2 * Dk]
    v, z = qkvz[..., 2 * Dk:2 * Dk + r * Dv], qkvz[..., 2 * Dk + r * Dv:]
    qkv = ops.concat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], axis=-1)
    return qkv, z.reshape(b, t, Hv * Dv), ba[..., :r].reshape(b, t, Hv), \
        ba[..., r:].reshape(b, t, Hv)


def block(ops, a, lp: dict, x, segment_ids=None, cache=None, lora=None):
    """The mixer's output (B, T, C) for normed input x; cache is the layer's 2-slot list
    [conv state, recurrent state], updated in place."""
    b, t, _ = x.shape
    Hk, Hv, Dk, Dv, K, conv = dims(a)
    qc = a.quantization
    if a.linear_fused_projections:
        qkv, z, beta_logit, decay_logit = _fused_inputs(ops, a, lp, x, lora)
    else:
        qkv = project(ops, lp, P + "in_proj_qkv", x, lora, qc)
        z = project(ops, lp, P + "in_proj_z", x, lora, qc)
        beta_logit = project(ops, lp, P + "in_proj_b", x, lora, qc)
        decay_logit = project(ops, lp, P + "in_proj_a", x, lora, qc)
    z = z.reshape(b, t, Hv, Dv)
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
