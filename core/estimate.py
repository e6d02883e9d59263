"""Peak memory of a lorafit training run, predicted before anything is loaded.

Pure Python: a model's shape (a `Shape`, which models/ builds from a config.json with
`models.memory_shape`) and the run's settings in, bytes out, with a breakdown per term.
Each term is a small function whose docstring gives its formula; the counts of saved
tensors follow what lorafit's own forward (models/decoder.py), fused loss (core/loss.py)
and AdamW allocate, and tests/core/test_estimate.py checks the total against the measured
peak of real steps on both CPU backends.

Notation: N = batch * seq_len tokens in a micro-batch, C hidden size, F intermediate size,
Hq/Hk query/key-value heads, D head dim, L adapted layers count, V vocabulary, r rank,
s bytes per element of the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafit.backends.base import CAUSAL_BLOCKS_FROM, causal_query_blocks, torch_cpu_blocks
from lorafit.core.config import QUANTIZE_BITS, TrainConfig
from lorafit.core.errors import LorafitError
from lorafit.core.loss import logit_chunk_elements

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

SHARD_QUANTIZED = ("--shard with --quantize is not supported (the sharded base is not "
                   "quantized); drop one of them")
SHARD_ON_MLX = ("--shard is not supported on the MLX backend (mx.distributed has no "
                "sharded training); drop --shard for data parallel, or use --backend torch")

# Framework overhead beyond tensors: CUDA context + allocator rounding, Metal's residency.
FRAMEWORK_OVERHEAD = {"torch-cuda": 600 * 2**20, "torch-mps": 300 * 2**20,
                      "torch-cpu": 0, "mlx-metal": 200 * 2**20, "mlx-cpu": 0}
ALLOCATOR_SLACK = {"torch-cuda": 0.05, "torch-mps": 0.05, "torch-cpu": 0.0,
                   "mlx-metal": 0.03, "mlx-cpu": 0.0}


@dataclass
class Shape:
    """The few numbers of a model that memory depends on (built by models.memory_shape)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: dict  # projection name -> (in, out), per layer
    attention_bias: bool = False
    qk_norm: bool = False
    moe: dict | None = None  # sparse MoE: see moe_weights / moe_adapter_params
    layer_vectors: int | None = None  # a layer's norm and bias elements; None: from the flags
    final_norm: int | None = None  # elements of the final norm (weight, bias); None: C
    attn_softcap: bool = False  # soft-capped scores: attention runs eagerly (Gemma 2)
    attn_sinks: bool = False  # a learned sink logit per head: attention runs eagerly (gpt-oss)
    final_softcap: bool = False  # soft-capped logits in the fused loss (Gemma 2)
    # Where layers differ (Gemma 4: wider full layers, kv-sharing layers without k/v, double-
    # wide MLPs; qwen3_5: DeltaNet and attention layers): each layer's {name: (in, out)};
    # `linears` then holds each name's first.
    layer_linears: list | None = None
    model_linears: dict = field(default_factory=dict)  # projections outside the layers
    extra_params: int = 0  # frozen parameters the terms above do not describe (Gemma 4's
    #                        per-layer embedding table, its norm, every layer's vectors)
    per_layer_inputs: int = 0  # width of Gemma 4's per-layer inputs, all layers (L * P)
    linear_attention: dict | None = None  # Gated DeltaNet: layers, key/value heads and dims
    attention_output_gate: bool = False  # q_proj also makes a gate (o * sigmoid(gate))
    # projections the family has but this config has in no layer (Gemma 4's v_proj when
    # every layer is a k_eq_v full layer): a target naming one adapts nothing, as in training
    absent_linears: tuple = ()
    # layers whose attention takes a sliding window (the masked kernel path on torch, even
    # where the window covers the sequence: no query blocks there)
    sliding_layers: tuple = ()
    # --shard cuts the decoder layers' frozen weights across the devices, not the rest:
    outside_layers: int | None = None  # frozen elements outside the layers (embeddings,
    #                                    head, final norm...); None: from vocab and hidden
    largest_layer: int | None = None  # frozen elements of the largest layer; None: the mean
    # norms on a sublayer's output (GLM-4's sandwich, OLMo 2's and Gemma's post-norms): each
    # norm's vjp reads its input, the attention or MLP output, kept nowhere else
    output_norms: int = 0
    input_norms: int = 0  # norms on a sublayer's input (0 for OLMo 2's, EXAONE 4's post-norms)
    # Where attention differs by layer (Gemma 4: full layers' global head dim and kv heads,
    # kv-sharing layers that compute no k, v): per layer (q width Hq*D, own k width Hk*D,
    # 0 on a kv-sharing layer, the width of the k it reads, D); None: heads * head_dim
    layer_attention: list | None = None
    output_norm: bool = False  # a norm on the MLP's output (Gemma's post-feedforward norm)
    v_norm: bool = False  # a weightless RMSNorm on v (Gemma 4)
    kv_shared: bool = False  # later layers reuse earlier layers' k, v (Gemma 4)
    gelu_tanh: bool = False  # GeGLU's tanh-GELU (Gemma): MLX's composite keeps more


# What all-linear adapts on an MoE model besides `linears` (PEFT on transformers v5):
# the router and the stacked expert parameters (models/blocks/moe.py).
MOE_TARGETS = ("gate", "gate_up_proj", "down_proj")


@dataclass
class Settings:
    """What a run does that memory depends on. The fields shared with TrainConfig take
    their defaults from it (one source); settings_from_config fills them from a run."""
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    rank: int = TrainConfig.rank
    targets: str = TrainConfig.targets
    layers: list | None = TrainConfig.layers
    batch_size: int = TrainConfig.batch_size
    seq_len: int = TrainConfig.seq_len
    grad_checkpoint: bool = TrainConfig.grad_checkpoint
    pack: bool = TrainConfig.pack
    grad_accum: int = TrainConfig.grad_accum
    adapter_dtype: str = "float32"
    dora: bool = TrainConfig.dora
    quantize_bits: int | None = None  # frozen projections stored in this many bits
    nproc: int = 1  # processes training together, one device each (per-device estimate)
    shard: bool = TrainConfig.shard  # --shard: see SHARDED
    compile: bool = TrainConfig.compile  # torch --compile: compiled_layer_recomputes

    def __post_init__(self):
        for name in ("rank", "batch_size", "seq_len", "grad_accum", "nproc"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise LorafitError(f"{name.replace('_', '-')} must be a positive integer, "
                                   f"got {v!r}")
        if self.shard and self.backend == "mlx":
            raise LorafitError(SHARD_ON_MLX)
        if self.shard and self.quantize_bits:
            raise LorafitError(SHARD_QUANTIZED)
        if self.dtype not in DTYPE_BYTES:
            raise LorafitError(f"dtype {self.dtype!r}: choose float32, bfloat16 or float16")

    @property
    def key(self) -> str:
        dev = {"cpu": "cpu", "cuda": "cuda", "mps": "mps", "metal": "metal", "gpu": "metal"}
        return f"{self.backend}-{dev.get(self.device, self.device)}"

    def replace(self, **changes) -> "Settings":
        return Settings(**{**self.__dict__, **changes})


def target_names(sh: Shape, st: Settings) -> list[str]:
    """The adapted projection names of one layer."""
    if st.targets == "all-linear":
        return list(sh.linears)
    names = [t.strip() for t in st.targets.split(",") if t.strip()]
    # a model with fused projections (phi3's qkv_proj, gate_up_proj) has no q_proj, v_proj:
    # asking for a part is counted as the fused projection that computes it, once
    names = list(dict.fromkeys(_fused_name(sh, t) for t in names
                               if t not in sh.absent_linears))
    moe_names = MOE_TARGETS if sh.moe else ()
    unknown = [t for t in names if t not in sh.linears and t not in moe_names]
    names = [t for t in names if t in sh.linears]
    if unknown:
        raise LorafitError(f"unknown LoRA target(s) {', '.join(unknown)}; this model has: "
                           f"{', '.join(sh.linears)} (or all-linear)")
    return names


FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _fused_name(sh: Shape, name: str) -> str:
    if name in sh.linears:
        return name
    return next((f for f, parts in FUSED_PARTS.items() if name in parts and f in sh.linears),
                name)


# -- static terms ----------------------------------------------------------------------------

def base_weights(sh: Shape, st: Settings) -> int:
    """Every frozen parameter in the compute dtype: embeddings V*C, head V*C unless tied,
    per layer the projections and its norm and bias vectors (layer_vectors, counted from
    the model's shapes), what no term describes (extra_params): sum(numel) * s.
    Quantized projections (input a multiple of 64) take bits/8 bytes per weight plus a
    scale and a bias per group of 64 in the compute dtype: in*out*(bits/8 + 2s/64)."""
    C, D, s = sh.hidden, sh.head_dim, DTYPE_BYTES[st.dtype]

    def linear(i, o):
        return quantized_bytes(i * o, st) if st.quantize_bits and i % QUANT_GROUP == 0 \
            else i * o * s
    per_layer = 2 * C * s if sh.layer_vectors is None else sh.layer_vectors * s
    if sh.layer_linears is None:
        per_layer += sum(linear(i, o) for i, o in sh.linears.values())
        linears = 0
    else:  # layers of different shapes, and projections outside the layers
        linears = sum(linear(i, o) for d in sh.layer_linears for i, o in d.values()) + \
            sum(linear(i, o) for i, o in sh.model_linears.values())
    if sh.attention_bias and sh.layer_vectors is None:
        per_layer += (sh.heads + 2 * sh.kv_heads) * D * s
    if sh.qk_norm and sh.layer_vectors is None:
        per_layer += 2 * D * s
    final = C if sh.final_norm is None else sh.final_norm
    return (sh.vocab * C * (1 if sh.tied else 2) + final + sh.extra_params) * s \
        + sh.layers * per_layer + linears + moe_weights(sh, st)


def moe_weights(sh: Shape, st: Settings) -> int:
    """A sparse MoE keeps every expert resident: per sparse layer the router E*C and the
    E experts' gate, up and down projections E*3*C*F' (F' the expert width; gpt-oss adds
    E*(1 + 2F' + C) biases and per layer Hq sinks + a C o_proj bias), per dense
    layer of an MoE model its MLP 3*C*F, all in the compute dtype (MXFP4 checkpoints are
    counted dequantized, as lorafit loads them)."""
    if not sh.moe:
        return 0
    m, C, s = sh.moe, sh.hidden, DTYPE_BYTES[st.dtype]
    sparse = m["experts"] * (m.get("router_size", C) + 3 * C * m["expert_size"]
                             + m["expert_bias"])
    dense = 3 * C * m["dense_size"]
    n_sparse = len(m["layers"])
    return s * (n_sparse * sparse + (sh.layers - n_sparse) * dense
                + sh.layers * m["layer_extra"])


def moe_adapter_params(sh: Shape, st: Settings) -> int:
    """Adapters on the router (r*(C+E) per sparse layer) and on the stacked experts as
    PEFT's ParamWrapper: E*r'*(in+out) per parameter, r' = 2r on the fused gate_up
    (in C, out 2F'), r on down (in F', out C)."""
    if not sh.moe:
        return 0
    m, C, r = sh.moe, sh.hidden, st.rank
    names = moe_target_names(sh, st)
    E, F = m["experts"], m["expert_size"]
    per = (r * (C + E) if "gate" in names else 0) \
        + (E * 2 * r * (C + 2 * F) if "gate_up_proj" in names else 0) \
        + (E * r * (F + C) if "down_proj" in names else 0)
    layers = m["layers"] if st.layers is None else [i for i in m["layers"] if i in st.layers]
    return per * len(layers)


def moe_target_names(sh: Shape, st: Settings) -> set:
    """The router and stacked-expert parameters (MOE_TARGETS) the run adapts."""
    if not sh.moe:
        return set()
    names = set(sh.moe["all_linear"]) if st.targets == "all-linear" else \
        {t.strip() for t in st.targets.split(",")}
    return names & set(MOE_TARGETS)


QUANT_GROUP = 64


def quantized_bytes(n: int, st: Settings) -> int:
    """Storage of n quantized weights. MLX (affine): bits/8 per weight plus a scale and a
    bias per group of 64 in the compute dtype. torch (bitsandbytes NF4, double-quantized):
    1/2 byte per weight, one uint8 absmax per block of 64, and a float32 scale per 256
    blocks."""
    if st.backend == "mlx":
        return n * st.quantize_bits // 8 + 2 * (n // QUANT_GROUP) * DTYPE_BYTES[st.dtype]
    blocks = -(-n // QUANT_GROUP)
    return n // 2 + blocks + 4 * -(-blocks // 256)


def dequantization_temporaries(sh: Shape, st: Settings) -> int:
    """bitsandbytes' CPU/GPU matmul dequantizes one whole projection into the compute
    dtype before multiplying: the largest quantized in*out*s, alive one at a time."""
    if not st.quantize_bits or st.backend == "mlx":
        return 0
    sizes = [i * o for i, o in sh.linears.values() if i % QUANT_GROUP == 0]
    return max(sizes, default=0) * DTYPE_BYTES[st.dtype]


def adapter_params(sh: Shape, st: Settings) -> int:
    """Number of adapter elements: sum over adapted modules of r * (in + out), plus the
    DoRA magnitude (out) per module."""
    dims = sh.linears
    n_layers = len(st.layers) if st.layers is not None else sh.layers
    if sh.layer_linears is not None:  # layers differ; outside ones only without a selection
        names = target_names(sh, st)

        def cost(i, o):
            return st.rank * (i + o) + (o if st.dora else 0)
        layers = st.layers if st.layers is not None else range(sh.layers)
        n = sum(cost(*sh.layer_linears[ly][m]) for ly in layers for m in names
                if m in sh.layer_linears[ly])
        if st.layers is None:
            n += sum(cost(*sh.model_linears[m]) for m in names if m in sh.model_linears)
        # stacked experts and routers (none where only 2D projections take adapters)
        return n + (moe_adapter_params(sh, st) if sh.moe and sh.moe["all_linear"] else 0)
    per = sum(st.rank * (dims[m][0] + dims[m][1]) + (dims[m][1] if st.dora else 0)
              for m in target_names(sh, st))
    return n_layers * per + moe_adapter_params(sh, st)


def adapter_weights(sh, st) -> int:
    """Adapter A and B in the adapter dtype (float32): n_adapter * 4."""
    return adapter_params(sh, st) * DTYPE_BYTES[st.adapter_dtype]


def adapter_gradients(sh, st) -> int:
    """One gradient per adapter element, float32, alive while the step accumulates. torch
    sets them to None after each optimizer step, so none exist in its forward (the loss
    phase): there they are counted in the backward's phases (all_adapter_gradients)."""
    return 0 if st.backend == "torch" else all_adapter_gradients(sh, st)


def all_adapter_gradients(sh, st) -> int:
    return adapter_params(sh, st) * 4


def recompute_gradients(sh, st) -> int:
    """The gradients alive while the backward re-runs a layer (all, to be safe)."""
    return all_adapter_gradients(sh, st) if st.grad_checkpoint else 0


def nothing(sh, st) -> int:
    """A static term a phase does not hold (the optimizer step: the backward freed it)."""
    return 0


def optimizer_temporaries(sh, st) -> int:
    """torch's foreach AdamW forms sqrt(exp_avg_sq) (one float32 per adapter element) for
    the update, beside the gradients. MLX's update (backends/mlx/optim.py) is one lazy
    graph over every parameter: measured (llama C64, 2 layers) one more adapter copy alive
    when it starts (5 in all, weights, gradients and moments counted) and, while the new
    values, moments and their temporaries form, 2.5 more with 8 or 16 adapter arrays but
    1.24 with 42: the schedule evaluates about 20 arrays' updates at a time (MLX's BFS
    width), so 1 + 2.6 * min(1, 20 / arrays) copies."""
    if st.backend == "torch":
        return adapter_params(sh, st) * 4
    in_flight = min(1.0, MLX_UPDATE_WIDTH / max(adapter_arrays(sh, st), 1))
    return int(adapter_params(sh, st) * 4 * (1 + 2.6 * in_flight))


MLX_UPDATE_WIDTH = 20


def adapter_arrays(sh, st) -> int:
    """Trainable arrays: A and B per adapted module (and DoRA's magnitude)."""
    per = 3 if st.dora else 2
    layers = st.layers if st.layers is not None else range(sh.layers)
    return per * sum(len(_layer_targets(sh, st, i)) for i in layers)


def optimizer_state(sh, st) -> int:
    """AdamW's exp_avg and exp_avg_sq per adapter element, float32: 2 * n_adapter * 4."""
    return 2 * adapter_params(sh, st) * 4


# -- activations -----------------------------------------------------------------------------

def saved_per_token_per_layer(sh: Shape, st: Settings, adapted: bool,
                              layer: int | None = None) -> float:
    """Elements one layer keeps for the backward pass, per token.

    Residual input, the two normed inputs (kept for the adapters' dA) and the post-attention
    residual: ~3C (+2 rstd). Attention keeps q, k, v after RoPE and its output:
    Hq*D + 2*Hk*D + Hq*D. The MLP keeps gate, silu(gate) and up: 3F (a sparse MoE: F =
    k*F', the k experts each token is routed to; nothing scales with the expert count). Each
    adapted module
    keeps its rank-r projection x A^T (r), and a module whose input is not otherwise kept
    keeps that input (o_proj: Hq*D, down_proj: F). An output gate keeps the gate and its
    sigmoid: 2*Hq*D. Linear-attention layers: see gated_deltanet_saved_per_token.
    """
    if sh.linear_attention and layer in sh.linear_attention["layers"]:
        return gated_deltanet_saved_per_token(sh, st, adapted, layer) \
            + (torch_shared_lora_a_per_token(sh, st, layer) if adapted else 0)
    C = sh.hidden
    q, kv, _, _ = attention_widths(sh, layer)
    n = 3 * C + 2 * q + 2 * kv + mlp_activations_kept(sh, st, layer) + 2
    if sh.attention_output_gate:
        n += 2 * q
    if sh.qk_norm:  # the q/k norms' vjps read their inputs: q and k before the norm
        n += q + kv
    n += per_layer_input_saved_per_token(sh)
    if sh.v_norm:  # Gemma 4: v's norm keeps its input, as the q/k norms do
        n += kv
    if sh.kv_shared and st.pack:  # Gemma 4: every layer's k, v after RoPE are held for the
        n += 2 * kv  # layers that reuse them, beside the packed copies attention keeps
    n += sparse_mlp_saved_per_token(sh, st, adapted, layer)
    n += mlx_output_norm_inputs(sh, st) + torch_output_norm_inputs(sh, st)
    n -= compiled_layer_recomputes(sh, st, layer)
    if adapted:
        names = _layer_targets(sh, st, layer)
        n += st.rank * len(names)
        n += dora_kept_per_token(sh, st, names)
        n += torch_shared_lora_a_per_token(sh, st, layer)
        if "o_proj" in names:
            n += q
        if "down_proj" in names or "c_proj" in names and st.backend == "torch":
            n += down_proj_input(sh, layer)
    return n * BACKEND_SAVED_FACTOR.get(st.backend, 1.0)


SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def torch_shared_lora_a_per_token(sh: Shape, st: Settings, layer: int | None,
                                  groups=SHARED_INPUT_GROUPS) -> float:
    """torch only, per token in the compute dtype's elements: the copy of the A factors
    that each group of projections of one input saves for its backward. q, k, v (an
    attention layer's) and a dense MLP's gate, up run as one _LoraLinears (core.lora.
    project_shared) when at least two of them are plain LoRA pairs on dense bases of the
    adapter's dtype (not DoRA, not quantized, float32 runs): their A's are concatenated,
    (sum r, in), and that copy is kept until the layer's backward. The profiler's timeline
    held it in every kept layer (seed-4 mixtral C128 H8/4 q,v pack, 16 tokens: 32 KiB
    of a 0.52 MiB peak). A constant per layer, counted per token (/ N)."""
    if st.backend != "torch" or st.dtype != "float32" or st.dora:
        return 0
    names = _layer_targets(sh, st, layer)
    la = sh.linear_attention
    deltanet = la and layer in la["layers"]
    sparse = sh.moe and layer in sh.moe["layers"]
    n = 0
    for group in groups:
        attention = group[0] == "q_proj"
        if attention and deltanet or not attention and sparse:
            continue
        ins = [sh.linears[m][0] for m in group if m in names
               if not (st.quantize_bits and sh.linears[m][0] % QUANT_GROUP == 0)]
        if len(ins) >= 2:
            n += st.rank * sum(ins)
    return n / (st.batch_size * st.seq_len)


def mlx_output_norm_inputs(sh: Shape, st: Settings) -> int:
    """MLX only, elements per token per layer: a norm on a sublayer's output keeps its
    input (the attention's or the MLP's output, C each) for its vjp. Measured on glm4 C96
    (two such norms): the per-layer slope was ~2C above the count. torch keeps them too
    by the same rule, but its figures are checked against the profiler's timeline and
    were left as they are (docs/memory.md)."""
    return sh.output_norms * sh.hidden if st.backend == "mlx" else 0


def torch_output_norm_inputs(sh: Shape, st: Settings) -> int:
    """torch only, elements per token per layer: a norm on a sublayer's output keeps its
    input (_RmsNorm saves x) where the family has input norms too (GLM-4's sandwich,
    Gemma's four norms): the attention's and the MLP's outputs are kept beside the normed
    inputs the saved set counts (the profiler's timeline of seed-5 glm4 C96 F152 L3
    all-linear pack: o_proj's and the MLP's outputs alive in every layer at the loss,
    -5.9 % without). A family with output norms only (OLMo 2/3, EXAONE 4) has no normed
    input: its output norms' inputs stand in the saved set's place for those."""
    if st.backend != "torch" or not sh.input_norms:
        return 0
    return sh.output_norms * sh.hidden


def torch_mlp_output_norm_freed(sh: Shape, st: Settings) -> int:
    """torch, elements per token: at a layer's MLP backward the norm on the MLP's output
    has run its backward and freed its input (torch_output_norm_inputs counts it in the
    saved set): the profiler's timeline of seed-6 glm4 C96 F192 L1 o,down rc pack held
    o_proj's output, not the MLP's, at the re-run's MLP backward (+10.0 % with both)."""
    return sh.hidden if torch_output_norm_inputs(sh, st) and sh.output_norm else 0


def _layer_targets(sh: Shape, st: Settings, layer: int | None) -> list:
    """The adapted projection names that exist in a layer (all, for uniform models)."""
    names = target_names(sh, st)
    if sh.layer_linears is None or layer is None:
        return names
    return [m for m in names if m in sh.layer_linears[layer]]


def per_layer_input_saved_per_token(sh: Shape) -> int:
    """Gemma 4's per-layer input block, x + norm(W_up(gelu(W_gate x) * p)), per layer: the
    gate's output, its GELU and the product with the layer's input row p (3P, the inputs
    of the GELU's and the projections' vjps), the projection's output and its normalised
    copy (2C, the norm's vjp). Measured on torch (C64 F112 H8/2, P16, 3 layers, 2 x 32
    tokens, all-linear): 0.31 MiB for P = 16 against P = 0, 0.23 counted before this term
    (-4.9 %), 0.36 with it (-2.0 %, the -3.2 % of P = 0 left)."""
    if not sh.per_layer_inputs:
        return 0
    return 2 * sh.hidden + 3 * (sh.per_layer_inputs // sh.layers)


def attention_widths(sh: Shape, layer: int | None) -> tuple:
    """(Hq*D, own Hk*D, read Hk*D, D) of a layer: Gemma 4's full layers are wider than its
    sliding ones (global_head_dim, their own kv heads), and its kv-sharing layers reuse the
    k, v an earlier layer saved (their own is 0: nothing new is kept for them)."""
    if sh.layer_attention is not None and layer is not None:
        return tuple(sh.layer_attention[layer])
    D = sh.head_dim
    return sh.heads * D, sh.kv_heads * D, sh.kv_heads * D, D


def gated_deltanet_saved_per_token(sh: Shape, st: Settings, adapted: bool,
                                   layer: int) -> float:
    """Elements a Gated DeltaNet layer keeps for the backward pass, per token, in units of
    the compute dtype (the delta rule runs in float32: its terms count 4/s each).

    Hk/Hv key/value heads, Dk/Dv their dims, X = 2*Hk*Dk + Hv*Dv conv channels,
    c = min(64, seq_len) the delta rule's chunk. Residual, normed inputs and MLP as an
    attention layer: 3C + 2 + 3F. Mixer, compute dtype: in_proj_qkv's output, the conv
    output and its silu (3X), z and silu(z) (2*Hv*Dv), a and b (2*Hv), the delta rule's
    output, the normed and the gated output (3*Hv*Dv). Delta rule, float32: normalised
    q, k repeated to Hv heads, their 4 scaled/decayed copies and the solved keys
    (7*Hv*Dk), v, the solved values, the corrected values and the output (4*Hv*Dv),
    beta, g and its cumulative sum (3*Hv), the decay, UT and intra-chunk score matrices
    (3*Hv*c; torch 2 more, torch_delta_products; MLX its own, mlx_delta_inverse_matrices),
    and one (Dk, Dv) state per head per chunk (Hv*Dk*Dv / c). A sparse layer adds its MoE
    terms (sparse_mlp_saved_per_token), as an attention layer does.
    Adapted modules add r each (their inputs are kept already); DoRA its outputs.
    """
    la = sh.linear_attention
    C, F = sh.hidden, mlp_width(sh, layer)
    Hk, Hv, Dk, Dv = la["key_heads"], la["value_heads"], la["key_dim"], la["value_dim"]
    X = 2 * Hk * Dk + Hv * Dv
    n = 3 * C + 2 + 3 * F + 3 * X + 5 * Hv * Dv + 2 * Hv + deltanet_float32_per_token(sh, st)
    n += sparse_mlp_saved_per_token(sh, st, adapted, layer)
    if adapted:
        names = _layer_targets(sh, st, layer)
        n += st.rank * len(names)
        n += dora_kept_per_token(sh, st, names)
        if "down_proj" in names or "c_proj" in names and st.backend == "torch":
            n += down_proj_input(sh, layer)
    return n * BACKEND_SAVED_FACTOR.get(st.backend, 1.0)


def mlp_activations_kept(sh: Shape, st: Settings, layer: int | None) -> int:
    """Elements per token a dense MLP keeps for its backward, beyond its adapters': gate,
    act(gate) and up, 3F (F = k*F' on a sparse layer). On torch a plain MLP (starcoder2's
    c_fc, c_proj) keeps c_fc's output only, which GELU's vjp reads (F; c_proj's adapter
    keeps its input as down_proj's does): the profiler's timeline of seed-7 starcoder2
    C96 F320 L3 q,v dora held one (N, F) per layer, +34.8 % with 3F counted. MLX: 3F (its
    plain MLP's figures were fitted with it)."""
    F = mlp_width(sh, layer)
    return F if st.backend == "torch" and "c_fc" in sh.linears else 3 * F


def compiled_layer_recomputes(sh: Shape, st: Settings, layer: int | None) -> int:
    """torch --compile: elements per token a compiled layer keeps fewer than the eager one.
    Inductor's partitioner (min-cut over the joint forward-backward graph) keeps gate and
    up and recomputes act(gate), a cheap elementwise op, in the backward: the MLP keeps 2F
    where eager keeps 3F. The rest of the saved set is the eager one (saved-tensor hooks
    on llama/qwen3/mistral q,v and all-linear: -F per compiled layer, nothing else; DoRA
    keeps F + 2C fewer still, bf16 and Gemma 3's GeGLU save more too (docs/memory.md);
    that rest is not counted: the estimate errs high there). Only
    compiled layers (models/decoder.py): dense self-attention layers whose input carries a
    gradient, so not the lowest layer of the backward, an MoE or DeltaNet layer, nor any
    layer of a model with per-layer inputs or shared k, v (Gemma 4), which run eagerly."""
    if not (st.compile and st.backend == "torch") or layer is None:
        return 0
    if sh.kv_shared or sh.per_layer_inputs or "c_fc" in sh.linears:
        return 0  # eager (Gemma 4); a plain GELU MLP keeps c_fc's output alone either way
    if sh.linear_attention and layer in sh.linear_attention["layers"]:
        return 0
    if sh.moe and layer in sh.moe["layers"]:
        return 0
    backward = _backward_layers(sh, st)
    if layer not in backward or layer == backward.start:
        return 0
    return mlp_width(sh, layer)


def deltanet_float32_per_token(sh: Shape, st: Settings) -> float:
    """The delta rule's float32 arrays a Gated DeltaNet layer keeps, per token, in units of
    the compute dtype (gated_deltanet_saved_per_token's docstring lists them). On MLX a
    re-run DeltaNet layer's backward forms a cotangent for each while they are alive, in
    place of an attention layer's 12 * Hq*D + 6 * Hk*D (mlx_recompute_transients):
    measured on qwen3_5_text C96 F224 all-linear rc, value heads 1, 2, 4, the peak's slope
    per value head was 2.0 x the saved set's (-2.6, -11.5, -24.6 % with the attention's
    transients counted there; -0.5 % at 4 heads with these)."""
    la = sh.linear_attention
    Hv, Dk, Dv = la["value_heads"], la["key_dim"], la["value_dim"]
    c = min(64, st.seq_len)
    return (Hv * (7 * Dk + 4 * Dv + (3 + mlx_delta_inverse_matrices(st, c)
                                   + torch_delta_products(st)) * c + 3)
            + Hv * Dk * Dv / c) * 4 / DTYPE_BYTES[st.dtype]


def sparse_mlp_saved_per_token(sh: Shape, st: Settings, adapted: bool,
                               layer: int | None) -> float:
    """What a sparse MoE layer keeps beyond the 3F of its k experts (moe_saved_per_token)
    and, with a shared expert, that expert's own (moe_shared_expert_saved_per_token): the
    same on an attention and a Gated DeltaNet layer (qwen3_5_moe's DeltaNet layers are
    sparse too; counted on attention layers only before: -7.8 % torch, -13.5 % MLX on
    C64 L3 all-linear)."""
    if not sh.moe or layer not in sh.moe["layers"]:
        return 0
    return moe_saved_per_token(sh, st, adapted, layer) + moe_shared_expert_saved_per_token(sh)


def moe_shared_expert_saved_per_token(sh: Shape) -> int:
    """The dense shared expert every token passes through (models/blocks/moe.shared_expert):
    y = down(silu(gate) * up) * sigmoid(g), g a 1-wide projection. Its gate, silu(gate) and
    up (3S, as a dense MLP's 3F), and the two factors of the gating product, y (C) and
    sigmoid(g) (1). An adapter's r and down_proj's input (S) are counted with the 2D
    projections (qwen3_5_moe adapts the shared expert's; down_proj_input)."""
    S = sh.moe.get("shared_size", 0)
    return 3 * S + sh.hidden + 1 if S else 0


def down_proj_input(sh: Shape, layer: int | None) -> int:
    """The width of a 2D down_proj's input, which its adapter keeps for dA: F, or on a
    sparse layer with a shared expert the shared expert's S (its down_proj is the 2D one;
    the routed experts' is a stacked parameter, counted by the MoE terms)."""
    if sh.moe and sh.moe.get("shared_size") and layer in sh.moe["layers"]:
        return sh.moe["shared_size"]
    return mlp_width(sh, layer)


def mlp_width(sh: Shape, layer: int | None) -> int:
    """The F of a layer's MLP in the dense counts: k*F' on a sparse layer (sh.intermediate),
    but an MoE model's dense layers (qwen3_moe's mlp_only_layers, qwen3_next's layers off
    its sparse step) run a dense MLP of intermediate_size (moe["dense_size"]): counted at
    k*F' before (seed-7 qwen3_moe C128 F448 F'56, layer 0 dense: MLX -11 %, torch -4 %)."""
    m = sh.moe
    if m and layer is not None and layer not in m["layers"]:
        return m["dense_size"]
    return sh.intermediate


def moe_saved_per_token(sh: Shape, st: Settings, adapted: bool,
                        layer: int | None = None) -> float:
    """What a sparse MoE layer keeps beyond gate, act and up of the k chosen experts
    (models/blocks/moe.py, both backends' grouped expert ops). The k expert outputs
    (k*C), read by the vjp of their weighting (the routing weights need a gradient
    whenever the layer's input does). An adapter on the stacked experts runs each row's
    A and B through gather_linear, whose per-expert matmuls keep their inputs, the rows
    gathered in expert order: gate_up k*(C + 2r) (its rank is 2r, FUSED_RANK), down
    k*(F' + r). The router's adapter keeps r and its probabilities E. gpt-oss's clamped
    SwiGLU keeps 5 k*F' arrays, not 3 (moe["activation_kept"]: gate_up with its bias,
    alpha*gate, up + 1 and the gated product; profiler's timeline); on MLX the measured
    slope in F' is the same (2 k*F' per token more than 3 k*F'). MLX's gather_linear
    gathers a trained weight's rows in expert order too (sorted_indices), so the
    adapters' rows are the same; routing: see below. gpt-oss on MLX keeps 2 k*C more in
    each layer below the top one (measured: 3 layers against 1, 530 elements per token
    at k = 2, C = 128; the 1-layer model is +0.8 % without it): probably the compiled
    graph fusing the experts' output + its bias rows into the weighting, whose vjp reads
    the kernel's inputs (the gathered output and the bias rows) where the top layer's
    backward, run first, does not wait."""
    m = sh.moe
    k, C, F, r = m["top_k"], sh.hidden, m["expert_size"], st.rank
    n = k * C + (m.get("activation_kept", 3) - 3) * k * F
    if st.backend == "mlx" and m["expert_bias"] and layer != sh.layers - 1:
        n += 2 * k * C  # gpt-oss below the top layer: output + bias rows, then weighted
    if adapted:
        names = moe_target_names(sh, st)
        if "gate_up_proj" in names:
            n += k * (C + 2 * r)
        if "down_proj" in names:
            n += k * (F + r)
        if "gate" in names:
            n += r + m["experts"]
        n += torch_expert_b_copies_per_token(sh, st, names)
    return n + moe_routing_bytes_per_token(sh, st) / DTYPE_BYTES[st.dtype]


def torch_expert_b_copies_per_token(sh: Shape, st: Settings, names) -> float:
    """torch on the CPU, per token in the compute dtype's elements: grouped_mm (backends/
    torch grouped_linear) takes an expert adapter's B, (E, r', out) from PEFT's (out, r'*E)
    layout, as a contiguous copy (_grouped_mm_operand), and keeps that copy for the
    backward (B is trained): per sparse layer E*2r*2F' (gate_up, rank 2r) and E*r*C (down)
    float32. A's (E, r', in) view needs none. The profiler's timeline of the sweep's seed-0
    qwen3_moe C32 F'48 E4 r32 all-linear held both at the loss (0.109 MiB of a 1.77 MiB
    peak, -6.1 % before). A constant per layer, counted per token (/ N). Elsewhere (other
    devices, misaligned widths) the per-expert loop reads B's slices in place."""
    if st.backend != "torch" or st.device != "cpu":
        return 0
    m, r = sh.moe, st.rank
    n = (m["experts"] * 2 * r * 2 * m["expert_size"] if "gate_up_proj" in names else 0) \
        + (m["experts"] * r * sh.hidden if "down_proj" in names else 0)
    return n * 4 / DTYPE_BYTES[st.dtype] / (st.batch_size * st.seq_len)


def moe_routing_bytes_per_token(sh: Shape, st: Settings) -> int:
    """Bytes per token a sparse layer keeps for routing: the router's float32
    probabilities (4E), the top-k indices (8k: int64 on torch, uint32 on MLX, counted 8),
    the chosen weights, their sum and the renormalised weights (float32, 4(2k + 1)), and
    the one sort of the layer's rows by expert (ops.expert_groups; every expert projection
    and adapter runs on those rows), whose indices the gathers' vjps read: torch keeps
    each sorted row's token and the order (2k int64), MLX the token, the sorted experts
    (gather_mm's) and the inverse (3k uint32)."""
    m = sh.moe
    k = m["top_k"]
    sorted_kept = 2 * 8 * k if st.backend == "torch" else 3 * 4 * k
    return 4 * m["experts"] + 8 * k + 4 * (2 * k + 1) + sorted_kept


def dora_kept_per_token(sh: Shape, st: Settings, names) -> int:
    """DoRA's output is x W^T * m/||.|| + s x A^T B^T * m/||.|| (core/lora.project): the
    magnitude m is trained, so the vjp of each product keeps its other factor, the frozen
    output x W^T and the adapter's s x A^T B^T, out each per adapted module on torch
    (measured with the profiler's timeline: both alive at the backward's start, 2 * out
    per module; counting one left torch's DoRA cases 5-11 % under). MLX keeps the same
    two (DoRA on minus off, measured: 1.50 MiB for 1.52 counted on mistral q,v_proj;
    in the attention backward, the widest attention projection's two output-gradient
    copies more, mlx_dora_attention_cotangents; all-linear 0.07-0.22 MiB beyond that,
    not identified)."""
    if not st.dora:
        return 0
    return DORA_OUTPUTS_KEPT.get(st.backend, 2) * sum(sh.linears[m][1] for m in names)


DORA_OUTPUTS_KEPT = {"torch": 2, "mlx": 2}


def mlx_dora_attention_cotangents(sh: Shape, st: Settings) -> int:
    """MLX without recompute, the top layer's attention backward: DoRA's output is
    y * scale + delta * scale (core/lora.project), so the vjp of an adapted projection
    forms its output's gradient twice more, g * scale towards y and towards delta (N, out
    each), where LoRA's sum passes g on as it is (the magnitude's g * y and g * delta
    reduce at once). One projection's pair meets the peak, the widest adapted one's: DoRA
    on minus off beyond the kept outputs (docs/memory.md, "MLX: DoRA's cotangents in the
    attention backward"), mistral C128 H4/4 D64 (q, k, v 256 wide) at 2 x 64 tokens: q_proj
    0.19 MiB, v_proj 0.05, q,v 0.26, q,k,v,o 0.21 for 0.25 counted; qwen3_5_text C32 H4/2
    D32 (q 256 with its gate) at 48 tokens: q_proj 0.04-0.06, all-linear 0.16-0.19 for
    0.09 (H8/2: 0.23 for 0.19)."""
    if st.backend != "mlx" or st.grad_checkpoint or not st.dora:
        return 0
    top = sh.layers - 1
    if top not in _adapted_layers(sh, st):
        return 0
    widest = max((sh.linears[m][1] for m in _layer_targets(sh, st, top)
                  if m in DORA_ATTENTION_NAMES), default=0)
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    copies = MLX_DORA_COTANGENT_COPIES * N * s * widest
    # an output gate's q/gate split is the same gradient of q_proj's output a moment
    # earlier: only the wider of the two counts (qwen3_5_text C64 H16/4 D16 q,v,o dora
    # read +10.2 % with both summed, +2.7 % with the split alone)
    return max(0, copies - mlx_attention_output_gate_split(sh, st))


DORA_ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
MLX_DORA_COTANGENT_COPIES = 2


def mlx_delta_inverse_matrices(st: Settings, c: int) -> int:
    """MLX only: (c, c) matrices per head per chunk its delta rule keeps beyond the three
    above. MLX has no vjp for a triangular solve, so (I + L)^-1 is the product of
    (I + (-L)^(2^k)): each of the I = ceil(log2 c) - 1 squarings keeps the power and the
    running inverse for its matmul vjps (2 per step, plus the first and last: 2I + 2), and
    k*beta @ k^T and q @ k^T are kept as inputs of their products with the decay (2): 2I + 4
    in all, less the one (the UT matrix) counted above."""
    if st.backend != "mlx" or c < 2:
        return 0
    return 2 * (max(c - 1, 1).bit_length() - 1) + 3


def torch_delta_products(st: Settings) -> int:
    """torch only: (c, c) matrices per head per chunk its delta rule keeps beyond the three
    above: k*beta @ k^T and q @ k^T, each multiplied by the decay (backends/torch
    gated_delta_rule), so the mul's vjp keeps both factors (MLX counts the same two in
    mlx_delta_inverse_matrices). Found on a sweep's qwen3_5_moe_text C64 b2x32 (c 32, Hv
    2): -6.2 % with the shortfall proportional to Hv (0.063 MiB per value head), not to
    the experts' or the shared expert's widths."""
    return 2 if st.backend == "torch" else 0


# Kept for backward per layer beyond the count above, by backend (elements per token).
BACKEND_SAVED_FACTOR = {"torch": 1.0, "mlx": 1.0}


def mlx_attention_kept(sh: Shape, st: Settings, layer: int | None = None) -> int:
    """MLX only, bytes one layer's attention keeps for the backward. While a gradient is
    traced, mx.fast.scaled_dot_product_attention runs its unfused fallback on every device
    (CPU has no fused kernel; on Metal mlx chooses the unfused path for training): the
    scaled queries q*scale (N*Hq*D) and the softmax probabilities (B, Hq, T, T) are the
    inputs of the two matmuls' vjps, so every layer keeps both, in the compute dtype.
    Soft-capped attention (eager_scores) and Gated DeltaNet layers keep their own."""
    if st.backend != "mlx" or sh.attn_softcap:
        return 0
    if sh.linear_attention and layer in sh.linear_attention["layers"]:
        return 0
    B, T, s = st.batch_size, st.seq_len, DTYPE_BYTES[st.dtype]
    return B * sh.heads * (mlx_score_area(st)[0] + T * attention_widths(sh, layer)[3]) * s


def mlx_query_blocks(st: Settings) -> list[tuple[int, int]]:
    """The (start, end) query blocks MLX's causal attention runs in: one, (0, T), but on
    its CPU from CAUSAL_BLOCKS_FROM on (causal_query_blocks, as backends/mlx runs them)."""
    T = st.seq_len
    if st.backend == "mlx" and st.device == "cpu" and T >= CAUSAL_BLOCKS_FROM:
        return causal_query_blocks(T)
    return [(0, T)]


def mlx_score_area(st: Settings) -> tuple[int, int]:
    """(all blocks, the widest block): elements per batch row and query head of the
    attention probabilities MLX forms, the blocks' (rows, end) rectangles (the (T, T)
    square where there is one block): every layer keeps all of its blocks' probabilities;
    the backward's score arrays, attention_scores."""
    return block_areas(mlx_query_blocks(st))


def block_areas(blocks) -> tuple[int, int]:
    """(all, the widest): the (rows, end) rectangles of causal query blocks, in elements
    per batch row and query head."""
    areas = [(end - start) * end for start, end in blocks]
    return sum(areas), max(areas)


def torch_query_blocks(st: Settings) -> list[tuple[int, int]] | None:
    """The query blocks torch's float32 CPU training runs causal attention in, as GEMMs
    that keep their probabilities (backends/torch/causal_blocks; torch_cpu_blocks says at
    which lengths): unpacked rows (in a compiled layer too: eagerly, between its compiled
    parts). None where the flash kernel, which keeps none, runs."""
    if st.key == "torch-cpu" and st.dtype == "float32" and not st.pack \
            and torch_cpu_blocks(st.seq_len):
        return causal_query_blocks(st.seq_len)
    return None


def torch_block_probabilities(sh: Shape, st: Settings, layer: int | None = None) -> int:
    """torch, bytes one layer's attention keeps in query blocks (torch_query_blocks): the
    blocks' float32 probabilities, B * Hq * sum(rows * end). Not where the attention runs
    eagerly (soft-capping, sinks: eager_scores), in a Gated DeltaNet layer, a sliding-window
    layer (the masked kernel runs there), or where its q, k, v need no gradient (the flash
    kernel runs there)."""
    blocks = torch_query_blocks(st)
    if not blocks or sh.attn_softcap or sh.attn_sinks or layer in sh.sliding_layers or (
            sh.linear_attention and layer in sh.linear_attention["layers"]) or (
            layer is not None and not _attention_needs_grad(sh, st, layer)):
        return 0
    return st.batch_size * sh.heads * block_areas(blocks)[0] * 4


def torch_block_gradient(sh: Shape, st: Settings, layer: int) -> int:
    """torch, bytes: the query blocks' backward forms dP of one block at a time beside the
    kept probabilities, the widest block's B * Hq * rows * T float32 at most (the sweep's
    long olmo2 C32 H16/4 D8 T880 q,k,v,o rc re-run: -22.8 % without), and beside them the
    incoming gradient's grouped copy and dq (Hq*D each), dk and dv (Hk*D each) per token
    (the profiler's timeline of the sweep's smollm3 C32 H4/2 D32 T984 q,v rc re-run: all
    blocks' probabilities, one dP and those four alive; -11.1 % without them)."""
    if not torch_block_probabilities(sh, st, layer):
        return 0
    q, kv, _, _ = attention_widths(sh, layer)
    return st.batch_size * (sh.heads * block_areas(torch_query_blocks(st))[1]
                            + st.seq_len * 2 * (q + kv)) * 4


def torch_top_block_gradient(sh: Shape, st: Settings) -> int:
    """torch without recompute: the top layer's attention backward in query blocks forms
    one block's dP (torch_block_gradient) while every saved set is alive (its MLP's counted
    too, the safe side: the sweep's long qwen3_moe C64 H16/4 D8 T712 all-linear peaked
    there, -12.7 % at the loss). With recompute the re-run layer counts it."""
    if st.grad_checkpoint:
        return 0
    return torch_block_gradient(sh, st, sh.layers - 1)


def torch_window_mask(sh: Shape, st: Settings, layer: int) -> int:
    """torch on the CPU, bytes: a sliding-window layer's attention runs the fused kernel
    with a (T, T) boolean mask, which scaled_dot_product_attention turns into a float32
    one and keeps for its backward: T^2 * 4 per such layer whose q, k, v carry a gradient
    (unpacked rows; the sweep's long mistral and gemma3 cases, T 864-888: -5.5 and -5.8 %
    without). Negligible at short lengths (16 KiB at 64)."""
    if st.key != "torch-cpu" or st.pack or layer not in sh.sliding_layers or (
            not _attention_needs_grad(sh, st, layer)) or sh.attn_softcap or sh.attn_sinks:
        return 0
    return st.seq_len * st.seq_len * 4


def attention_scores(sh: Shape, st: Settings) -> int:
    """MLX's attention backward forms the (B, Hq, T, T) probabilities in float32 for one
    layer at a time; torch's CPU/CUDA flash kernels never hold them. Without recompute
    they form after the loss's chunks are freed (the attention backward phase): counted
    beside the loss buffers, the issue-16 GQA case (4 x 384 tokens, 8 heads) was +17 %."""
    if st.backend != "mlx":
        return 0
    arrays = mlx_score_arrays(sh, st)
    every, widest = mlx_score_area(st)
    if not arrays or every == widest:
        return arrays * st.batch_size * sh.heads * widest * 4
    # query blocks: the score arrays of the block being differentiated, and each block's
    # dS until its dk forms (the sum of q's slice gradients is visited first): counted
    # high, the order of MLX's evaluation is not modelled (docs/memory.md)
    return ((arrays - 1) * widest + every) * st.batch_size * sh.heads * 4 \
        + mlx_block_slice_gradients(sh, st)


def mlx_block_slice_gradients(sh: Shape, st: Settings) -> int:
    """MLX's CPU query blocks (mlx_score_area): each block reads a slice of q, k and v, and
    MLX's vjp of a slice is an array of the whole input's shape, zero outside the slice;
    every block's three are formed before they are summed (the dispatcher allocates ahead
    of the worker): n_blocks · 3 · Hq·D per token in the compute dtype (measured at the
    query width for k and v too: the same peak with 1 and 4 kv heads)."""
    blocks = len(mlx_query_blocks(st))
    if blocks == 1:
        return 0
    return blocks * st.batch_size * st.seq_len * 3 * attention_widths(sh, None)[0] \
        * DTYPE_BYTES[st.dtype]


def mlx_score_arrays(sh: Shape, st: Settings) -> int:
    """(B, Hq, T, T) float32 arrays the attention backward forms beside the kept
    probabilities P. dv = P^T @ dO needs none (a transposed view of P). dq and dk need the
    softmax's vjp: dP = dO @ v^T, P * dP (the row sum's input: `mx.compile` does not fuse a
    reduction into its producer) and dS = P * (dP - sum): 3 (measured on a one-layer smollm3
    C32 H4/4 D16, q_proj alone minus v_proj alone, 64 and 128 tokens: 3.6 and 2.8 score
    arrays; v_proj alone 0.2-0.4 beyond none). Without recompute, the top layer's: 3 where
    it forms dq or dk (q, k adapted there, or a layer below adapted), 0 where it forms dv
    only or no attention gradient (o_proj, down_proj). With recompute the re-run phase keeps
    the 2 it was measured with (T = 32 to 256, 3.0 with P counted in the re-run's set)."""
    if st.grad_checkpoint:
        return 2
    top = sh.layers - 1
    if sh.linear_attention and top in sh.linear_attention["layers"]:
        return 2
    if _top_layer_differentiates(sh, st, ("q_proj", "k_proj", "qkv_proj")):
        return 3
    return 0


def activations(sh: Shape, st: Settings) -> int:
    """Saved activations of all layers: N * sum_layers(saved per token) * s. With
    recompute only each layer's input is kept: N * C * L * s."""
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    if st.grad_checkpoint:
        return (N * s * sh.hidden * CHECKPOINT_COPIES.get(st.backend, 1)
                + CHECKPOINT_STASH.get(st.backend, 0)) * checkpointed_layers(sh, st)
    adapted, kept = _adapted_layers(sh, st), _backward_layers(sh, st)
    return int(N * s * sum(saved_per_token_per_layer(sh, st, i in adapted, i)
                           - torch_attention_unsaved(sh, st, i)
                           for i in kept)) + sum(eager_scores(sh, st, i) for i in kept) \
        + sum(mlx_attention_kept(sh, st, i) + torch_block_probabilities(sh, st, i)
              + torch_window_mask(sh, st, i) for i in kept)


# (N, C) arrays kept per checkpointed layer: its input (MLX's layer_checkpoint does not
# keep the output its vjp receives, as mx.checkpoint did).
CHECKPOINT_COPIES = {"torch": 1, "mlx": 1}
# Bytes each checkpointed layer keeps whatever its size: torch's checkpoint stashes the
# CPU generator's state (torch.get_rng_state(), 5056 bytes) to replay dropout in the
# re-run (profiler's timeline: 3 x 4.9 KiB alive at the loss of the seed-18 gpt_oss C32
# L3 rc case, -8.8 % before; it matters on tiny models only)
CHECKPOINT_STASH = {"torch": 5056}


def checkpointed_layers(sh: Shape, st: Settings) -> int:
    """Layers whose input the backward keeps. MLX: those the backward re-runs, from the
    lowest adapted one up (below it no gradient flows, so no vjp holds their inputs);
    torch the same (non-reentrant checkpoint saves nothing where no gradient flows: the
    seed-0 qwen3_next q,v,o rc kept its third layer's input only)."""
    return len(_backward_layers(sh, st))


def eager_scores(sh: Shape, st: Settings, layer: int | None = None) -> int:
    """Soft-capped attention (Gemma 2) cannot use the fused kernels: each layer keeps its
    (B, Hq, T, T) scores after tanh and its probabilities, both float32 (8 bytes), plus the
    probabilities cast to the compute dtype when that is not float32. Attention sinks
    (gpt-oss) run eagerly too on torch: the (B, Hq, T, T + 1) float32 probabilities (packed
    rows: fewer, each example's own; counted as one row of T, the safe side). Neither in
    the lowest layer the backward reaches when none of its q, k, v is adapted: nothing
    below it needs a gradient, so its attention keeps nothing (measured: o_proj,down_proj on
    a 2-layer Gemma 2 kept the second layer's scores only)."""
    if layer is not None and not _attention_needs_grad(sh, st, layer):
        return 0
    cast = DTYPE_BYTES[st.dtype] if st.dtype != "float32" else 0
    if sh.attn_sinks and not sh.attn_softcap and st.backend == "torch":
        # sinks: softmax over T + 1 columns keeps its float32 output, whose first T
        # columns feed the product with v (MLX: mlx_attention_kept counts its own)
        return st.batch_size * sh.heads * st.seq_len * (st.seq_len + 1) * (4 + cast) \
            + torch_eager_kv_copies(sh, st, layer)
    if not sh.attn_softcap:
        return 0
    per = 8 + cast
    return st.batch_size * sh.heads * st.seq_len * st.seq_len * per \
        + torch_eager_kv_copies(sh, st, layer)


def torch_eager_kv_copies(sh: Shape, st: Settings, layer: int | None) -> int:
    """torch's eager attention repeats k and v to the query heads (Hk*D -> Hq*D each) and
    its two products keep those copies for the backward: 2 * (Hq - Hk) * D per token more
    than the saved set's k, v (the profiler's timeline of the fresh seed-22 gemma2 C32
    H4/1 D32 q,v rc re-run: both copies alive beside the scores; -6.7 % without). Its
    output is no product's input (the flash kernel's vjp reads its output; these do not):
    once the layer has run, the saved set's attention output (Hq*D) is not kept (the
    timeline of seed-5 gemma2 C64 H8/4 D64 q,v at the loss: each layer's repeated k, v,
    scores and probabilities, no output; +10.5 % with it). With recompute the re-run's
    moments (the product with v, the MLP's backward) are counted with it, the safe side."""
    if st.backend != "torch":
        return 0
    q, kv, _, _ = attention_widths(sh, layer)
    output = 0 if st.grad_checkpoint else q
    copies = 2 * max(q - kv, 0)
    if sh.attn_sinks and not sh.attn_softcap and not torch_eager_copies(sh, st):
        copies = 0  # gpt-oss: only measured this way for its sinks; Gemma 2 as before
    return st.batch_size * st.seq_len * (copies - output) * DTYPE_BYTES[st.dtype]


def torch_eager_copies(sh: Shape, st: Settings) -> bool:
    """Whether torch's eager attention copies its products' operands: q (B, Hq, T, D) is a
    transposed view of (B, T, Hq, D) (packed rows: of the gathered (tokens, H, D)), and
    matmul flattens the batch dims (B, Hk, G) into one only by copying it, and k, v
    broadcast over G; with one row and one kv head it folds q into a 2D matmul and copies
    nothing (the sweep's seed-0 gpt_oss C32 H4/1 b1x32 q,v: no copy alive, +16.0 % with
    them counted; packed and B = 2 rows: the copies alive)."""
    return st.pack or st.batch_size * sh.kv_heads > 1


def _attention_needs_grad(sh: Shape, st: Settings, layer: int) -> bool:
    """Whether a layer's attention inputs (q, k, v) carry a gradient: an adapter on them,
    or any adapted layer below (the residual stream then needs one)."""
    qkv = ("q_proj", "k_proj", "v_proj", "qkv_proj")
    adapted = _adapted_layers(sh, st)
    return layer in adapted and any(m in qkv for m in _layer_targets(sh, st, layer)) or any(
        _layer_targets(sh, st, i) for i in adapted if i < layer)


def _adapted_layers(sh, st) -> set:
    return set(st.layers) if st.layers is not None else set(range(sh.layers))


def _backward_layers(sh, st) -> range:
    """The layers the backward runs through: from the lowest one holding an adapted module
    up. Below it nothing needs a gradient (the embeddings are frozen), so torch's autograd
    and MLX's vjp keep nothing there; e.g. q_proj,v_proj,o_proj on a hybrid model whose
    first attention layer is the third (measured +30 % over on both backends before)."""
    adapted = [i for i in _adapted_layers(sh, st) if _layer_targets(sh, st, i)]
    if sh.moe and moe_target_names(sh, st):  # the router and experts of each sparse layer
        adapted += [i for i in sh.moe["layers"] if i in _adapted_layers(sh, st)]
    lowest = min(adapted, default=sh.layers)
    return range(lowest, sh.layers)


def torch_attention_peak_per_token(sh: Shape, st: Settings, layer: int | None) -> float:
    """torch only: elements per token a layer holds at the widest point of its attention's
    forward, which is not the end of the layer when the queries outweigh the MLP (many
    query heads on a narrow model: Hq*D = 8C on a 64-wide granite measured -7 % before).
    The residual input and the normed input (2C), the attention's adapters (r each), k
    and v (2*Hk*D), and, at RoPE's final add for q (backends/torch apply_rope), q as
    projected, its rotated copy, the two products and q after RoPE: 5*Hq*D (measured with
    the profiler's timeline: the step peaks there, in the forward or in the re-run).
    Packed rows hold the same at the gather that puts the outputs back in row order (q
    after RoPE, the gathered q, the outputs, their concatenation and the gathered
    result) and the gathered k and v besides: + 2*Hk*D. An output gate adds the gate.
    Layers whose own saved set is larger (all the usual shapes) peak at their end."""
    if st.backend != "torch" or (sh.linear_attention
                                 and layer in sh.linear_attention["layers"]):
        return 0
    q, _, kv, _ = attention_widths(sh, layer)
    names = [m for m in _layer_targets(sh, st, layer)
             if m not in ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "c_fc",
                          "c_proj")]
    n = 2 * sh.hidden + st.rank * len(names) + 5 * q + 2 * kv * (2 if st.pack else 1)
    n += torch_shared_lora_a_per_token(sh, st, layer, SHARED_INPUT_GROUPS[:1])
    if sh.attn_sinks and not sh.attn_softcap:
        n += torch_sinks_attention_copies(sh, st)
    if sh.attention_output_gate:
        n += q
        if st.pack:  # the gate's moment, after the gather back to row order: its sigmoid
            # and the gated output beside the outputs, their concatenation freed (the
            # profiler's timeline of the sweep's seed-4 qwen3_5_moe_text C32 H16/4 D64
            # all-linear rc pack re-run: 8 (N, Hq*D) alive at o_proj, -7.5 % before)
            n += q
    if sh.qk_norm:  # the per-head norms keep q and k as projected beside the normed copies
        n += q + kv
    return n + dora_kept_per_token(sh, st, names)


def torch_sinks_attention_copies(sh: Shape, st: Settings) -> int:
    """torch, elements per token: attention with sinks (gpt-oss) runs eagerly
    (backends/torch _eager_attention), and its two batched products copy their operands:
    q grouped by kv head, k and v broadcast to the query heads (Hq*D each, also where
    Hq = Hk: the transposed views are copied), and the product's (B, Hk, G, T, D) output
    is copied again to (tokens, Hq, D) at the end. Packed rows (_segment_attention) hold
    all of them at the gather back to row order: beyond the 5*Hq*D counted for the fused
    kernel's path (q after RoPE, its gathered copy, the output, their concatenation and
    the gathered result), q's grouped copy, k's and v's broadcast copies and the output's
    copy, 4*Hq*D (the profiler's timeline of seed-3 gpt_oss C32 H2/2 D64 all-linear pack:
    nine (N, Hq*D) tensors alive there, -6.6 % before); unpadded rows at the copy o_proj
    reads, one Hq*D more than RoPE's add (where the copies happen: torch_eager_copies).
    The probabilities: eager_scores."""
    q = attention_widths(sh, None)[0]
    # inside the attention (unpacked rows) the scores concatenated with the sink column
    # stay referenced beside the probabilities: one more (B, Hq, T, T + 1) float32 (the
    # sweep's seed-2 gpt_oss C32 H8/4 D16 b2x48 q,v rc: both alive at the product with v,
    # -5.0 % before); packed rows peak after the attention returns, the scores freed
    scores = sh.heads * (st.seq_len + 1) * 4 / DTYPE_BYTES[st.dtype]
    if not torch_eager_copies(sh, st):  # no copies: q after RoPE, k, v, the scores, the
        return max(0, scores - 2 * q)   # probabilities, the output: within RoPE's 5*Hq*D
    # with recompute every re-run moment counts the layer's eager_scores, k's and v's
    # broadcast copies among them (torch_eager_kv_copies): not twice here (the sweep's
    # seed-4 gpt_oss C32 H16/4 D64 b2x48 q,v rc: 6 (N, Hq*D) + 2 (N, Hk*D) alive at the
    # output's copy, +14.9 % counted twice)
    shared = 2 * max(q - attention_widths(sh, None)[1], 0) if st.grad_checkpoint else 0
    return (4 * q if st.pack else max(q, scores)) - shared


def activations_at_attention(sh: Shape, st: Settings) -> int:
    """torch, without recompute: the saved sets of the kept layers below a layer plus that
    layer's attention peak (torch_attention_peak_per_token), the highest over the layers.
    With recompute the same point recurs in the re-run (recompute_layer)."""
    if st.backend != "torch" or st.grad_checkpoint:
        return activations(sh, st)
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    adapted, below, best = _adapted_layers(sh, st), 0.0, 0.0
    for i in _backward_layers(sh, st):
        own = (eager_scores(sh, st, i) - torch_eager_kv_copies(sh, st, i)) / (N * s) \
            if sh.attn_sinks else 0  # its probabilities (its copies: the peak's own count)
        best = max(best, below + torch_attention_peak_per_token(sh, st, i) + own)
        below += saved_per_token_per_layer(sh, st, i in adapted, i) \
            + (eager_scores(sh, st, i) + torch_block_probabilities(sh, st, i)
               + torch_window_mask(sh, st, i)) / (N * s)
    return int(N * s * best)


def torch_moe_forward_extra_per_token(sh: Shape, st: Settings, layer: int | None) -> int:
    """torch only: what a sparse MoE layer holds at its experts' down projection beyond
    its saved set (models/blocks/moe.py, backends/torch gather_linear): the activation the
    projection reads (k*F', referenced until the block returns), its rows gathered in
    expert order (k*F') and the experts' outputs concatenated (k*C) beside the outputs put
    back in row order (saved, counted). The profiler's timeline put the re-run layer's
    peak there (seed-1 mixtral C32 k2 F'56 rc: -13 % before)."""
    if st.backend != "torch" or not sh.moe or layer not in sh.moe["layers"]:
        return 0
    k, F = sh.moe["top_k"], sh.moe["expert_size"]
    return 2 * k * F + k * sh.hidden


def torch_moe_forward(sh: Shape, st: Settings) -> int:
    """torch without recompute: every saved activation (the top sparse layer's too, the
    safe side) plus that layer's down-projection transients (above)."""
    if st.backend != "torch" or not sh.moe or st.grad_checkpoint:
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    return N * s * max(torch_moe_forward_extra_per_token(sh, st, i)
                       for i in _backward_layers(sh, st)) if _backward_layers(sh, st) else 0


def embeddings_before_head(sh: Shape, st: Settings) -> int:
    """Inside the layers: the embedding output and the RoPE tables, not the final norm."""
    return embeddings_and_rope(sh, st) - st.batch_size * st.seq_len * \
        DTYPE_BYTES[st.dtype] * sh.hidden


def embeddings_in_backward(sh: Shape, st: Settings) -> int:
    """torch: while the backward re-runs a layer the fused loss has freed the final norm's
    output (the profiler's timeline holds the embedding output and the RoPE tables only:
    seed-17 qwen3_moe C96 L1 rc, +12.7 % with it counted); MLX's phases count their own."""
    if st.backend == "torch":
        return embeddings_before_head(sh, st)
    return embeddings_and_rope(sh, st)


def recompute_layer(sh: Shape, st: Settings) -> int:
    """With recompute, the backward re-runs one layer at a time and holds its full saved
    set plus dL/dh (N * C * s) while the loss buffers are already freed."""
    if not st.grad_checkpoint:
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    if st.backend == "mlx":  # only the layers the backward re-runs, each as it is adapted
        layers, adapted = _backward_layers(sh, st), _adapted_layers(sh, st)
    else:  # torch: the re-run reaches the backward's layers only (a hybrid's DeltaNet
        # layers under its first adapted attention layer are never re-run)
        layers = _backward_layers(sh, st)
        adapted = set(range(sh.layers)) if _adapted_layers(sh, st) else set()
    per = max((max(N * s * (saved_per_token_per_layer(sh, st, i in adapted, i)
                            - torch_attention_unsaved(sh, st, i)
                            + max(torch_moe_forward_extra_per_token(sh, st, i)
                                  + torch_output_norm_backward(sh, st),
                                  torch_mlp_backward_per_token(sh, st, i)
                                 - torch_mlp_output_norm_freed(sh, st),
                                  torch_masked_scores(sh, st) / (N * s)))
                   + torch_gradients_from(sh, st, i, own="down"),
                   N * s * torch_attention_peak_per_token(sh, st, i)
                   + torch_gradients_from(sh, st, i, own="none"),
                   torch_rerun_attention_backward(sh, st, i, i in adapted))
               + mlx_attention_kept(sh, st, i) + torch_block_probabilities(sh, st, i)
               + torch_window_mask(sh, st, i)
               for i in layers), default=0)
    return int(per + N * s * sh.hidden) + eager_scores(sh, st)


def torch_rerun_attention_backward(sh: Shape, st: Settings, layer: int,
                                   adapted: bool) -> int:
    """torch with recompute: the re-run layer's backward after its MLP's, the layer's
    every adapter gradient formed, its MLP's saved set freed (gate, act, up, down's input,
    the MLP adapters' r and DoRA outputs): the rest of the saved set and the gradients of
    the layers at and above it. A sparse MoE layer keeps its whole set here (the safe side:
    its experts' backward is not split out)."""
    if st.backend != "torch":
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    rest = saved_per_token_per_layer(sh, st, adapted, layer) \
        - torch_attention_unsaved(sh, st, layer) - mlp_saved_per_token(sh, st, adapted, layer)
    return int(N * s * rest) + torch_gradients_from(sh, st, layer) \
        + torch_block_gradient(sh, st, layer)


def mlp_saved_per_token(sh: Shape, st: Settings, adapted: bool, layer: int) -> int:
    """The dense MLP's share of a layer's saved set, per token: gate, act and up (3F), and
    of its adapted projections the rank-r projections, DoRA's outputs and down_proj's
    input, and gate's and up's A copy (torch_shared_lora_a_per_token). A sparse MoE layer's
    is its block's (sparse_mlp_saved_per_token: the experts' outputs, routing, expert
    adapters' rows and B copies, the shared expert) beside the k experts' 3F: freed by the
    block's backward as a dense MLP's is (kept whole here before, the safe side: the
    sweep's seed-3 mixtral C32 E2 r32 all-linear rc re-run +10 .. +12 % over with the B
    copies counted)."""
    mlp = [m for m in (_layer_targets(sh, st, layer) if adapted else []) if m in MLP_NAMES]
    n = mlp_activations_kept(sh, st, layer) + st.rank * len(mlp) \
        + dora_kept_per_token(sh, st, mlp) + sparse_mlp_saved_per_token(sh, st, adapted, layer)
    if adapted:
        n += torch_shared_lora_a_per_token(sh, st, layer, SHARED_INPUT_GROUPS[1:])
    return n + (down_proj_input(sh, layer) if any(m in DOWN_NAMES for m in mlp) else 0)


# a layer's MLP projections (dense; starcoder2's c_fc, c_proj) and its output projection
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "c_fc", "c_proj")
DOWN_NAMES = ("down_proj", "c_proj")


def torch_masked_scores(sh: Shape, st: Settings) -> int:
    """torch, soft-capped eager attention in a re-run layer: beside the capped scores and
    the probabilities it keeps (eager_scores), the masked scores softmax reads, (B, Hq, T, T)
    float32, stay referenced until the attention returns (the profiler's timeline of the
    fresh seed-22 gemma2 C32 H4/1 q,v rc re-run: tanh, masked_fill and softmax outputs
    alive at the product with v; -7.2 % without). A forward transient: freed before the
    layer's MLP backward (torch_mlp_backward_per_token), the other point a re-run peaks
    at (seed-23 gemma2 C64 F248 T64 all-linear rc: +13.1 % with both counted)."""
    if st.backend != "torch" or not sh.attn_softcap or not st.grad_checkpoint:
        return 0
    return st.batch_size * sh.heads * st.seq_len * st.seq_len * 4


def torch_attention_unsaved(sh: Shape, st: Settings, layer: int) -> int:
    """torch, elements per token: what the saved set counts for an attention whose q, k, v
    need no gradient (none of them adapted, no adapted layer below: o_proj,down_proj on the
    lowest layers) and so keeps nothing: q, k, v after RoPE and the output (2*Hq*D +
    2*Hk*D), the q/k norms' inputs. The profiler's timeline of the seed-0 gemma4_text
    o,down rc pack re-run held only the residuals, o_proj's gathered input and the MLP;
    without recompute the fresh seed-22 qwen3 C32 H4/4 D64 o,down the same, +11.3 % with
    them counted."""
    if st.backend != "torch" or _attention_needs_grad(sh, st, layer) or (
            sh.linear_attention and layer in sh.linear_attention["layers"]):
        return 0
    q, kv, _, _ = attention_widths(sh, layer)
    return 2 * q + 2 * kv + ((q + kv) if sh.qk_norm else 0)


def torch_gradients_from(sh: Shape, st: Settings, layer: int, own: str = "all") -> int:
    """torch: the adapter gradients alive while the backward re-runs `layer`: those of the
    layers above it and, by `own`, the layer's own: "all" (its backward is done or under
    way), "down" (at its MLP's backward, which follows the down projection's: only that
    adapter's gradients exist), "none" (its re-run forward). torch sets them to None after
    each step and the re-run runs top down. The profiler's timeline at a one-layer
    starcoder2 all-linear rc peak (the MLP backward) held c_proj's adapter gradients only:
    every layer's were counted (+12.9 %), then all of the layer's (seed-5 starcoder2 C128
    F256 r32: +12.5 %). MLX: all (recompute_gradients)."""
    if st.backend != "torch":
        return 0
    above = [j for j in _adapted_layers(sh, st) if j > layer]
    n = all_adapter_gradients(sh, st.replace(layers=above)) if above else 0
    if layer not in _adapted_layers(sh, st) or own == "none":
        return n
    if own == "down":  # a sparse layer: its MLP side's (the routed and shared experts'
        # backward is not split out), not its attention's or DeltaNet's
        sparse = sh.moe and layer in sh.moe["layers"]
        down = [m for m in _layer_targets(sh, st, layer)
                if (m not in MIXER_NAMES if sparse else m in DOWN_NAMES)]
        # the routed experts' backward runs down_proj's first; the router's and
        # gate_up_proj's gradients form after it (the profiler's timeline of the sweep's
        # seed-3 mixtral C32 E2 r32 all-linear rc re-run: down's alone at its peak, +13.2 %
        # with all three counted once gate_up's B copy was)
        down += sorted(moe_target_names(sh, st) & {"down_proj"}) if sparse else []
        if not down:
            return n
        return n + all_adapter_gradients(sh, st.replace(layers=[layer],
                                                        targets=",".join(down)))
    return n + all_adapter_gradients(sh, st.replace(layers=[layer]))


# a layer's attention and Gated DeltaNet projections
MIXER_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "in_proj_qkv",
               "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


def rerun_gradients(sh: Shape, st: Settings) -> int:
    """The recompute phase's gradients: torch counts them per re-run layer
    (torch_gradients_from, in recompute_layer); MLX all of them."""
    return 0 if st.backend == "torch" else recompute_gradients(sh, st)


def torch_mlp_backward_per_token(sh: Shape, st: Settings, layer: int) -> int:
    """torch with recompute, elements per token: a re-run layer's backward starts with its
    MLP's, while the whole re-run saved set is alive: dL/d(down_proj's input) and the
    gradients of its two factors (3F; torch_backward_start counts the same for the top
    layer without recompute). The profiler's timeline put the seed-0 qwen3_next C96 F336
    q,v,o rc peak there (6F alive: gate, up, act and the three gradients), -5.3 % with the
    re-run counted on the backward's layers only, as it is."""
    if st.backend != "torch":
        return 0
    F = mlp_width(sh, layer)
    grads = 2 * F if "c_fc" in sh.linears else 3 * F  # a plain MLP: dL/d(act), dL/d(c_fc)
    if layer in _adapted_layers(sh, st) and any(
            m in DOWN_NAMES for m in _layer_targets(sh, st, layer)):
        grads -= F  # the adapter kept down's input (in the saved set), freed by then
    return grads


def torch_output_norm_backward(sh: Shape, st: Settings) -> int:
    """torch only, elements per token: a layer whose MLP output is normed (Gemma's
    post-feedforward norm) starts its backward with that norm's, while every tensor the
    layer saved is alive. On the CPU F.rms_norm is decomposed and its backward forms
    x^1, 2x, the product with the gradient (pow's vjp) and the gradient spread over the
    mean (4C; the profiler's timeline put a re-run Gemma 3 layer's peak there, -14.6 %
    before). Llama's layer starts with the MLP's backward, and its norms' backwards run
    when most of the layer is freed. Since then a float32 norm with a frozen weight on the
    CPU runs as one Function (backends/torch _RmsNorm), whose backward forms g*w and the
    result only (2C; seed-6 glm4 C96 F192 L1 o,down rc pack: +10.0 % with 4C). Elsewhere
    (bf16, CUDA's F.rms_norm) the 4C stays."""
    if st.backend != "torch" or not sh.output_norm:
        return 0
    fused = st.device == "cpu" and st.dtype == "float32"
    return (2 if fused else 4) * sh.hidden


def mlx_recompute_transients(sh: Shape, st: Settings) -> int:
    """MLX with recompute: the gradients one re-run layer's backward forms while its
    re-run set is alive (backends/mlx/recompute runs the layers' backwards one after
    another): N * (2F + 2C + 12*Hq*D + 6*Hk*D) * s, and 3F more when the down projection
    is adapted (its input's gradient through W and through the adapter, and their sum).
    Counted from one-factor slopes of a one-layer model (docs/memory.md). A fused
    projection (glm4's and phi3's gate_up_proj, phi3's qkv_proj) adds the gradient of its
    whole output, which the split's vjp assembles from its parts: 2F, and for phi3's
    qkv_proj each part's full-width cotangent, 3 (Hq + 2Hk)*D, as at the loss
    (mlx_fused_split_cotangents; phi3 C32 H16/4 D32, 1-2 layers, qkv,o: -11.4 % and
    -13.3 % with one width, -2.4 % and -5.0 % with three; H4/2 +7.5 %)."""
    if st.backend != "mlx":
        return 0
    N, s, F = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype], sh.intermediate
    n = mlx_rerun_mlp_gradients(sh) * F + 2 * sh.hidden + max(max(
        mlx_recompute_attention_transients(sh, st, i)
        for i in _backward_layers(sh, st) or [None]), mlx_rerun_attention_input_side(sh))
    n += mlx_gelu_tanh_kept(sh, st)
    if {"down_proj", "c_proj"} & set(target_names(sh, st)):
        n += 3 * F
    if "gate_up_proj" in sh.linears:
        n += 2 * F
    if "qkv_proj" in sh.linears:
        n += 3 * (sh.heads + 2 * sh.kv_heads) * sh.head_dim  # q, k, v: each full width
    return int(N * s * n)


def mlx_rerun_mlp_gradients(sh: Shape) -> int:
    """F-wide gradients a re-run layer's MLP backward holds beyond the saved set, in units
    of F: 2 for a gated MLP (the one-layer llama's slope: its two branches, gate and up,
    each form their gradient), 1 for a plain MLP (starcoder2's c_fc -> GELU -> c_proj has
    one branch: d(c_fc's output) only; seed-5 starcoder2 C128 F256 L1 all-linear rc read
    +12.8 % with 2)."""
    return 1 if "c_fc" in sh.linears else 2


def mlx_recompute_attention_transients(sh: Shape, st: Settings, layer: int | None) -> float:
    """Elements per token a re-run layer's token mixer forms in its MLX backward: 12 * Hq*D +
    6 * Hk*D (the one-layer llama's slopes), at that layer's own widths. Gemma 4's full
    layers have global_head_dim (2 D in the drawn configs) and their own kv heads, and a
    kv-sharing layer forms dk, dv of the k, v it reads (they carry its gradient back to
    the layer that made them): the widest layer the backward re-runs counts (C64 L3 H8/2
    D32, full layers 8 x 64 wide: -16 % while the sliding width was counted). A Gated
    DeltaNet layer forms the cotangents of its delta rule's float32 arrays instead
    (deltanet_float32_per_token)."""
    if sh.linear_attention and layer in sh.linear_attention["layers"]:
        return deltanet_float32_per_token(sh, st) + mlx_delta_rule_vjp_products(sh, st)
    q, _, kv, _ = attention_widths(sh, layer)
    return 12 * q + 6 * kv


def mlx_rerun_attention_input_side(sh: Shape) -> int:
    """Elements per token: the C-wide end of a re-run attention sublayer's MLX backward,
    which the head-width count (12 * Hq*D + 6 * Hk*D, calibrated where Hq*D = C) misses
    when the heads are narrow (Hq*D << C): the normed input's gradient through q, k and v
    (three (N, C) products and their sum, 4C), and for each norm on a sublayer's output
    (Gemma 2/3's post-attention and post-feedforward norms) the C-wide intermediates of
    its vjp (g * w, its product with x, the difference: 3C) beside the re-run set. A
    floor, not a sum: where the heads are wide their count covers it (the calibrated
    case). Measured one factor at a time on seed 1's gemma3_text C64 F120 L1 H1/1 D8
    all-linear rc (128 tokens), C 64, 128, 256: 7.6, 8.9, 9.1 C per token beyond the
    head-width count; a llama of the same shape 3.3 C at C 128 and 256 (docs/memory.md,
    "MLX recompute, narrow heads"). Post-normed layers without Gemma's tanh-GELU (OLMo,
    EXAONE 4, GLM-4) have their narrow-attention moment counted apart
    (mlx_rerun_post_norm_moment): 0 there, not counted twice."""
    if sh.output_norm and not sh.gelu_tanh:
        return 0
    return sh.hidden * (4 + 3 * sh.output_norms)


def mlx_deltanet_forward(sh: Shape, st: Settings) -> int:
    """MLX: a Gated DeltaNet layer's forward holds its delta rule's float32 arrays
    (deltanet_float32_per_token: the chunk's (c, c) matrices, MLX's squarings, the
    per-head vectors and states) at once, beside its input and normed input (2C), even
    where nothing is kept for a backward: a DeltaNet layer below the lowest adapted one
    (q_proj,v_proj,o_proj on a hybrid) or one run under recompute. Then only what the
    layers below keep is alive: checkpoints with recompute, their saved sets without.
    Measured on qwen3_5_text C96 F224 q,v,o rc, vocabulary 200, value heads 4: 2.40 MiB
    above the static terms, 4904 elements per token (counted 4828 + 2C); -30.9 % before
    this phase. 0 where no such forward outweighs its layer's saved set."""
    la = sh.linear_attention
    if st.backend != "mlx" or not la:
        return 0
    return _deltanet_forward_peak(sh, st, lambda i: deltanet_float32_per_token(sh, st)
                                  + 2 * sh.hidden + mlx_deltanet_run_ahead(sh, i))


def _deltanet_forward_peak(sh: Shape, st: Settings, own) -> int:
    """Bytes at the widest forward of a Gated DeltaNet layer that keeps nothing for a
    backward (below the lowest adapted layer, or re-run under recompute): what the layers
    below it hold (their checkpoints with recompute, their saved sets without) plus
    own(layer) elements per token of its own."""
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    kept, adapted = _backward_layers(sh, st), _adapted_layers(sh, st)
    best = 0.0
    for i in sh.linear_attention["layers"]:
        if i in kept and not st.grad_checkpoint:
            continue  # its arrays are its saved set, counted with the activations
        below = [j for j in kept if j < i]
        held = len(below) * sh.hidden if st.grad_checkpoint else sum(
            saved_per_token_per_layer(sh, st, j in adapted, j) for j in below)
        best = max(best, held + own(i))
    return int(N * s * best)


def mlx_deltanet_run_ahead(sh: Shape, layer: int) -> int:
    """MLX, elements per token: what the dispatcher has allocated past a DeltaNet layer's
    delta rule while the worker still runs it (the window of "MLX's dispatcher runs ahead
    of the loss": up to 10 scheduler tasks of 10 dispatches each, ~50 ops, about one
    layer's forward): out_proj's output, the residual sum and the post-attention norm's
    output (3C), and the MLP's gate and up projections (2F). Measured on a qwen3_next C96
    F248 L3 H1/1 q,v,o rc case (value heads 4; the model's forward alone peaks as high
    as the step): F 120, 248, 496 raised the forward's peak by ~2F per token beyond the
    weights, with 3C left over; under mx.set_memory_limit(1) (no run-ahead) the step
    peaks 0.45 MiB lower (docs/memory.md, "MLX: the DeltaNet forward's run-ahead")."""
    return 3 * sh.hidden + 2 * mlp_width(sh, layer)


# (c, c) matrices per value head a DeltaNet layer's MLX backward holds beyond one cotangent
# per kept array. Its vjp forms up to 8 such products: attn = (q k^T) * decay gives
# d(q k^T) and decay's first cotangent (2); neg = -(k_beta k^T * decay * strict) gives
# d(k_beta k^T * decay) (negation and mask fused), d(k_beta k^T) and decay's second
# cotangent (3); decay = exp(where(mask, cum_i - cum_j, -inf)) the sum of decay's two,
# through exp and through where (3). How many are alive at once depends on how far the
# dispatcher runs ahead of the worker: 4.3-4.4 per value head were missing on the two
# sweep cases below, 8-9 on a one-layer probe (see mlx_delta_rule_vjp_products)
MLX_DELTA_RULE_VJP_MATRICES = 4


def mlx_delta_rule_vjp_products(sh: Shape, st: Settings) -> float:
    """MLX, elements per token in the compute dtype: the (c, c) products the delta rule's
    vjp holds at once beyond a cotangent per kept array (MLX_DELTA_RULE_VJP_MATRICES per
    value head, float32; the dispatcher allocates them ahead of the worker, as the loss's
    run-ahead: under mx.set_memory_limit(1) the probe below peaks at 1.23 MiB, 1.95
    without). In the re-run phase of a DeltaNet layer and, without recompute, its own
    backward phase. Sweep (seeds 0-4, qwen3_5_text / qwen3_next / qwen3_5_moe_text): 2:1
    qwen3_5_text C64 H1/1 all-linear rc dora -5.8 -> -0.4 %, 4:2 qwen3_5_moe_text C96
    all-linear rc pack -6.9 -> -0.7 %, 0:3 qwen3_next C32 all-linear pack (no recompute)
    -7.2 -> -3.6 %, all with 4 value heads at c = 64 (4.3-4.4 Hv*c per token missing).
    The one-layer probe (seed-2 qwen3_next C32 F64 H2/1 all-linear rc pack of a
    `--families qwen3_5_text,qwen3_next,qwen3,llama` sweep, value heads 2 -> 4) read a slope
    of 9 c per value head at c = 32 and 8 c at c = 64, but two chunks (seq 128) only half
    of that per token: an upper count of 8 read +10 % there and +15 .. +22 % on three sweep
    cases, so the count is the sweep's 4, not the enumeration's 8."""
    la = sh.linear_attention
    if st.backend != "mlx" or not la:
        return 0.0
    c = min(64, st.seq_len)
    return la["value_heads"] * MLX_DELTA_RULE_VJP_MATRICES * c * 4 / DTYPE_BYTES[st.dtype]


def torch_deltanet_forward(sh: Shape, st: Settings) -> int:
    """torch: a Gated DeltaNet layer's forward where it keeps nothing for a backward (a
    layer below the lowest adapted one, or one run under recompute) still holds, while its
    chunk loop runs (backends/torch gated_delta_rule), every float32 array of the delta
    rule as Python locals, float32: q and k repeated to Hv heads, v (2*Dk + Dv per value
    head), k*beta, its decayed copy, q's decayed copy and k's write copy (4*Dk), the
    triangular solve's output (Dv + Dk), the decay, the UT and the intra-chunk score
    matrices (3c: the products before their mul with the decay are freed, unlike in the
    saved set, torch_delta_products), beta, g and its cumulative sum (3), the chunk loop's
    corrected values, its two products and the outputs (3*Dv) and the state (or, the
    wider moment where c outweighs Dv, q @ k^T beside its product with the decay: 4c, the
    loop's 3*Dv not yet formed; seed-2 qwen3_next Dk = Dv = 8 peaked there); the
    convolution's input and its silu'd output, of which q, k, v are views (2X), and the
    layer's input and normed input (2C); the layers below hold their saved sets (their
    checkpoints with recompute). The profiler's timeline of the sweep's seed-0 qwen3_next
    C32 Hv4 Dk16 Dv16 c64 q,v,o dora (its two DeltaNet layers under the adapted attention
    one) peaked in the second DeltaNet layer's chunk loop: 1986 elements per token alive
    (-10.7 % at the loss before; 1980 counted). MLX: mlx_deltanet_forward."""
    la = sh.linear_attention
    if st.backend != "torch" or not la:
        return 0
    Hv, Dk, Dv = la["value_heads"], la["key_dim"], la["value_dim"]
    X = 2 * la["key_heads"] * Dk + Hv * Dv
    c = min(64, st.seq_len)
    rule = max(Hv * (7 * Dk + 5 * Dv + 3 * c + 3) + Hv * Dk * Dv / c,  # the chunk loop
               Hv * (7 * Dk + 2 * Dv + 4 * c + 3)) * 4 / DTYPE_BYTES[st.dtype]  # q @ k^T
    return _deltanet_forward_peak(sh, st, lambda i: rule + 2 * X + 2 * sh.hidden)


def mlx_deltanet_backward(sh: Shape, st: Settings) -> int:
    """MLX without recompute: a Gated DeltaNet layer's own backward, once the layers above
    it have run theirs and freed their saved sets, forms the cotangent of each float32
    array its delta rule keeps (deltanet_float32_per_token: the chunk's (c, c) matrices,
    MLX's squarings, the per-head vectors and states) while those arrays, the rest of
    its saved set and the saved sets of the layers below are alive, beside the residual
    stream's gradient and the normed input's (2C), and the layer's MLP (or MoE) backward
    transients, as the top layer's at the loss (backward_transients: its MLP's backward
    runs just before, its adapters' gradients are still forming). With recompute the
    re-run phase counts
    the same cotangents (mlx_recompute_attention_transients). It outweighs the loss phase
    where the delta rule's matrices outweigh the top layer and the loss buffers: seed-0
    qwen3_5_moe_text C32 F120 L3 all-linear pack, 4 value heads (Hv*c = 256 float32 per
    token per matrix): -17.2 % at the loss without DoRA, the same at 4 key heads (not
    the repeat of q, k to the value heads); measured 5.97, 10.12, 18.11 MiB at 2, 4, 8
    value heads (2.0 MiB a head; this phase's slope 1.93), -1.5 % and -2.3 % with this
    phase at 4 and 8 (the delta rule's arrays alone: -7.8 %, -5.8 %)."""
    la = sh.linear_attention
    if st.backend != "mlx" or not la or st.grad_checkpoint:
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    kept, adapted = _backward_layers(sh, st), _adapted_layers(sh, st)
    best = 0.0
    for i in la["layers"]:
        if i not in kept:
            continue
        held = sum(saved_per_token_per_layer(sh, st, j in adapted, j) for j in kept if j <= i)
        best = max(best, held + deltanet_float32_per_token(sh, st) + 2 * sh.hidden
                   + mlx_delta_rule_vjp_products(sh, st))
    return int(N * s * best) + backward_transients(sh, st)


def mlx_gelu_tanh_kept(sh: Shape, st: Settings) -> int:
    """MLX, elements per token: the tanh-GELU of a GeGLU MLP (Gemma) is composite on MLX
    (backends/mlx gelu_tanh: 0.5 x (1 + tanh(...))), and the compiled re-run keeps what
    its vjps read, tanh's output, 1 + tanh and 0.5 x, where SiLU's keeps one sigmoid:
    counted 3F (measured GeGLU minus SiLU in the re-run layer, Gemma 4 C96 one layer,
    F = 160, 320, 640: 2.6 to 2.7 F per token). Gated MLPs only: a plain one (starcoder2's
    c_fc, c_proj) has no up projection, and its count's 3F holds an F it does not keep
    (not measured beyond that: its seed-0 recompute case stays +5 %)."""
    gated = "c_fc" not in sh.linears
    return 3 * sh.intermediate if st.backend == "mlx" and sh.gelu_tanh and gated else 0


# C-wide arrays in flight between the head's logits and the re-run layer: the rest of the
# fused loss's chunk beyond dL/dh (e @ W, W[targets], their difference: 2C, measured alone),
# the loss vjp's product (C) and the final norm's vjp (3C)
MLX_LOSS_IN_FLIGHT_C = 6


def mlx_loss_in_flight(sh: Shape, st: Settings) -> int:
    """MLX with recompute, the loss phase: what the CPU dispatcher has allocated ahead of the
    loss's (rows, V) logits. MLX evaluates a graph asynchronously: the main thread walks the
    tape, allocating each op's output as it dispatches it to the stream's worker, and only
    waits once 10 tasks (10 dispatches each on the CPU, ~5 ops) are outstanding or active
    memory passes the memory limit. While the worker runs the head's matmul and exp (the
    widest ops of the step), the dispatcher has gone on to the ops after them: the rest of
    the loss, the final norm's vjp and the re-run of the top layer, whose forward allocates
    the layer's whole saved set (and, unfused, its attention probabilities). Measured on a
    one-layer llama C96 F224 H2/2 D8 V2328 q,v,o rc (128 tokens): forward + loss alone peak
    as high as the whole step (3.08 MiB above the weights); the hidden states evaluated
    first, 2.46; with mx.set_memory_limit(1) (the dispatcher waits for every task) 2.32
    (docs/memory.md, "MLX's dispatcher runs ahead of the loss"). An upper bound of the window
    (how far the worker lags varies with the machine): the top re-run layer's saved set,
    its kept attention and MLX_LOSS_IN_FLIGHT_C * C per token."""
    if st.backend != "mlx" or not st.grad_checkpoint:
        return 0
    layers = _backward_layers(sh, st)
    if not layers:
        return 0
    top = layers[-1]
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    n = saved_per_token_per_layer(sh, st, top in _adapted_layers(sh, st), top) \
        + MLX_LOSS_IN_FLIGHT_C * sh.hidden
    return int(N * s * n) + mlx_attention_kept(sh, st, top) + eager_scores(sh, st, top)


def mlx_loaded_adapter(sh: Shape, st: Settings) -> int:
    """MLX: the model's parameter dict still holds the adapter as attached (its initial
    values) while the trainer's own dict takes each update (MLX arrays are immutable;
    torch updates in place): one more adapter copy alive through every step (measured
    between steps: 1.00 copy, with recompute or not). Counted in the recompute phase here;
    the optimizer step counts it as the copy alive when the update starts."""
    return adapter_weights(sh, st) if st.backend == "mlx" else 0


def backward_transients(sh: Shape, st: Settings) -> int:
    """MLX evaluates the whole backward graph at once; at its peak it holds the top
    layer's MLP and attention gradients beside everything saved: about
    N * (8F + 6C) * s, measured on the test grid (torch frees these before they add up)."""
    if st.backend != "mlx":
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    return N * s * (8 * mlp_width(sh, sh.layers - 1) + 6 * sh.hidden
                    + mlx_moe_backward_per_token(sh, st))


def mlx_rerun_sparse(sh: Shape, st: Settings) -> bool:
    """MLX with recompute: whether the backward re-runs a sparse MoE layer."""
    return bool(sh.moe) and any(i in sh.moe["layers"] for i in _backward_layers(sh, st))


def mlx_recompute_mlp_output(sh: Shape, st: Settings) -> int:
    """MLX with recompute, the re-run phase: what a re-run layer holds when it must form its
    MLP's output. The 3F that mlx_recompute_transients counts with down_proj adapted is
    not the adapter's own: it is paid whenever the re-run forms act(gate) * up and the
    down projection. In a pre-norm dense layer nothing reads them (the residual add's vjp
    passes the cotangent through, a frozen projection's vjp needs only its weight), so the
    re-run stops at gate and up. A norm on the MLP's output (OLMo 2/3's and EXAONE 4's
    post-norms, GLM-4's sandwich, Gemma's post-feedforward norm) reads it in its vjp: 3F
    (measured on a one-layer EXAONE 4 against the same llama, C96, 64 tokens, q,k,v,o:
    3.4F per token beyond the counted output-norm inputs at F 304 and 608; with down_proj
    adapted on both, the same within 0.05 MiB). A sparse MoE layer always forms it (the
    routing weights' vjp reads the k expert outputs; F = k*F'), and its experts' fused
    gate_up is split into gate and up, whose vjps are each the whole width (2 * 2F, as
    mlx_fused_split_cotangents): 7F (mixtral C32, 1 layer, k 1-2, F' 56-112: 13 F per
    token measured against 5 for the same dense llama; the routing's C-wide cotangents of
    mlx_moe_backward_per_token were 8-12 % over when counted too, so they are not).
    Counted in the re-run phase only: the loss phase's overlap with the backward was
    measured on dense pre-norm layers (docs/memory.md)."""
    if st.backend != "mlx" or not st.grad_checkpoint:
        return 0
    N, s, F = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype], sh.intermediate
    sparse = mlx_rerun_sparse(sh, st)
    n = 2 * 2 * F if sparse else 0
    if (sh.output_norm or sparse) and not {"down_proj", "c_proj"} & set(target_names(sh, st)):
        n += 3 * F
    return N * s * n


def mlx_rerun_fused_gate_up(sh: Shape, st: Settings) -> int:
    """MLX with recompute, the re-run phase: a fused gate_up_proj (GLM-4's, Phi-3's) is
    split into gate and up inside the re-run layer, and the vjp of each slice is the whole
    fused width with the part's cotangent written in (as at the loss,
    mlx_fused_split_cotangents): the two full-width cotangents (4F) and the normed input's
    gradient (2C) are alive at the MLP's end of the layer's backward, beyond what
    mlx_recompute_transients counts. Measured one factor at a time on one re-run layer,
    C64 H4/1 D8, 64 tokens, F 152 -> 608: phi3 14.9 F per token against llama's 7.9 (10.0
    counted before), glm4 17.0 against olmo3's 10.9 (13.0 counted before), and glm4
    4F + 2C short at both F. Where the attention's backward is wide (glm4 C128 H16/4 D32,
    32 tokens) the split was hidden: the count adds the attention's transients, and the
    split's moment is not the attention's. How much it hides is fitted, not derived: a
    quarter of the attention's count (12 Hq*D + 6 Hk*D; H4/4 .. H16/4 of that glm4 land
    +2 .. +5 %). Not at the loss phase (glm4's loss-phase cases were over already)."""
    if st.backend != "mlx" or not st.grad_checkpoint or "gate_up_proj" not in sh.linears:
        return 0
    if mlx_rerun_sparse(sh, st):
        return 0  # a sparse layer's experts' split is counted in mlx_recompute_mlp_output
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    hidden_by = max(mlx_recompute_attention_transients(sh, st, i)
                    for i in _backward_layers(sh, st) or [None]) / 4
    return int(N * s * max(0.0, 2 * sh.linears["gate_up_proj"][1] + 2 * sh.hidden - hidden_by))


def mlx_rerun_post_norm_moment(sh: Shape, st: Settings) -> int:
    """MLX with recompute, the re-run phase: a layer whose sublayers' outputs are normed
    (OLMo 2/3's and EXAONE 4's post-norms, GLM-4's sandwich) has a moment at the MLP's end
    of its backward that mlx_recompute_transients does not count, since it adds the
    attention's gradients (12 Hq*D + 6 Hk*D) to the MLP's as if the peak were always
    there: with a narrow attention (olmo3 C96 H1/1 D8, Hq*D = C/12) the peak stays at the
    MLP's end and hardly moves with the attention's width (H1 -> H4: measured +0.22 MiB,
    counted +0.69). Measured one factor at a time on a one-layer olmo3 against the count,
    128 tokens: 3.2 C per token short at C 96 and 192, F 224 and 448 (the norms' vjps'
    C-wide arrays), and 1.8 F more with down_proj adapted (a llama of that shape: 1.3 F).
    Counted as 3C (+ 2F with down_proj adapted) beyond the attention's transients, 0
    where those are wider: an upper bound of the moment, not its derivation. Gemma's
    tanh-GELU layers are left to their own terms."""
    if st.backend != "mlx" or not st.grad_checkpoint or not sh.output_norm or sh.gelu_tanh:
        return 0
    if mlx_rerun_sparse(sh, st):
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    n = 3 * sh.hidden
    if {"down_proj", "c_proj"} & set(target_names(sh, st)):
        n += 2 * sh.intermediate
    attention = max(mlx_recompute_attention_transients(sh, st, i)
                    for i in _backward_layers(sh, st) or [None])
    # DoRA's recomputed norms are formed and reduced at the re-run's start, a moment of
    # their own: their count, beside everything else in this phase, covers this one up to
    # its size (exaone4 C96 F320 H2/2 D8 all-linear rc dora 4bit r64: +10.8 % with both)
    return int(max(0.0, N * s * max(0.0, n - attention) - mlx_recompute_dora_norms(sh, st)))


def mlx_output_gate_split_per_token(sh: Shape, st: Settings, layer: int) -> int:
    """MLX, elements per token: an output-gated attention layer's (Qwen3.5, Qwen3-Next) q_proj
    makes q and the gate together, per head D query dims then D gate dims
    (models/decoder.attention_block), and the two are strided slices of that (N, 2*Hq*D)
    output. MLX's vjp of a slice is the whole input width with the slice's cotangent written
    into zeros, so the backward forms two (N, 2*Hq*D) cotangents and their sum, q_proj's
    output gradient (6 Hq*D), beside the gate's own cotangent through sigmoid (Hq*D): 7 Hq*D.
    Measured alone (mx.grad of x @ W split so, against two projections of the same widths,
    N 512, Hq*D 1024): 10.1-11.1 against 3.3-4.3 (N, Hq*D) arrays at the peak, 6.9-7.9 more;
    in a re-run layer (seed-4 qwen3_5_moe_text C32 H16/4 D64 as three dense full-attention
    layers, all-linear rc, against a qwen3 of that shape): 7.0 Hq*D per token beyond the
    count at D 64, 6.6 at D 32. Formed where a gradient reaches q_proj's output: q_proj
    adapted in the layer, or an adapted layer below it. 0 on a Gated DeltaNet layer."""
    if not sh.attention_output_gate or (sh.linear_attention
                                        and layer in sh.linear_attention["layers"]):
        return 0
    layers = _backward_layers(sh, st)
    if layer not in layers:
        return 0
    if layer == layers.start and not (layer in _adapted_layers(sh, st)
                                       and "q_proj" in _layer_targets(sh, st, layer)):
        return 0
    return 7 * attention_widths(sh, layer)[0]


# (N, Hq*D) arrays of the re-run count's 12 Hq*D + 6 Hk*D that are dk's: with grouped heads
# MLX's unfused attention forms dk at the query heads' width (dS^T q) before the group sum,
# and its RoPE vjp (two products and their sum). Where the re-run layer forms no dk (a
# hybrid's lone adapted attention layer, q,v,o_proj), these are what it does not form.
MLX_RERUN_DK_QUERY_WIDE = 3

# (N, Hq*D) arrays the dispatcher has allocated ahead in that same lone re-run layer at
# the worst phase of its task boundaries: the CPU encoder's count of dispatches per
# scheduler task runs on across steps, so where a step's boundaries fall shifts from step
# to step and a run meets both phases (seed-4 qwen3_next C32 H8/2 D64 q,v,o_proj rc, 12
# steps of one run: 4.385 MiB on some, 4.635 on others, 0.250 MiB = 2 x 64 tokens x 512
# x 4 B; in the sweep's process its measured step fell on the high phase)
MLX_RERUN_QUERY_WIDE_AHEAD = 2


def mlx_rerun_output_gate_split(sh: Shape, st: Settings) -> int:
    """MLX with recompute, the re-run phase: a re-run output-gated attention layer's q/gate
    split (mlx_output_gate_split_per_token), the widest re-run layer's. It belongs to the
    attention's moment of the layer's backward, which follows the MLP's; the phase sums
    the two moments' transients (mlx_recompute_transients' 2F + 2C and MLP terms beside
    its 12 Hq*D + 6 Hk*D, and mlx_recompute_mlp_output), so the split raises the peak
    only by what it exceeds the MLP's share: seed-4 qwen3_next C64 F160 H2/2 D64
    all-linear rc (Hq*D = 2C) read +0.2 % without it and +9.3 % with all of it, seed-2
    qwen3_5_moe_text C32 H8/4 D16 rc +4.0 % and +12.6 %; where Hq*D is 16-32 C the split
    is nearly all of it (seed-4 qwen3_5_moe_text C32 H16/4 D64 all-linear rc -14.4 %).
    Where the layer forms no dk, the count's query-wide dk arrays (MLX_RERUN_DK_QUERY_WIDE)
    are not formed and the split takes their place first, less the two query-wide arrays
    the dispatcher holds ahead there at its worst phase (MLX_RERUN_QUERY_WIDE_AHEAD):
    7 - 3 + 2 Hq*D of it adds (seed-4 qwen3_next C32 H8/2 D64 q,v,o_proj rc, Hq*D = 16C:
    -14.3 % with none of it, -5.1 % against the high phase with 7 - 3, +0.3 % so; the
    seed-0 qwen3_next cases that read +11.2 % and +14.9 % with the whole split, +9.0 % and
    +8.0 % against their highest step). The split is the
    attention layer's own: it adds to that layer's transients, not to a wider re-run
    layer's (a hybrid's DeltaNet layer, whose delta-rule cotangents may be the widest).
    DoRA's recomputed norms are a moment of their own at the re-run's start: their count
    covers this one up to its size (as in mlx_rerun_post_norm_moment; seed-1 qwen3_next
    C64 H8/2 D64 all-linear rc dora +13.8 % -> +6.2 %). Not the loss phase's (its overlap
    with the top layer's re-run is counted apart)."""
    if st.backend != "mlx" or not st.grad_checkpoint:
        return 0
    split = {}
    for i in _backward_layers(sh, st):
        n = mlx_output_gate_split_per_token(sh, st, i)
        if n and not _rerun_forms_dk(sh, st, i):
            n -= (MLX_RERUN_DK_QUERY_WIDE - MLX_RERUN_QUERY_WIDE_AHEAD) \
                * attention_widths(sh, i)[0]
        if n > 0:
            split[i] = n
    if not split:
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    attention = max(max(mlx_recompute_attention_transients(sh, st, i)
                        for i in _backward_layers(sh, st) or [None]),
                    mlx_rerun_attention_input_side(sh))
    mlp_side = (mlx_recompute_transients(sh, st) + mlx_recompute_mlp_output(sh, st)) / (N * s) \
        - attention
    own = max(max(mlx_recompute_attention_transients(sh, st, i),
                  mlx_rerun_attention_input_side(sh)) + max(0.0, n - mlp_side)
              for i, n in split.items())
    return int(max(0.0, N * s * max(0.0, own - attention) - mlx_recompute_dora_norms(sh, st)))


def _rerun_forms_dk(sh: Shape, st: Settings, layer: int) -> bool:
    """Whether a re-run attention layer's backward forms dk: the gradient runs on to the
    layer's input (an adapted layer below), or its k_proj is adapted. Where it does not
    (a hybrid's lone adapted attention layer, q,v,o_proj), the re-run count's 12 Hq*D +
    6 Hk*D, measured on a layer that forms all three, holds the dk it never forms, and that
    covers part of the output gate's split (MLX_RERUN_DK_QUERY_WIDE): seed-0 qwen3_next
    C32 H4/1 D64 and C128 H8/2 D64 q,v,o_proj rc read -2.2 % and +3.5 % without the split,
    +11.2 % and +14.9 % with all of it; where it does, the split adds (seed-4
    qwen3_5_moe_text C32 H16/4 D64 all-linear rc -13.8 -> +7.2 %)."""
    layers = _backward_layers(sh, st)
    return layer > layers.start or (layer in _adapted_layers(sh, st)
                                    and "k_proj" in _layer_targets(sh, st, layer))


def mlx_moe_backward_per_token(sh: Shape, st: Settings) -> int:
    """MLX, a sparse top layer's backward beside the count above (dense-calibrated, with
    F = k*F'): the cotangent of the k expert outputs times their weights (k*C), the
    gradient of gate_up's broadcast input rows before their sum over the k choices (k*C)
    and that sum (C); an adapter on gate_up adds its sorted rows' gradient (k*C) and its
    scatter back to token order (C), one on down_proj the outputs' cotangent in expert
    order for its B (k*C). Measured one-off (not per layer) shortfalls before:
    ~800-1000 elements per token on 1- and 3-layer mixtral all-linear and gpt-oss k=2.
    A shared expert is a dense MLP of width S beside the routed ones: its backward forms
    what the dense count's 8F does for F (qwen3_5_moe C64 S 64 -> 128: 12 S per token
    measured beyond the saved sets' 3S + C + 1 a layer, on 3 layers)."""
    if not sh.moe or sh.layers - 1 not in sh.moe["layers"]:
        return 0
    k, C = sh.moe["top_k"], sh.hidden
    n = 2 * k * C + C + 8 * sh.moe.get("shared_size", 0)
    names = moe_target_names(sh, st)
    if "gate_up_proj" in names:
        n += k * C + C
    if "down_proj" in names:  # the output's cotangent scattered into expert order for B
        n += k * C
    return n


def loss_phase_transients(sh: Shape, st: Settings) -> int:
    """MLX, at the loss: backward_transients plus what the top layer's backward holds
    beyond its C-based count (measured where Hq*D = C, no fused projection), at the
    widest of three moments that follow one another: the MLP's fused gate_up split
    (mlx_fused_split_cotangents), the attention's query-wide gradients
    (mlx_query_gradients), then the fused qkv split, which starts when dq, dk, dv are
    formed and their intermediates freed. The first two were measured one at a time on
    top of the same count (glm4's split, llama's heads). The recompute phase keeps
    backward_transients as it is."""
    if st.backend != "mlx":
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    return backward_transients(sh, st) + N * s * max(
        mlx_fused_split_cotangents(sh, st, ("gate_up_proj",)), mlx_query_gradients(sh, st),
        mlx_fused_split_cotangents(sh, st, ("qkv_proj",)))


def mlx_attention_output_gate_split(sh: Shape, st: Settings) -> int:
    """MLX without recompute, the top layer's attention backward: an output gate's q/gate
    split (mlx_output_gate_split_per_token) forms there, after the loss chunks are freed
    (its cotangents come from dO, which waits for dL/dh), so it counts in that phase, not
    the loss's. Where the gradient runs on to the layer's input (an adapted layer below)
    the three query-wide gradients, counted at 5 arrays each where about 2.5 were
    measured at Hq*D >= 8C (docs/memory.md), cover it: only what it exceeds them by."""
    if st.backend != "mlx" or st.grad_checkpoint:
        return 0
    top = sh.layers - 1
    gate = mlx_output_gate_split_per_token(sh, st, top)
    if _backward_layers(sh, st).start < top:
        gate = max(0, gate - mlx_query_gradients(sh, st))
    return st.batch_size * st.seq_len * DTYPE_BYTES[st.dtype] * gate


def _top_layer_differentiates(sh: Shape, st: Settings, names) -> bool:
    """Whether the top layer's backward forms the gradient of the outputs of `names`
    (projection names): one of them is adapted there, or a layer below holds an adapter
    (the gradient then runs through the whole layer to its input)."""
    top = sh.layers - 1
    if _backward_layers(sh, st).start < top:
        return True
    adapted = _layer_targets(sh, st, top) if top in _adapted_layers(sh, st) else []
    return any(m in adapted for m in names)


# MLX's attention vjp (its unfused fallback while tracing) forms each of dq, dk and dv at the
# query width: with grouped kv heads, k and v are broadcast over the group and their
# gradients are formed per query head, then summed. Each such gradient passes through
# (N, Hq*D) arrays at once: dS @ k (or dS^T @ q, P^T @ dO), its scale, its copy back to
# (B, T, H*D), RoPE's vjp. The 6C of backward_transients was measured where Hq*D = C; beyond
# that, about 5 (N, Hq*D) arrays per gradient formed (llama C128 F256, 2 x 64 tokens, Hq*D
# 256-512, MHA and GQA, 1-2 layers: 3.8 to 5.9 per gradient per element of Hq*D - C).
MLX_ATTENTION_GRADIENT_COPIES = 5
# Of those, with grouped kv heads, how many are at the kv width instead: dk and dv are
# summed over each group of query heads, and what follows the sum is kv-wide. Measured as
# GQA minus its MHA twin (llama, q,v_proj, no recompute), in arrays of (Hq*D - Hk*D) per
# token: C64 F160 L2 D64, H4/1, H8/2, H16/4 (dq, dk, dv formed): 5.5, 4.5, 4.9 for dk and
# dv together; C128 F256 L2 D32, H8/2, H16/4: 3.2-4.2, 3.9; C128 L1 H8/2 (dq and dv only):
# 0.7. dv = P^T @ dO sums at once; dk = dS^T @ q holds more query-wide arrays before its
# sum. Counted below the lowest measured: dk 2.5, dv 0.5 (the MHA twins read -0.5 % to
# +6.2 %; GQA +6.9 % to +21.5 % with none). Only beyond C: the C-wide arrays are the
# 6C backward_transients counts.
MLX_KV_GRADIENT_NARROWED = {"k": 2.5, "v": 0.5}


def mlx_query_gradients(sh: Shape, st: Settings) -> int:
    """Elements per token: many query heads on a narrow model (Hq*D > C) make the top
    layer's attention backward, not its MLP's, the widest point of MLX's backward:
    5 * (Hq*D - C) per gradient it forms of q, k and v (0 where Hq*D <= C), dk and dv
    less their arrays past the group sum (MLX_KV_GRADIENT_NARROWED). All three
    when a layer below holds an adapter (the gradient runs on to the layer's input); else
    those of the adapted ones (o_proj,down_proj on one layer forms none: measured +50 %
    with them counted)."""
    top = sh.layers - 1
    if sh.linear_attention and top in sh.linear_attention["layers"]:
        return 0
    if _backward_layers(sh, st).start < top:
        formed = "qkv"
    else:
        adapted = _layer_targets(sh, st, top) if top in _adapted_layers(sh, st) else []
        formed = "qkv" if "qkv_proj" in adapted else \
            "".join(x for x in "qkv" if f"{x}_proj" in adapted)
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    wide = MLX_ATTENTION_GRADIENT_COPIES * max(0, q - sh.hidden)
    # narrowed to the kv width, or to C where the C-based count covers the rest
    # (not with an output gate, not measured there: seed-2 qwen3_5_text C32 H16/4 D64
    # all-linear -7.7 % -> -11.1 % with it, seed-1 qwen3_next C96 H16/4 D64 -1.2 % -> -4.3 %)
    narrowed = 0 if sh.attention_output_gate else max(0, q - max(kv, sh.hidden))
    return int(sum(wide - MLX_KV_GRADIENT_NARROWED.get(x, 0) * narrowed for x in formed))


def mlx_fused_split_cotangents(sh: Shape, st: Settings, names=tuple(FUSED_PARTS)) -> int:
    """Elements per token: a fused projection's output is split (phi3's qkv_proj into q, k,
    v; gate_up_proj into gate, up), and MLX's vjp of each slice is the whole fused width
    with the part's cotangent written in (slice_update of zeros); the parts' full-width
    cotangents are alive together before they are summed: parts * width, in the top
    layer's backward (measured: glm4 C96, gate_up fused minus unfused, 1-2 layers,
    F 224 and 448: 4.3-5.0 F per token; counted 2 * 2F)."""
    return sum(len(FUSED_PARTS[name]) * sh.linears[name][1] for name in names
               if name in sh.linears and _top_layer_differentiates(sh, st, (name,)))


def recompute_dora_norm(sh: Shape, st: Settings) -> int:
    """torch with recompute and DoRA: the re-run of a layer in the backward recomputes its
    detached row norms too, one module at a time, while every adapter gradient and dL/dh
    exist; of the layer only its input and normed input (and dL/dh: 3C per token) are
    alive at its first projection. The profiler's timeline put the peak of a hybrid
    16-head model there (-8 % before this phase). A projection past the attention's
    inputs (o_proj, the MLP's) is re-run with the layer's saved set formed before it
    alive: counted as the whole set and dL/dh (a Gemma 2 step peaked at down_proj's norm
    with the re-run MLP alive, -9.7 % before); o_proj's norm forms before the MLP runs,
    so the MLP's share of the set is not counted there (seed-5 mistral C96 F168 q,k,v,o rc
    dora 4bit: +13.5 % with it, the step peaking at the re-run's MLP backward)."""
    if st.backend != "torch" or not (st.grad_checkpoint and st.dora):
        return 0
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    first = N * s * 3 * sh.hidden
    inputs = ("q_proj", "k_proj", "v_proj", "qkv_proj")

    def later(m):  # the largest saved set of a layer that holds m (a hybrid's o_proj: only
        # its attention layers, not the wider DeltaNet ones), as formed when m runs
        return N * s * (max((saved_per_token_per_layer(sh, st, True, i)
                             - (0 if m in MLP_NAMES else mlp_saved_per_token(sh, st, True, i))
                             for i in _adapted_layers(sh, st) if m in _layer_targets(sh, st, i)),
                            default=0) + sh.hidden)
    return max((first if m in inputs else later(m)) + dora_norm_temporaries(sh, st, [m])
               for m in target_names(sh, st))


def mlx_recompute_dora_norms(sh: Shape, st: Settings) -> int:
    """MLX with recompute and DoRA: the re-run recomputes each adapted module's detached
    row norm ||W + s B A|| from the layer's A and B, which the re-run receives together
    (backends/mlx/recompute: every leaf waits on the same cotangent), so all of a layer's
    norms are ready at once and MLX's breadth-first tape forms them level by level: every
    module's B @ A (out, in) float32 alive together, beside the re-run set (the sum W + s
    B A follows each one's product in one fused kernel), plus W cast or dequantized to
    float32 where it is not float32 already. Measured on a llama C128 F1024, 16 tokens,
    DoRA on minus off: all-linear 1.34 MiB beyond the counted outputs (1.56 counted
    here), gate_proj alone 0.46 (0.50), 1 and 2 layers alike (-23.8 % and -16.9 %
    before). The largest layer's sum.

    Not beside all of the re-run's backward: the step peaks at the larger of two moments,
    the products' and the rest of the backward, and a GeGLU layer's kept tanh-GELU
    arrays (mlx_gelu_tanh_kept, counted in the transients) are not alive at the
    products' (measured by replacing the norms with a constant: seed-0 gemma2 C64 F200 L2
    all-linear rc pack dora, 32 tokens, the peak fell 16 KiB of 182 counted; F 400, 77 of
    332; the llama C128 F1024 above, 1.41 MiB of 1.56). Counted beyond that share only."""
    if st.backend != "mlx" or not (st.grad_checkpoint and st.dora):
        return 0
    copies = 1 if st.dtype == "float32" and not st.quantize_bits else 2
    per_layer = [sum(i * o for m in _layer_targets(sh, st, ly)
                     for i, o in [(sh.layer_linears[ly] if sh.layer_linears
                                   else sh.linears)[m]])
                 for ly in _backward_layers(sh, st) if ly in _adapted_layers(sh, st)]
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    return max(0, copies * 4 * max(per_layer, default=0) - N * s * mlx_gelu_tanh_kept(sh, st))


def _rerun_dora_casts(sh: Shape, st: Settings) -> list:
    """Per re-run adapted layer, the elements of its adapted modules' W that the row norms
    read as a float32 copy: every one on a non-float32 base (cast), else the quantized
    ones (input a multiple of the group: narrower projections stay dense)."""
    cast = st.dtype != "float32"
    return [sum(i * o for m in _layer_targets(sh, st, ly)
                for i, o in [(sh.layer_linears[ly] if sh.layer_linears else sh.linears)[m]]
                if cast or (st.quantize_bits and i % QUANT_GROUP == 0))
            for ly in _backward_layers(sh, st) if ly in _adapted_layers(sh, st)]


def mlx_dora_weight_casts(sh: Shape, st: Settings, phase: str = "loss") -> int:
    """MLX with recompute and DoRA on a quantized or non-float32 base: each adapted module's
    row norm reads W dequantized (or cast) to float32, and the forward's and the re-run's
    are the same op on the same frozen arrays (closed over, not waiting on the gradient),
    so mx.compile merges them: every re-run layer's float32 copies are kept from its
    forward to its re-run, across the loss. Measured on seed-2 llama C128 F248 L2 H4/1
    all-linear r4 rc pack dora 4bit (64 tokens): 5.13 / 5.16 MiB compiled, 4.11 / 4.33
    uncompiled (0.64 MiB counted: 2 layers, down_proj's 248-wide input stays dense);
    -8.7 % at the loss without it. The re-run phase counts every layer's but the one its
    DoRA norms count already (mlx_recompute_dora_norms)."""
    if st.backend != "mlx" or not (st.grad_checkpoint and st.dora) or (
            st.dtype == "float32" and not st.quantize_bits):
        return 0
    layers = _rerun_dora_casts(sh, st)
    kept = sum(layers) - (max(layers, default=0) if phase == "recompute" else 0)
    return 4 * kept


def mlx_dora_weight_casts_rerun(sh: Shape, st: Settings) -> int:
    return mlx_dora_weight_casts(sh, st, "recompute")


def torch_backward_start(sh: Shape, st: Settings) -> int:
    """torch without recompute: the backward's first layer (the top one) runs while every
    saved activation is alive. Its MLP's backward forms dL/d(down_proj's input) (F) and,
    from it, the gradients of the two factors act(gate) and up (2F), beside the gradient
    of the residual stream (C): N * (C + 3F) * s (the profiler's timeline put the peak of a
    DoRA step there, where the loss's float32 chunks, which come first, are small). A
    plain MLP (c_fc, c_proj) has one factor: 2F. An adapter on the down projection kept
    its input (F, counted in the saved set), freed by then: F less."""
    if st.backend != "torch" or st.grad_checkpoint:
        return 0
    N, s, F = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype], mlp_width(sh, sh.layers - 1)
    top = _layer_targets(sh, st, sh.layers - 1) if sh.layers - 1 in _adapted_layers(sh, st) \
        else []
    grads = 2 * F if "c_fc" in sh.linears else 3 * F
    if "down_proj" in top or "c_proj" in top:
        grads -= F
    grads = max(grads - torch_mlp_output_norm_freed(sh, st),  # Gemma: its post-norm first
                torch_output_norm_backward(sh, st))
    return N * s * (sh.hidden + grads)


def dora_norm_temporaries(sh: Shape, st: Settings, names=None) -> int:
    """DoRA's detached row norm ||W + s B A|| forms B @ A and the sum as (out, in) float32
    matrices (plus W cast or dequantized to float32 when it is not float32 already), one
    module at a time in the forward, while the saved activations of the layers below are
    alive: the largest adapted module's 2 (or 3) * out * in * 4 (of `names`: all)."""
    if not st.dora:
        return 0
    copies = 2 if st.dtype == "float32" and not st.quantize_bits else 3
    if st.backend == "torch":  # eager: B @ A stays referenced while s * (B @ A) and the
        copies += 1            # sum form (core/lora.project), one more alive at the add
    dims = [sh.linears[m] for m in (target_names(sh, st) if names is None else names)]
    return copies * 4 * max((i * o for i, o in dims), default=0)


def _torch_dora_forward(sh: Shape, st: Settings) -> tuple:
    """torch without recompute: (activations, transients) at the widest moment of the top
    layer's DoRA projections in the forward (core/lora.project). Each module forms x W^T,
    x A^T and the update (kept: 2 out + r), then its row norm (dora_norm_temporaries),
    then scales both products and adds them: 3 (N, out) more, with B @ A still referenced.
    What the layer keeps after the module is not formed yet: an attention projection's
    norm runs before the MLP, the MLP's first projection before the MLP's rest (the MLP's
    share of the saved set, mlp_saved_per_token, less its own kept outputs); later ones
    (up, down) are counted with the whole set. The profiler's timeline of seed-6 phi3 C128
    F432 L1 all-linear pack dora: the peak at gate_up_proj's sum, the MLP's set unformed
    (+12.6 % counted as the whole set beside the norm). An attention input's (q, k, v)
    norm runs before anything of its layer's attention exists: the saved sets of the
    layers below, the layer's input and normed input, and the projection's own (the
    profiler's timeline of the sweep's seed-4 qwen3_5_text C32 H16/4 q,v,o dora: q_proj's
    norm well under the peak, +15.0 % counted beside the layer's attention set)."""
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    total, top = activations(sh, st), sh.layers - 1
    kept, adapted_layers = _backward_layers(sh, st), _adapted_layers(sh, st)

    def below(m):  # the saved sets under the highest layer holding m, and its inputs
        i = max(j for j in adapted_layers if m in _layer_targets(sh, st, j))
        return sum(int(N * s * (saved_per_token_per_layer(sh, st, j in adapted_layers, j)
                                - torch_attention_unsaved(sh, st, j)))
                   + eager_scores(sh, st, j) for j in kept if j < i) \
            + N * s * (2 * sh.hidden + st.rank + dora_kept_per_token(sh, st, [m]))
    adapted = top in adapted_layers
    mlp = N * s * mlp_saved_per_token(sh, st, adapted, top) if top in kept else 0
    best = (total, 0)
    for m in target_names(sh, st):
        i, o = sh.linears[m]
        if m in ("gate_proj", "gate_up_proj", "c_fc"):
            acts = total - mlp + N * s * (st.rank + dora_kept_per_token(sh, st, [m]))
        elif m in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
            acts = min(below(m), total)
        else:
            acts = total if m in MLP_NAMES else total - mlp
        temps = max(dora_norm_temporaries(sh, st, [m]), N * s * 3 * o + i * o * 4)
        if acts + temps > sum(best):
            best = (acts, temps)
    return best


def dora_forward_activations(sh: Shape, st: Settings) -> int:
    """The "dora norm" phase's activations: torch, as formed at its widest DoRA moment
    (_torch_dora_forward); MLX all saved sets."""
    if st.backend == "torch" and st.dora and not st.grad_checkpoint:
        return _torch_dora_forward(sh, st)[0]
    return activations(sh, st)


def dora_forward_temporaries(sh: Shape, st: Settings) -> int:
    """The "dora norm" phase's transients: torch at its widest DoRA moment (the norm's
    matrices or the scaled products' sum); MLX the norm's (dora_norm_temporaries)."""
    if st.backend == "torch" and st.dora and not st.grad_checkpoint:
        return _torch_dora_forward(sh, st)[1]
    return dora_norm_temporaries(sh, st)


def embeddings_and_rope(sh: Shape, st: Settings) -> int:
    """The embedding output and final norm (2 * N * C) and the shared RoPE cos/sin tables
    (2 * N * D), in the compute dtype; MLX also keeps the float32 angle table. Gemma 4's
    per-layer inputs add 4 * N * L * P (table rows, projection, its norm, their sum)."""
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    extra = N * sh.head_dim * 4 if st.backend == "mlx" else 0
    # Gemma 4's per-layer inputs: the table rows, the projection, its norm and their sum
    extra += 4 * N * sh.per_layer_inputs * s
    return N * s * (2 * sh.hidden + 2 * sh.head_dim) + extra


def loss_buffers(sh: Shape, st: Settings) -> int:
    """Fused head + loss: float32 logits and their exp for one chunk of rows
    (2 * rows * V * 4, rows = min(N, E // V), E per backend: core/loss.py; one buffer on
    torch's float32 CPU path, whose softmax writes over the logits) and dL/dh
    for all tokens (N * C * s),
    formed in the same pass. MLX evaluates all chunks in one graph, chained one after
    another (backends/mlx linear_cross_entropy); about two chunks' buffers overlap there
    (measured: bench_train's 4 x 512 tokens, vocab 32000), so rows = two chunks.
    Soft-capped logits keep the slope 1 - (c / cap)^2 too: two more chunk buffers on MLX
    (tanh and slope live in the same graph); none on torch, which caps the logits and forms
    the slope in place (measured: two (rows, V) buffers at a Gemma 2 step's peak)."""
    N, s = st.batch_size * st.seq_len, DTYPE_BYTES[st.dtype]
    chunk = max(16, logit_chunk_elements(st.backend) // sh.vocab)
    rows = min(N, 2 * chunk if st.backend == "mlx" else chunk)
    # torch on the CPU writes every chunk's logits into one buffer and takes the softmax
    # there (backends/torch _LinearCrossEntropy); CUDA keeps logits and probabilities apart
    buffers = 1 if st.key == "torch-cpu" and st.dtype == "float32" else 2
    buffers += sh.final_softcap and st.backend == "mlx" and 2  # + tanh' slope
    chunk_bytes = buffers * rows * sh.vocab * 4
    if st.backend == "torch":  # later in a chunk: the probabilities (logp, exp'd in place),
        # the picked rows of W and probs @ W, (rows, C) each; larger on a vocabulary under
        # 2C (fresh seed-23 qwen3_moe C64 V69: -5.0 % without). Soft-capped logits stay
        # for the slope: beside the probabilities while the picked rows and their slope-
        # scaled copy form (seed-7 gemma2 C64 V243: all four alive at the peak)
        later = (2 if sh.final_softcap else 1) * sh.vocab * 4 + 2 * sh.hidden * s
        chunk_bytes = max(chunk_bytes, rows * later)
    return chunk_bytes + N * sh.hidden * s


def loss_gradient(sh: Shape, st: Settings) -> int:
    """dL/dh of every token, N * C * s: what the fused loss leaves for the backward once its
    chunks' float32 logits are freed."""
    return st.batch_size * st.seq_len * sh.hidden * DTYPE_BYTES[st.dtype]


def framework_overhead(sh: Shape, st: Settings, subtotal: int) -> int:
    """Fixed runtime overhead (CUDA context, Metal) plus allocator rounding as a fraction
    of the tensors; zero on the CPU backends, whose measures count tensors only."""
    return int(FRAMEWORK_OVERHEAD.get(st.key, 0) + ALLOCATOR_SLACK.get(st.key, 0) * subtotal)


STATIC_TERMS = (("base weights", base_weights), ("adapter weights", adapter_weights),
                ("adapter gradients", adapter_gradients), ("optimizer state", optimizer_state),
                ("activations", activations), ("embeddings and rope", embeddings_and_rope))
# The step peaks either at the loss (end of the forward) or, with recompute, while the
# top layer is re-run in the backward; each phase adds its own transient terms.
PHASES = {
    "loss": (("logits and loss", loss_buffers),
             ("backward transients", loss_phase_transients),
             ("dequantization temporaries", dequantization_temporaries)),
    "recompute": (("recomputed layer", recompute_layer),
                  ("attention scores", attention_scores),
                  ("adapter gradients", rerun_gradients),
                  ("embeddings and rope", embeddings_in_backward)),
    # DoRA's norm temporaries in the top layer's forward, every saved activation alive
    "dora norm": (("activations", dora_forward_activations),
                  ("dora norm temporaries", dora_forward_temporaries)),
    "recompute, dora norm": (("recomputed dora norm", recompute_dora_norm),
                             ("adapter gradients", recompute_gradients),
                             ("embeddings and rope", embeddings_in_backward)),
    # torch: the top layer's backward, every saved activation alive
    "backward start": (("backward transients", torch_backward_start),),
    # torch, query blocks: the top layer's attention backward, every saved set alive
    "attention backward": (("query block gradient", torch_top_block_gradient),),
    # torch: the top sparse MoE layer's expert down projection, every layer saved
    "sparse MoE forward": (("MoE down-projection transients", torch_moe_forward),
                           ("embeddings and rope", embeddings_before_head)),
    # torch: a layer's attention forward, the layers below it saved (many query heads)
    "attention forward": (("activations", activations_at_attention),
                          ("embeddings and rope", embeddings_before_head)),
}
# MLX: a Gated DeltaNet layer's forward (its delta rule's float32 arrays at once)
PHASES["DeltaNet forward"] = (("activations", nothing),
                              ("DeltaNet forward", mlx_deltanet_forward),
                              ("DeltaNet forward (torch)", torch_deltanet_forward))
# MLX without recompute: a Gated DeltaNet layer's backward, the layers above it done
PHASES["DeltaNet backward"] = (("activations", nothing),
                               ("DeltaNet backward", mlx_deltanet_backward))
# MLX without recompute: the top layer's attention backward forms its float32 scores from
# dO, which waits for dL/dh, the concatenation of every loss chunk's block: the chunks'
# logits are freed by then, dL/dh is not (a phase apart from the loss, docs/memory.md)
MLX_ATTENTION_BACKWARD = (("loss gradient (dL/dh)", loss_gradient),
                          ("attention scores", attention_scores),
                          ("backward transients", loss_phase_transients),
                          ("output-gate split", mlx_attention_output_gate_split),
                          ("DoRA output cotangents", mlx_dora_attention_cotangents))
# The optimizer step: the backward has freed the activations, the gradients exist
# (a phase's term replaces the static term of the same name)
OPTIMIZER_STEP = (("activations", nothing), ("embeddings and rope", nothing),
                        ("adapter gradients", all_adapter_gradients),
                        ("optimizer temporaries", optimizer_temporaries))
# MLX with recompute (backends/mlx/recompute): the backward re-runs one layer at a time,
# each after the layer above has formed all its gradients. Two phases: one re-run layer
# with its backward, and the loss. The top layer's re-run waits for dL/dh, yet the
# measured peak at the loss grows with the layer's widths: MLX's dispatcher allocates the
# outputs of the ops after the logits (the re-run's forward among them) while the worker
# still runs the head (mlx_loss_in_flight; docs/memory.md, "MLX's dispatcher runs ahead").
MLX_RECOMPUTE = (("recomputed layer", recompute_layer), ("attention scores", attention_scores),
                 ("backward transients", mlx_recompute_transients),
                 ("re-run MLP output", mlx_recompute_mlp_output),
                 ("re-run gate_up split", mlx_rerun_fused_gate_up),
                 ("re-run post-norm moment", mlx_rerun_post_norm_moment),
                 ("re-run output-gate split", mlx_rerun_output_gate_split),
                 ("recomputed dora norms", mlx_recompute_dora_norms),
                 ("DoRA weights cast in the forward", mlx_dora_weight_casts_rerun),
                 ("adapter as loaded", mlx_loaded_adapter))
# At the loss no adapter gradient exists: the previous step's were locals of its train_step
# (freed once its update was evaluated), and this step's form in the backward, whose re-run
# waits for dL/dh (measured: seed-5 mixtral C64 L3 q,k,v,o rc dora, rank 4 -> 64, the peak
# rose by 4.07 adapter copies: weights, AdamW's two moments, the adapter as loaded; +16.9 %
# with the gradients counted as a fifth)
MLX_RECOMPUTE_LOSS = (("adapter gradients", nothing),
                      ("logits and loss", loss_buffers),
                      ("dispatched ahead of the loss", mlx_loss_in_flight),
                      ("DoRA weights cast in the forward", mlx_dora_weight_casts),
                      ("adapter as loaded", mlx_loaded_adapter))


# Backends pad a batch's columns to a multiple of this many tokens (backends.mlx's
# pad_multiple: compiled graphs are reused across batch lengths); the padded tokens cost
# memory like any other.
PAD_MULTIPLE = {"mlx": 32}


def padded(st: Settings) -> Settings:
    """The settings with seq_len rounded up to what the backend actually runs."""
    m = PAD_MULTIPLE.get(st.backend, 1)
    return st.replace(seq_len=-(-st.seq_len // m) * m) if st.seq_len % m else st


# Several processes (docs/distributed.md). Data parallel replicates every term on each
# device; the all-reduce adds one flat float32 copy of the adapter gradients in the step's
# update. `--shard` (torch, backends/torch/sharded.py) divides the terms below by the process
# count: each device keeps 1/N of AdamW's moments and updates 1/N; it adds FSDP2's 1/N of
# the adapter (its master shard) and, in the update, the all-gathered whole adapter. The
# frozen base's layers are cut too (backends/torch/sharded_base.py): 1/N of them per device,
# from the load on (models/loader.py reads each device's slices straight from the files),
# plus the one layer gathered whole while it runs (forward and backward, not the update);
# the layers then run recomputed, as with --grad-checkpoint. Not divided: the base outside
# the layers (embeddings, head, final norm), the adapter the forward reads, the all-reduced
# gradients, and activations, logits and attention scores (per device by nature).
SHARDED = ("optimizer state", "optimizer temporaries")


def base_outside_layers(sh: Shape, st: Settings) -> int:
    """The frozen bytes outside the decoder layers (whole on every device with --shard):
    embeddings, head unless tied, final norm, what else the model keeps there."""
    n = sh.outside_layers if sh.outside_layers is not None else \
        sh.vocab * sh.hidden * (1 if sh.tied else 2) + \
        (sh.hidden if sh.final_norm is None else sh.final_norm)
    return n * DTYPE_BYTES[st.dtype]


def sharded_base(sh: Shape, st: Settings) -> int:
    """--shard: this device's base, the part outside the layers whole and 1/N of the
    layers (rounded up: each layer's slices are padded to N equal parts)."""
    outside = base_outside_layers(sh, st)
    return outside + -(-(base_weights(sh, st) - outside) // st.nproc)


def gathered_layer(sh: Shape, st: Settings) -> int:
    """--shard: the one layer's frozen weights all-gathered whole while it runs."""
    if not (st.shard and st.nproc > 1):
        return 0
    if sh.largest_layer is not None:
        return sh.largest_layer * DTYPE_BYTES[st.dtype]
    return (base_weights(sh, st) - base_outside_layers(sh, st)) // sh.layers


def allreduce_buffer(sh: Shape, st: Settings) -> int:
    """Data parallel: the flat float32 gradient buffer the all-reduce sums (n_adapter * 4),
    beside the step's gradients (with --shard too: the sum is whole on every device)."""
    return all_adapter_gradients(sh, st) if st.nproc > 1 else 0


def adapter_shard(sh: Shape, st: Settings) -> int:
    """--shard: FSDP2's master shard of the adapter, n_adapter * 4 / N."""
    return adapter_weights(sh, st) // st.nproc if st.shard and st.nproc > 1 else 0


def gathered_adapter(sh: Shape, st: Settings) -> int:
    """--shard, the update: FSDP2's all-gather of the new adapter, whole (n_adapter * 4)."""
    return adapter_weights(sh, st) if st.shard and st.nproc > 1 else 0


def split(sh: Shape, settings: Settings) -> dict | None:
    """What a multi-process estimate divides by the process count and what it does not."""
    if settings.nproc <= 1:
        return None
    n = settings.nproc
    if not settings.shard:
        return {"nproc": n, "shard": False, "divided": [],
                "note": f"data parallel: every one of the {n} devices holds all of it "
                        "(base, adapter, gradients, optimizer state, its own activations) "
                        "plus one gradient buffer for the all-reduce"}
    whole, outside = base_weights(sh, settings), base_outside_layers(sh, settings)
    return {"nproc": n, "shard": True,
            "divided": ["base weights (layers)", *SHARDED],
            "base": {"whole": whole, "outside layers": outside,
                     "per device": sharded_base(sh, settings),
                     "gathered layer": gathered_layer(sh, settings)},
            "note": f"--shard: the base's layers ({fmt_bytes(whole - outside)}; each device "
                    "reads only its slice of them while loading), "
                    f"{' and '.join(SHARDED)} divided by {n}, plus one layer gathered whole "
                    f"while it runs ({fmt_bytes(gathered_layer(sh, settings))}) and 1/{n} of "
                    "the adapter as FSDP2's shard; the layers run recomputed (as with "
                    "--grad-checkpoint); not divided: the base outside the layers "
                    f"({fmt_bytes(outside)}: embeddings, head, final norm), the adapter "
                    "weights (gathered whole for each step), the all-reduced gradients, and "
                    "activations, logits and attention scores (per device)"}


def estimate(sh: Shape, settings: Settings) -> dict:
    """{'total', 'breakdown': {term: bytes}, 'phase', 'backend', 'device', 'settings'}.
    The breakdown holds the static terms and those of the phase where the step peaks."""
    if settings.layers is not None and any(not 0 <= i < sh.layers for i in settings.layers):
        raise LorafitError(f"layer selection {settings.layers} is outside 0..{sh.layers - 1}")
    asked, settings = settings, padded(settings)
    if settings.shard and settings.nproc > 1:  # a sharded base runs its layers recomputed
        settings = settings.replace(grad_checkpoint=True)
    breakdown = {name: int(fn(sh, settings)) for name, fn in STATIC_TERMS}
    phase_terms = dict(PHASES)
    if settings.backend == "mlx" and settings.grad_checkpoint:
        phase_terms["recompute"] = MLX_RECOMPUTE
        phase_terms["loss"] = MLX_RECOMPUTE_LOSS
    elif settings.backend == "mlx":
        phase_terms["attention backward"] = MLX_ATTENTION_BACKWARD
    phase_terms["optimizer step"] = OPTIMIZER_STEP
    phases = {ph: {name: int(fn(sh, settings)) for name, fn in terms}
              for ph, terms in phase_terms.items()}
    if settings.nproc > 1:  # the gradients are reduced between the backward and the update
        phases["optimizer step"]["all-reduce buffer"] = allreduce_buffer(sh, settings)
        if settings.shard:
            breakdown["adapter shard (FSDP2)"] = adapter_shard(sh, settings)
            phases["optimizer step"]["gathered adapter"] = gathered_adapter(sh, settings)
            n = settings.nproc
            breakdown = {k: v // n if k in SHARDED else v for k, v in breakdown.items()}
            breakdown["base weights"] = sharded_base(sh, settings)
            phases = {ph: {k: v // n if k in SHARDED else v for k, v in terms.items()}
                      for ph, terms in phases.items()}
            for ph, terms in phases.items():  # not in the update: the backward is over
                if ph != "optimizer step":
                    terms["gathered layer"] = gathered_layer(sh, settings)
    phase = max(phases, key=lambda ph: sum({**breakdown, **phases[ph]}.values()))
    breakdown.update(phases[phase])
    subtotal = sum(breakdown.values())
    breakdown["framework overhead"] = framework_overhead(sh, settings, subtotal)
    return {"total": sum(breakdown.values()), "breakdown": breakdown, "phase": phase,
            "backend": settings.backend, "device": settings.device,
            "settings": dict(asked.__dict__), "split": split(sh, settings)}


# -- budgets and the inverse question ------------------------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '16 GB', '8g', '1500MiB' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise LorafitError(f"cannot read the budget {text!r}: use e.g. 24GiB, 16GB or 8000MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower() or "b"])


def fmt_bytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


FIT_VARIABLES = {"batch": "batch_size", "seq-len": "seq_len", "rank": "rank"}


def largest_fitting(shape: Shape, settings: Settings, variable: str, budget: int,
                    limit: int = 1 << 20) -> int | None:
    """The largest value of `variable` (batch, seq-len, rank) whose estimate fits the
    budget; None when even 1 does not fit. Estimates grow monotonically, so bisect."""
    field_name = FIT_VARIABLES[variable]

    def fits(v):
        return estimate(shape, settings.replace(**{field_name: v}))["total"] <= budget

    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def suggestions(shape: Shape, settings: Settings, budget: int, limit: int = 6) -> list[str]:
    """What would make a run that does not fit, fit: each a set of flags with its estimated
    total, checked with the estimator. Combinations are searched (gradient checkpointing,
    bf16, 4-bit, --shard when several processes train on torch, then a smaller micro-batch
    with the same effective batch, then a shorter sequence), fewest changes first. A
    single process is never told to shard: that would mean devices it was not given."""
    from itertools import combinations

    def total(st):
        return estimate(shape, st)["total"]

    levers = []  # (flags, changes)
    if not settings.grad_checkpoint:
        levers.append(("--grad-checkpoint", {"grad_checkpoint": True}))
    if settings.dtype == "float32":
        levers.append(("--dtype bf16", {"dtype": "bfloat16"}))
    if not settings.quantize_bits:
        levers.append(("--quantize 4bit", {"quantize_bits": 4}))
    if settings.nproc > 1 and not settings.shard and settings.backend != "mlx" \
            and not settings.quantize_bits:
        levers.append(("--shard", {"shard": True}))  # the base's layers cut N ways
    apart = [{"--shard", "--quantize 4bit"},  # not supported together (SHARD_QUANTIZED)
             {"--shard", "--grad-checkpoint"}]  # a sharded base recomputes anyway
    effective = settings.batch_size * settings.grad_accum
    found = []  # (number of changes, total, text)
    enough = []  # lever sets that fit alone: adding levers to them helps nobody
    for n in range(len(levers) + 1):
        for combo in combinations(levers, n):
            if any(set(e) <= {f for f, _ in combo} for e in enough + apart):
                continue
            changes = {k: v for _, c in combo for k, v in c.items()}
            st = settings.replace(**changes)
            flags = [f for f, _ in combo]
            if n and total(st) <= budget:
                found.append((n, total(st), " ".join(flags)))
                enough.append([f for f, _ in combo])
                continue
            # a smaller micro-batch that divides the effective batch: the same optimisation
            b = largest_fitting(shape, st, "batch", budget)
            b = next((d for d in range(min(b or 0, st.batch_size - 1), 0, -1)
                      if effective % d == 0), None)
            if b:
                accum = effective // b
                tot = total(st.replace(batch_size=b, grad_accum=accum))
                if tot <= budget:
                    found.append((n + 1, tot, " ".join(flags + [
                        f"--batch-size {b} --grad-accum {accum} (same effective batch "
                        f"{effective})"])))
                    continue
            t = largest_fitting(shape, st.replace(batch_size=1), "seq-len", budget)
            if t and t < st.seq_len:
                tot = total(st.replace(batch_size=1, seq_len=t))
                extra = [] if st.batch_size == 1 else [
                    f"--batch-size 1 --grad-accum {effective}"]
                if tot <= budget:
                    found.append((n + 2, tot, " ".join(flags + extra + [f"--seq-len {t}"])))
    r = largest_fitting(shape, settings, "rank", budget)
    if r and r < settings.rank:
        found.append((1, total(settings.replace(rank=r)), f"--rank {r}"))
    out, seen = [], set()
    for _, tot, text in sorted(found, key=lambda f: (f[0], -f[1])):
        if text not in seen:
            seen.add(text)
            out.append(f"{text}: {fmt_bytes(tot)}")
    if not out:
        out.append("nothing short of a smaller model fits: even batch 1 at this sequence "
                   "length needs more")
    return out[:limit]


def settings_from_config(cfg, backend: str | None = None, device: str | None = None) -> Settings:
    """Settings from a TrainConfig (core.config)."""
    return Settings(backend=backend or ("mlx" if cfg.backend == "mlx" else "torch"),
                    device=device or cfg.device or "cpu", dtype=cfg.dtype or "float32",
                    rank=cfg.rank, targets=cfg.targets, layers=cfg.layers,
                    batch_size=cfg.batch_size * rows_per_example(cfg), seq_len=cfg.seq_len,
                    grad_checkpoint=cfg.grad_checkpoint, pack=cfg.pack,
                    grad_accum=cfg.grad_accum, dora=cfg.dora,
                    quantize_bits=QUANTIZE_BITS.get(cfg.quantize), shard=cfg.shard,
                    compile=cfg.compile)


def rows_per_example(cfg) -> int:
    """Rows one batch element puts through the trained forward and backward: a DPO or ORPO
    pair is two (chosen and rejected, core/preference_train.py). The reference forwards
    (DPO, KTO) and KTO's mismatched KL rows run without a graph before the policy's pass,
    so they add time, not peak memory."""
    method = getattr(cfg, "method", "sft")
    if method == "grpo":  # a prompt's group of completions (core/grpo_train.py)
        return cfg.num_generations
    return 2 if method in ("dpo", "orpo") else 1
