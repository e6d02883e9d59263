"""The sparse mixture-of-experts MLP (mixtral, qwen3_moe, gpt-oss), written once over
backend ops.

Parameters of a sparse layer, under transformers v5's names (the loader fuses the Hub's
per-expert checkpoints into these):
  mlp.gate.weight            (E, C)      the router
  mlp.experts.gate_up_proj   (E, 2F, C)  each expert's gate and up projections, stacked
  mlp.experts.down_proj      (E, C, F)

With a shared expert (a.shared_expert_size S: qwen3_next, qwen3_5_moe), besides:
  mlp.shared_expert.{gate,up}_proj.weight (S, C), mlp.shared_expert.down_proj.weight (C, S)
  mlp.shared_expert_gate.weight (1, C)   its output is scaled by sigmoid(this x)

gpt-oss (a.gpt_oss_experts) keeps its own names and layout: mlp.router.{weight, bias};
mlp.experts.gate_up_proj (E, C, 2F) with gate and up interleaved (even/odd columns),
gate_up_proj_bias (E, 2F), down_proj (E, F, C), down_proj_bias (E, C); its activation is
(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit).

Gemma 4 (a.experts_beside_mlp) keeps its dense MLP and adds, on every layer:
  router.proj.weight (E, C), router.scale (C,), router.per_expert_scale (E,)
  experts.gate_up_proj (E, 2F, C), experts.down_proj (E, C, F)   (GeGLU experts)
  pre_feedforward_layernorm_2, post_feedforward_layernorm_{1,2}.weight (C,)
The router and the experts read the residual stream before the MLP's norm:
norm_1(mlp(pre_norm(x))) + norm_2(experts(pre_norm_2(x))), both then post-normed as usual.

Routing: router logits -> probabilities -> the top k experts of each token and their
weights; the output is sum_j w_j * expert_{i_j}(x). "softmax_topk" (mixtral, qwen3_moe)
takes the softmax over all experts, then the top k, renormalised to sum to 1 when
`norm_topk_prob` (always for mixtral); "topk_softmax" takes the top k logits and a softmax
over those k only.

Compute: each token's k chosen experts only. The (token, choice) rows are sorted by expert
once per layer (`ops.expert_groups`, `group_rows`); every expert projection and its
adapter's A and B run on those rows (`grouped_linear`: torch's grouped_mm on CPU, one kernel
for all experts forward and backward, else one matmul per expert; mx.gather_mm over sorted
indices on MLX), and the outputs go back to token order once (`ungroup_rows`): a handful
of ops per layer, not a handful per expert and projection. Forward and backward both cost N*k rows per expert projection, and memory for activations scales with N*k (never
with the number of experts); gradients reach adapters on the router through the top-k
weights and adapters on experts through the gathered rows, as in the reference.

Adapters: the router is an ordinary 2D weight (`project`); an adapter on a 3D expert
parameter follows PEFT's ParamWrapper (core.lora.FUSED_RANK, expert_lora_factors).
"""

from __future__ import annotations

from contextlib import contextmanager

from lorafit.core.lora import LORA_A, LORA_B, expert_lora_factors, project

ROUTER = "mlp.gate"
EXPERTS = "mlp.experts."
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
SHARED = "mlp.shared_expert"
SHARED_GATE = "mlp.shared_expert_gate"
GEMMA4_NORMS = ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                "post_feedforward_layernorm_2")


def expert_size(a) -> int:
    return a.moe_intermediate_size or a.intermediate_size


def parameter_shapes(a, p: str) -> dict:
    """The MLP parameters of a sparse layer with prefix p (`model.layers.3.`)."""
    E, C, F = a.num_local_experts, a.hidden_size, expert_size(a)
    if a.experts_beside_mlp:
        return {p + "router.proj.weight": (E, C), p + "router.scale": (C,),
                p + "router.per_expert_scale": (E,),
                p + "experts.gate_up_proj": (E, 2 * F, C), p + "experts.down_proj": (E, C, F),
                **{p + n + ".weight": (C,) for n in GEMMA4_NORMS}}
    if a.gpt_oss_experts:
        return {p + "mlp.router.weight": (E, C), p + "mlp.router.bias": (E,),
                p + EXPERTS + "gate_up_proj": (E, C, 2 * F),
                p + EXPERTS + "gate_up_proj_bias": (E, 2 * F),
                p + EXPERTS + "down_proj": (E, F, C), p + EXPERTS + "down_proj_bias": (E, C)}
    out = {p + ROUTER + ".weight": (E, C),
           p + EXPERTS + "gate_up_proj": (E, 2 * F, C),
           p + EXPERTS + "down_proj": (E, C, F)}
    if a.shared_expert_size:
        S = a.shared_expert_size
        out.update({p + SHARED + ".gate_proj.weight": (S, C), p + SHARED + ".up_proj.weight": (S, C),
                    p + SHARED + ".down_proj.weight": (C, S), p + SHARED_GATE + ".weight": (1, C)})
    return out


def linear_modules(a, attention: tuple, mlp: tuple) -> tuple:
    """What all-linear adapts on an MoE model, as PEFT does on transformers v5: attention,
    the router (`gate`) and both expert parameters. gpt-oss: attention only (its router
    and experts are not nn.Linear and PEFT has no v4 names to map for it).
    With a shared expert: qwen3_next (PEFT maps its v4 gate/up/down_proj names onto the
    stacked experts) adds the shared expert's gate and leaves the shared expert's and the
    dense layers' projections alone, as PEFT does; a model PEFT has no expert names for
    (a.moe_linear_only: qwen3_5_moe) takes its nn.Linear modules only: the shared expert,
    its gate and dense MLPs, never the router or the stacked experts (core.lora.
    target_modules skips 3D parameters when gate_up_proj is not a target name)."""
    if a.gpt_oss_experts:
        return attention
    if a.experts_beside_mlp:  # Gemma 4: nn.Linear modules, its router's `proj` among them
        return attention + mlp + ("proj",)
    if a.moe_linear_only:
        return attention + mlp + ("shared_expert_gate",)
    if a.shared_expert_size:
        return attention + ("gate",) + EXPERT_PROJECTIONS + ("shared_expert_gate",)
    return attention + ("gate",) + EXPERT_PROJECTIONS


def memory_shape(a) -> dict:
    """The estimator's MoE description (core.estimate.moe_weights / moe_adapter_params)."""
    gpt = a.gpt_oss_experts
    return {"experts": a.num_local_experts, "top_k": a.num_experts_per_tok,
            # gpt-oss: router bias + expert biases per expert; sinks + o_proj bias per layer
            "expert_bias": 1 + 2 * expert_size(a) + a.hidden_size if gpt else 0,
            "layer_extra": a.num_attention_heads + a.hidden_size if gpt else 0,
            "expert_size": expert_size(a), "dense_size": a.intermediate_size,
            # the dense shared expert beside the routed ones (qwen3_next, qwen3_5_moe), 0: none
            "shared_size": a.shared_expert_size,
            # Gemma 4's router.proj is a 2D linear counted with the others (no E*C here)
            "router_size": 0 if a.experts_beside_mlp else a.hidden_size,
            "layers": [i for i in range(a.num_hidden_layers) if a.is_moe_layer(i)],
            # (N, k, F') arrays torch's autograd keeps for the experts' activation: gate_up
            # (2, its halves are views) and silu(gate); gpt-oss's clamped SwiGLU (gpt_oss_
            # experts) also alpha * gate, up + 1 and the gated product, over gate_up + bias
            "activation_kept": 5 if gpt else 3,
            "all_linear": () if gpt or a.moe_linear_only else ("gate",) + EXPERT_PROJECTIONS}


_recording: list | None = None  # router logits of the forward being recorded, if any


@contextmanager
def recording_router_logits():
    """Collect each sparse layer's router logits (N, E) computed inside the block, in
    layer order, for the load-balancing loss of that forward (core.loss). A forward
    recomputed by gradient checkpointing after the block exits is not recorded again."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def route(ops, a, logits):
    """(indices (N, k), weights (N, k) float32) from router logits (N, E)."""
    if _recording is not None:
        _recording.append(logits)
    k = a.num_experts_per_tok
    if a.router == "topk_softmax":
        idx = ops.top_k_indices(logits, k)
        return idx, ops.softmax(ops.take_along_axis(logits, idx))
    probs = ops.softmax(logits)
    idx = ops.top_k_indices(probs, k)
    w = ops.take_along_axis(probs, idx)
    if a.norm_topk_prob:
        w = w / w.sum(-1)[..., None]
    return idx, w


def expert_projection(ops, lp: dict, name: str, rows, groups, lora):
    """rows (N*K, in), grouped by expert (ops.group_rows), through their experts' weights of
    `name` -> (N*K, out), plus the expert adapter when there is one: s * (x A_e^T) B_e^T for
    each row's expert, over the same groups."""
    w = lp[name]
    y = ops.grouped_linear(rows, w, groups)
    lora_a = lp.get(f"{name}.{LORA_A}")
    if lora_a is None:
        return y
    a3, b3 = expert_lora_factors(ops, lora_a, lp[f"{name}.{LORA_B}"], w.shape[0])
    xa = rows if ops.dtype_name(rows) == ops.dtype_name(a3) else \
        ops.cast(rows, ops.dtype_name(a3))
    delta = ops.grouped_linear(ops.grouped_linear(xa, a3, groups) * lora.scale, b3, groups)
    return y + (delta if ops.dtype_name(delta) == ops.dtype_name(y)
                else ops.cast(delta, ops.dtype_name(y)))


def routed_experts(ops, a, lp: dict, prefix: str, h, idx, w, act, lora):
    """sum_j w_j * expert_{i_j}(h) for h (N, C), with gated experts under `prefix`
    (gate_up_proj, down_proj) and act the gate's activation: the rows are sorted by expert
    once, and both projections and their adapters run on them before they go back."""
    groups = ops.expert_groups(idx, a.num_local_experts)
    rows = ops.group_rows(h, groups)
    gate_up = expert_projection(ops, lp, prefix + "gate_up_proj", rows, groups, lora)
    f = gate_up.shape[-1] // 2
    out = expert_projection(ops, lp, prefix + "down_proj", act(gate_up[..., :f]) *
                            gate_up[..., f:], groups, lora)
    out = ops.ungroup_rows(out, groups)  # (N, K, C)
    return (out * ops.cast(w, ops.dtype_name(out))[..., None]).sum(1)


def moe_block(ops, a, lp: dict, x, lora):
    """The sparse MLP of one layer: x (B, T, C) -> (B, T, C)."""
    b, t, c = x.shape
    h = x.reshape(b * t, c)
    if a.gpt_oss_experts:
        return gpt_oss_experts(ops, a, lp, h, lora).reshape(b, t, c)
    idx, w = route(ops, a, project(ops, lp, ROUTER, h, lora, a.quantization))
    out = routed_experts(ops, a, lp, EXPERTS, h, idx, w, ops.silu, lora)
    if a.shared_expert_size:
        out = out + shared_expert(ops, a, lp, h, lora)
    return out.reshape(b, t, c)


def experts_beside_mlp(ops, a, lp: dict, dense, residual, lora, norm):
    """Gemma 4's layer output before its post-feedforward norm: the dense MLP's output
    `dense` normed, plus the routed GeGLU experts of the residual stream (B, T, C) normed.
    norm(name, x) is the family's RMSNorm with the layer's weight `name`."""
    b, t, c = residual.shape
    h = residual.reshape(b * t, c)
    # router: weightless RMSNorm times scale * C^-1/2, proj, softmax, top k renormalised,
    # each weight times its expert's per_expert_scale
    scale = ops.cast(lp["router.scale"], "float32") * c ** -0.5
    r = ops.cast(ops.rms_norm(ops.cast(h, "float32"), scale, a.rms_norm_eps), ops.dtype_name(h))
    idx, w = route(ops, a, project(ops, lp, "router.proj", r, lora, a.quantization))
    per_expert = ops.embedding(idx, ops.cast(lp["router.per_expert_scale"], "float32")[:, None])
    w = w * per_expert[..., 0]
    out = routed_experts(ops, a, lp, "experts.", norm("pre_feedforward_layernorm_2", h), idx,
                         w, ops.gelu_tanh, lora).reshape(b, t, c)
    return norm("post_feedforward_layernorm_1", dense) + norm("post_feedforward_layernorm_2", out)


def shared_expert(ops, a, lp: dict, h, lora):
    """The dense expert every token passes through, times its sigmoid gate: h (N, C)."""
    q = a.quantization
    gate = project(ops, lp, SHARED + ".gate_proj", h, lora, q)
    up = project(ops, lp, SHARED + ".up_proj", h, lora, q)
    y = project(ops, lp, SHARED + ".down_proj", ops.silu(gate) * up, lora, q)
    return y * ops.sigmoid(project(ops, lp, SHARED_GATE, h, lora, q))


def gpt_oss_experts(ops, a, lp: dict, h, lora):
    """gpt-oss's router (with bias; top k logits, softmax over them) and experts (biases,
    interleaved gate/up, clamped SwiGLU) for h (N, C) -> (N, C)."""
    idx, w = route(ops, a, project(ops, lp, "mlp.router", h, lora, a.quantization))
    groups = ops.expert_groups(idx, a.num_local_experts)
    gate_up = ops.grouped_linear(ops.group_rows(h, groups),
                                 ops.swapaxes(lp[EXPERTS + "gate_up_proj"], 1, 2), groups,
                                 lp[EXPERTS + "gate_up_proj_bias"])
    gate = ops.clip(gate_up[..., ::2], None, a.swiglu_limit)
    up = ops.clip(gate_up[..., 1::2], -a.swiglu_limit, a.swiglu_limit)
    glu = ops.silu(gate * a.swiglu_alpha) * (1.0 / a.swiglu_alpha)  # g * sigmoid(alpha g)
    out = ops.grouped_linear((up + 1) * glu, ops.swapaxes(lp[EXPERTS + "down_proj"], 1, 2),
                             groups, lp[EXPERTS + "down_proj_bias"])
    out = ops.ungroup_rows(out, groups)  # (N, K, C)
    w = ops.cast(w, ops.dtype_name(out))
    return (out * w[..., None]).sum(1)


def load_balancing_loss(ops, a, router_logits: list, attention_mask=None):
    """Switch Transformer's auxiliary loss (transformers' `load_balancing_loss_func`):
    E * sum_e f_e * P_e over all layers' tokens, f_e = the share of top-k choices that went
    to expert e, P_e = the mean router probability of e. router_logits: one (N, E) array
    per sparse layer. Reported as a metric; lorafit does not add it to the loss."""
    import numpy as np

    E, k = a.num_local_experts, a.num_experts_per_tok
    logits = np.concatenate([ops.to_numpy(ops.cast(z, "float32")) for z in router_logits])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :k]
    chosen = np.zeros((len(probs), k, E), np.float32)
    np.put_along_axis(chosen, top[..., None], 1.0, axis=-1)
    if attention_mask is None:
        tokens_per_expert = chosen.mean(0)  # (k, E)
        prob_per_expert = probs.mean(0)
    else:
        m = np.tile(np.asarray(attention_mask, np.float32).reshape(-1), len(router_logits))
        tokens_per_expert = (chosen * m[:, None, None]).sum(0) / m.sum()
        prob_per_expert = (probs * m[:, None]).sum(0) / m.sum()
    return float((tokens_per_expert * prob_per_expert[None]).sum() * E)


def load_balancing_loss_ops(ops, a, router_logits: list, mask):
    """The same loss as `load_balancing_loss` over backend arrays, so that it can join the
    training loss and its gradient (which reaches the router through P_e; f_e counts top-k
    choices and has none, as in transformers). mask (N,) float32 marks the positions that
    count, as transformers' attention mask: training passes the loss mask, so padding
    (and the backend's column padding) never counts, and neither do prompt tokens."""
    import numpy as np

    E, k = a.num_local_experts, a.num_experts_per_tok
    logits = ops.concat([ops.cast(z, "float32") for z in router_logits], axis=0)
    m = ops.concat([mask] * len(router_logits), axis=0)[:, None]  # (L*N, 1)
    probs = ops.softmax(logits)
    idx = ops.top_k_indices(probs, k)  # (L*N, k)
    chosen = ops.cast(idx[..., None] == ops.from_numpy(np.arange(E)), "float32")  # (.., k, E)
    n = m.sum()
    tokens_per_expert = (chosen * m[..., None]).sum(0) / n  # (k, E)
    prob_per_expert = (probs * m).sum(0) / n  # (E,)
    return (tokens_per_expert * prob_per_expert[None]).sum() * E
