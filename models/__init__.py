"""Model families, found by `model_type`, and the loaded-model record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.core.errors import LorafitError
from lorafit.models import llama

# model_type -> the module holding ModelArgs, parameter_shapes, sanitize and the forward
FAMILIES = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama}


def family(model_type: str | None):
    if model_type not in FAMILIES:
        raise LorafitError(f"model_type {model_type!r} is not supported; supported: "
                           f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


@dataclass
class Model:
    """A model held on a backend: its shape, its parameters (flat dict of HF names) and
    where it came from. Adapter leaves, when attached, live in the same dict."""

    args: Any
    params: dict
    backend: Any
    path: str | None = None
    dtype: str = "float32"
    lora: Any = None  # core.lora.LoraConfig once an adapter is attached
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def fam(self):
        return family(self.args.model_type)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lorafit.models.loader import load_tokenizer
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def hidden(self, input_ids, positions, **kw):
        return self.fam.hidden_states(self.backend, self.args, self.params, input_ids,
                                      positions, lora=self.lora, **kw)

    def logits(self, input_ids, positions=None, **kw):
        """Full logits (B, T, V) for backend int arrays; positions default to 0..T-1."""
        if positions is None:
            positions = default_positions(self.backend, input_ids.shape)
        h = self.hidden(input_ids, positions, **kw)
        return self.backend.linear(h, self.fam.output_weight(self.params))


def default_positions(B, shape):
    import numpy as np
    b, t = shape
    return B.from_numpy(np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy())
