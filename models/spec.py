"""The description of a decoder: its shape and the switches that tell families apart.

One `ModelArgs` drives the one decoder in models/decoder.py. A family (models/families/)
only turns its config.json into these fields; everything a family has in common with
another is a shared switch here, not a copy of the forward code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from lorafit.core.errors import LorafitError
from lorafit.models.rope import inverse_frequencies

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
    # Gemma switches (all off by default: Llama's behaviour)
    norm_offset: float | None = None  # RMSNorm in float32 times (offset + w), then cast (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) rounded to the compute dtype
    sandwich_norms: bool = False  # post-attention norm on the attention output, pre/post-MLP norms
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (not head_dim's)
    layer_rope: dict | None = None  # layer type -> {"rope_theta", "rope_type", ...} (Gemma 3)
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
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise LorafitError("config.json has sliding_attention layers but no sliding_window")

    def window(self, layer: int) -> int | None:
        """The attention window of a layer: None for full attention."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a config.json dict whose family switches are already set (see
        models.families); unknown keys are kept in `extra`."""
        cfg = dict(cfg)
        rope = cfg.pop("rope_parameters", None)  # transformers >= 5 layout
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
        return (self.layer_head_dim or {}).get(self.layer_types[layer], self.head_dim)

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
    def inv_freq(self):
        return inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)

    def rope_of(self, layer_type: str):
        """Inverse frequencies of a layer type: its own RoPE parameters where the config gives
        them per layer type (`layer_rope`), else the model's."""
        p = (self.layer_rope or {}).get(layer_type)
        if p is None:
            return self.inv_freq
        scaling = p if p.get("rope_type", "default") != "default" else None
        dim = (self.layer_head_dim or {}).get(layer_type, self.head_dim)
        return inverse_frequencies(dim, float(p.get("rope_theta", self.rope_theta)), scaling)
