"""Models: one decoder (decoder.py) driven by a family description (spec.py, families/),
the loader of Hugging Face folders (loader.py), and the loaded-model record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorafit.models import decoder
from lorafit.models.families import FAMILIES, family, model_args  # noqa: F401 (re-exported)


@dataclass
class Model:
    """A model held on a backend: its description, its parameters (flat dict of HF names)
    and where it came from. Adapter leaves, when attached, live in the same dict."""

    args: Any  # models.spec.ModelArgs
    params: dict
    backend: Any  # the ops object (backends.base.Backend)
    path: str | None = None
    dtype: str = "float32"
    lora: Any = None  # core.lora.LoraConfig once an adapter is attached
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lorafit.models.loader import load_tokenizer
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def parameter_shapes(self) -> dict:
        """Logical shape of every frozen parameter (packed quantized weights included)."""
        return {k: tuple(v) for k, v in decoder.parameter_shapes(self.args).items()}

    def linear_modules(self) -> tuple:
        return decoder.linear_modules(self.args)

    def output_weight(self, params: dict | None = None):
        return decoder.output_weight(self.params if params is None else params)

    def hidden(self, input_ids, positions, params: dict | None = None, **kw):
        """Final hidden states (B, T, C); params default to the model's own."""
        return decoder.hidden_states(self.backend, self.args,
                                     self.params if params is None else params, input_ids,
                                     positions, lora=self.lora, **kw)

    def logits(self, input_ids, positions=None, **kw):
        """Full logits (B, T, V) for backend int arrays; positions default to 0..T-1."""
        if positions is None:
            positions = default_positions(self.backend, input_ids.shape)
        h = self.hidden(input_ids, positions, **kw)
        return self.backend.linear(h, self.output_weight())


def parameter_shapes(config: dict) -> dict:
    """Name and shape of every weight a model with this config.json dict has (for tools
    that write model folders: the demo, tests)."""
    return decoder.parameter_shapes(model_args(config))


def memory_shape(config: dict):
    """The estimator's description (core.estimate.Shape) of a config.json dict; an
    unsupported model_type is a one-line error, never a guess."""
    from lorafit.core.estimate import Shape

    a = model_args(config)
    shapes = decoder.parameter_shapes(a)
    linears = {}
    for name in decoder.linear_modules(a):
        key = next(k for k in shapes if k.endswith(f".{name}.weight"))
        out_dim, in_dim = shapes[key]
        linears[name] = (in_dim, out_dim)
    return Shape(hidden=a.hidden_size, intermediate=a.intermediate_size,
                 layers=a.num_hidden_layers, heads=a.num_attention_heads,
                 kv_heads=a.num_key_value_heads, head_dim=a.head_dim, vocab=a.vocab_size,
                 tied=a.tie_word_embeddings, linears=linears,
                 attention_bias=a.attention_bias, qk_norm=a.qk_norm,
                 attention_output_gate=a.attention_output_gate,
                 **_hybrid_shape(a, shapes, linears))


def _hybrid_shape(a, shapes: dict, linears: dict) -> dict:
    """The Shape fields of a model whose layers differ (Gated DeltaNet and attention):
    where each projection exists, every other parameter per layer, the DeltaNet dims."""
    if "linear_attention" not in a.layer_types:
        return {}
    import math

    module_layers = {m: [] for m in linears}
    other = [0] * a.num_hidden_layers
    for k, shape in shapes.items():
        if not k.startswith("model.layers."):
            continue
        i, rest = k[len("model.layers."):].split(".", 1)
        module, leaf = rest.rsplit(".", 1)[0].rsplit(".", 1)[-1], rest.rsplit(".", 1)[-1]
        if leaf == "weight" and module in module_layers:
            module_layers[module].append(int(i))
        else:
            other[int(i)] += math.prod(shape)
    linear_layers = [i for i, t in enumerate(a.layer_types) if t == "linear_attention"]
    return dict(module_layers=module_layers, layer_other_params=other,
                linear_attention=dict(layers=linear_layers,
                                      key_heads=a.linear_num_key_heads,
                                      value_heads=a.linear_num_value_heads,
                                      key_dim=a.linear_key_head_dim,
                                      value_dim=a.linear_value_head_dim))


def default_positions(ops, shape):
    b, t = shape
    return ops.from_numpy(np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy())
