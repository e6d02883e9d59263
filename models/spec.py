"""The description of a decoder: its shape and the switches that tell families apart.

One `ModelArgs` drives the one decoder in models/decoder.py. A family (models/families/)
only turns its config.json into these fields; everything a family has in common with
another is a shared switch here, not a copy of the forward code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property

from lorafit.core.errors import LorafitError
from lorafit.models.rope import Rope, rope

GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # GeGLU's activation (Gemma)
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size")


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
    attention_bias: bool = False  # bias on q, k, v
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k (qwen3)
    hidden_act: str = "silu"
    layer_types: list | None = None  # per layer: "full_attention" or "sliding_attention"
    sliding_window: int | None = None  # keys a sliding layer's query sees (itself included)
    max_position_embeddings: int = 4096
    torch_dtype: str | None = None
    quantization: dict | None = None  # {"bits", "group_size"}: frozen projections quantized
    # sparse mixture of experts (models/blocks/moe.py); 0 experts = a dense MLP everywhere
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None  # expert width (intermediate_size if None)
    moe_layers: list | None = None  # indices of the sparse layers (None: all, with experts)
    router: str = "softmax_topk"  # "softmax_topk" (mixtral, qwen3_moe) or "topk_softmax"
    norm_topk_prob: bool = True  # renormalise the top-k probabilities (softmax_topk)
    # a dense SwiGLU expert of this width beside the routed ones on every sparse layer, its
    # output times sigmoid(mlp.shared_expert_gate(x)) (qwen3_next, qwen3_5_moe); 0: none
    shared_expert_size: int = 0
    # PEFT has no v4 expert names to map for this model type: all-linear adapts its
    # nn.Linear modules only, never the router or the stacked experts (qwen3_5_moe)
    moe_linear_only: bool = False
    # Gemma 4's MoE block: the dense MLP stays, and experts run beside it on the pre-MLP
    # residual (router at `router.proj` with its norm and scales, experts at `experts.`,
    # GeGLU, three more norms); their outputs are summed (models/blocks/moe.py)
    experts_beside_mlp: bool = False
    # gpt-oss experts: router with a bias at mlp.router, (E, in, out) expert weights with
    # biases, gate/up interleaved, and the clamped SwiGLU (up+1) * g*sigmoid(alpha*g)
    gpt_oss_experts: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_sinks: bool = False  # a learned per-head logit self_attn.sinks (gpt-oss)
    partial_rotary_factor: float = 1.0  # rotate only the first head_dim * this dims (phi3)
    fused_qkv: bool = False  # one self_attn.qkv_proj whose output splits into q, k, v (phi3)
    fused_gate_up: bool = False  # one mlp.gate_up_proj whose output splits in two (phi3)
    post_norms: bool = False  # no input norm; norms on the attention and MLP outputs (olmo2)
    qk_norm_whole: bool = False  # RMSNorm over all of q's and k's projection (olmo2)
    # {layer_type: rope_scaling (with its rope_theta) or None} (olmo3, gemma3, gemma4)
    rope_by_layer_type: dict | None = None
    # queries scaled by 1 + beta * ln(1 + floor(position / period)) after RoPE (Llama 4's
    # attention temperature, ministral3): (beta, period), or None
    query_position_scale: tuple | None = None
    embedding_multiplier: float = 1.0  # embeddings times this (granite)
    residual_multiplier: float = 1.0  # each sublayer's output times this before the add
    attention_multiplier: float | None = None  # attention score scale; None: 1/sqrt(head_dim)
    logits_scaling: float = 1.0  # logits divided by this (granite)
    nope_layers: list | None = None  # per layer: True where no RoPE is applied (smollm3)
    layer_norm: bool = False  # LayerNorm with bias instead of RMSNorm (starcoder2)
    plain_mlp: bool = False  # mlp.c_fc -> activation -> mlp.c_proj, no gate (starcoder2)
    rope_interleaved: bool = False  # RoPE rotates pairs (0, 1), (2, 3), ... (glm4)
    # glm4's four norms: post_self_attn_layernorm and post_mlp_layernorm on the attention
    # and MLP outputs, besides input_layernorm and post_attention_layernorm on their inputs
    sandwich_norms: bool = False
    # RMSNorm wholly in float32 times (offset + w), then cast: 1.0 for (1 + w) (Gemma 2/3,
    # qwen3_5, qwen3_next), 0.0 for Gemma 4's plain w; None: Llama's (normalised in
    # float32, cast, times w)
    norm_offset: float | None = None
    # Gemma switches (all off by default: Llama's behaviour)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) rounded to the compute dtype
    # Gemma's four norms: post_attention_layernorm on the attention output (not the MLP
    # input), pre_feedforward_layernorm and post_feedforward_layernorm around the MLP
    feedforward_norms: bool = False
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (not head_dim's)
    # Gemma 4 switches
    layer_head_dim: dict | None = None  # layer type -> its head dim (full layers' global_head_dim)
    layer_kv_heads: dict | None = None  # layer type -> its key-value heads
    v_norm: bool = False  # RMSNorm without weight over each head of v
    k_eq_v: bool = False  # full-attention layers have no v_proj: v is k's projection
    kv_shared_layers: int = 0  # the last n layers reuse the k, v of the last earlier layer of
    #                            their type and have no k/v projections of their own
    double_wide_mlp: bool = False  # those kv-sharing layers have a 2x intermediate size
    per_layer_input_size: int = 0  # per-layer input embeddings (PLE) of this width; 0: none
    per_layer_vocab: int | None = None  # rows of the per-layer embedding table
    layer_scalar: bool = False  # each layer's output times a stored scalar (a buffer)
    attention_output_gate: bool = False  # q_proj also makes a per-head gate: o * sigmoid(g)
    # Gated DeltaNet ("linear_attention" layers, models/blocks/gated_deltanet.py)
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    linear_fused_projections: bool = False  # qwen3_next's in_proj_qkvz and in_proj_ba
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.hidden_act not in ("silu", "swish") + GELU_TANH:
            raise LorafitError(f"hidden_act {self.hidden_act!r} is not supported (silu or "
                               "gelu_pytorch_tanh)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise LorafitError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise LorafitError(f"config.json has {len(self.layer_types)} layer_types for "
                               f"{self.num_hidden_layers} layers")
        if "linear_attention" in self.layer_types and not (
                self.linear_num_key_heads and self.linear_num_value_heads
                and self.linear_key_head_dim and self.linear_value_head_dim):
            raise LorafitError("config.json has linear_attention layers but lacks linear_num_"
                               "key_heads/linear_num_value_heads/linear_key/value_head_dim")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise LorafitError("config.json has sliding_attention layers but no sliding_window")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether a layer's MLP is the sparse mixture of experts."""
        if not self.num_local_experts:
            return False
        return self.moe_layers is None or layer in self.moe_layers

    def window(self, layer: int) -> int | None:
        """The attention window of a layer: None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a config.json dict whose family switches are already set (see
        models.families); unknown keys are kept in `extra`."""
        cfg = dict(cfg)
        rope = cfg.pop("rope_parameters", None)  # transformers >= 5 layout
        if rope and rope.get("partial_rotary_factor") is not None:
            cfg.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if rope:
            cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "torch_dtype" not in cfg and "dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        missing = [n for n in REQUIRED if cfg.get(n) is None]
        if missing:
            raise LorafitError(f"config.json lacks required field(s): {', '.join(missing)}")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in cfg.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in cfg.items() if k not in names})

    def head_dim_of(self, layer: int) -> int:
        return self.head_dim_of_type(self.layer_types[layer])

    def head_dim_of_type(self, layer_type: str) -> int:
        return (self.layer_head_dim or {}).get(layer_type, self.head_dim)

    def kv_heads_of(self, layer: int) -> int:
        return (self.layer_kv_heads or {}).get(self.layer_types[layer], self.num_key_value_heads)

    def has_v_proj(self, layer: int) -> bool:
        return not (self.k_eq_v and self.layer_types[layer] == "full_attention")

    def kv_source(self, layer: int) -> int | None:
        """The earlier layer whose k, v a kv-sharing layer reuses; None for a layer that
        computes its own."""
        first = self.num_hidden_layers - self.kv_shared_layers
        if not self.kv_shared_layers or layer < first:
            return None
        same = [j for j in range(first) if self.layer_types[j] == self.layer_types[layer]]
        if not same:
            raise LorafitError(f"layer {layer} shares the k, v of an earlier "
                               f"{self.layer_types[layer]} layer, but there is none")
        return same[-1]

    def kv_producers(self) -> set:
        return {self.kv_source(i) for i in range(self.num_hidden_layers)} - {None}

    def intermediate_of(self, layer: int) -> int:
        wide = self.double_wide_mlp and self.kv_source(layer) is not None
        return self.intermediate_size * (2 if wide else 1)

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head are rotated."""
        return int(self.head_dim * self.partial_rotary_factor)

    @cached_property
    def ropes(self) -> dict:
        """{layer_type: models.rope.Rope} for the layer types this model has: the model's
        rope_scaling, or each type's own (rope_by_layer_type: theta, scaling, and the type's
        head dim, as Gemma 3/4 and OLMo 3 give them)."""
        out = {}
        for lt in dict.fromkeys(self.layer_types):
            scaling = self.rope_scaling
            if self.rope_by_layer_type is not None:
                scaling = self.rope_by_layer_type.get(lt)
            theta = (scaling or {}).get("rope_theta", self.rope_theta)
            dim = int(self.head_dim_of_type(lt) * self.partial_rotary_factor)
            out[lt] = rope(dim, theta, scaling, self.max_position_embeddings)
        return out

    def rope_of(self, layer: int) -> Rope:
        return self.ropes[self.layer_types[layer]]

    @property
    def cache_reset_length(self) -> int | None:
        """LongRoPE switches frequencies past `original_max_position_embeddings` tokens; a
        generation crossing that length recomputes its cache with the long set, as
        transformers' Phi-3 does. None when nothing switches."""
        switches = [r.long_after for r in self.ropes.values() if r.long_after is not None]
        return min(switches) if switches else None
