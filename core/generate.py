"""Text generation for one prompt: greedy at temperature 0, sampled otherwise, through the
engine (core/engine.py), the one generation code path.

Sampling happens in numpy on the last position's logits, so both backends pick tokens the
same way from the same seed.
"""

from __future__ import annotations

from lorafit.core.engine import Engine, Request
from lorafit.core.errors import LorafitError


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, eos_ids=(), top_p: float = 1.0):
    """Yield new token ids one at a time (an end-of-sequence token ends it, and is
    yielded). One request through the engine, with the adapter attached to the model."""
    if not prompt_ids:
        raise LorafitError("the prompt is empty after tokenisation")
    if temperature < 0:
        raise LorafitError(f"temperature must be >= 0, got {temperature}")
    model.check_ids(prompt_ids)  # a tokenizer that does not match the model
    engine = Engine(model, max_batch=1, max_len=len(prompt_ids) + max(max_new_tokens, 1))
    out: list = []
    engine.submit(Request(list(prompt_ids), max_new_tokens, temperature, top_p, seed,
                          eos_ids=frozenset(eos_ids), on_token=lambda t, _: out.append(t)))
    while max_new_tokens > 0 and engine.step():
        yield from out
        out.clear()
    yield from out


def eos_token_ids(tokenizer, model_args=None) -> set:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = (model_args.extra.get("eos_token_id") if model_args is not None else None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list):
        ids.update(int(x) for x in extra)
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LorafitError("--chat given, but this tokenizer has no chat template")
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return list(tokenizer(prompt)["input_ids"])


def generate_text(model, prompt: str, max_new_tokens=64, temperature=0.0, seed=0,
                  chat=False) -> str:
    tok = model.tokenizer
    ids = encode_prompt(tok, prompt, chat)
    eos = eos_token_ids(tok, model.args)
    out = [t for t in generate_ids(model, ids, max_new_tokens, temperature, seed, eos)
           if t not in eos]
    return tok.decode(out, skip_special_tokens=True)
