"""`lorafit generate`: text from a base model, with an adapter if one is given."""

from __future__ import annotations


def main(model: str, prompt: str, adapter: str | None = None, max_new_tokens: int = 64,
         temperature: float = 0.0, seed: int = 0, chat: bool = False, backend: str = "auto",
         device: str | None = None, dtype: str | None = None,
         quantize: str | None = None) -> int:
    from lorafit.backends import get_backend
    from lorafit.commands.common import load_model_with_adapter
    from lorafit.core.generate import generate_text

    ops = get_backend(backend, device, verbose=True)
    ops.seed(seed)
    m = load_model_with_adapter(model, adapter, ops, dtype=dtype, quantize=quantize)
    print(generate_text(m, prompt, max_new_tokens, temperature, seed, chat=chat))
    return 0
