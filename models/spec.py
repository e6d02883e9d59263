"""The description of a decoder: its shape and the switches that tell families apart.

One `ModelArgs` drives the one decoder in models/decoder.py. A family (models/families/)
only turns its config.json into these fields; everything a family has in common with
another is a shared switch here, not a copy of the forward code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from lorafit.core.errors import LorafitError
from lorafit.models.rope import inverse_frequencies

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
    partial_rotary_factor: float = 1.0  # RoPE turns only the first part of each head
    norm_unit_offset: bool = False  # RMSNorms scale by (1 + weight) (qwen3_5, qwen3_next)
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
        if self.hidden_act not in ("silu", "swish"):
            raise LorafitError(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
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
            if rope.get("partial_rotary_factor") is not None:
                cfg.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
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

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE turns (all of them unless partial)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def inv_freq(self):
        return inverse_frequencies(self.rotary_dim, self.rope_theta, self.rope_scaling)
