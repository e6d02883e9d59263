"""Text generation with a KV cache: greedy at temperature 0, sampled otherwise.

Sampling happens in numpy on the last position's logits, so both backends pick tokens the
same way from the same seed.
"""

from __future__ import annotations

import numpy as np

from lorafit.core.errors import LorafitError


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, eos_ids=(), top_p: float = 1.0):
    """Yield new token ids one at a time."""
    if not prompt_ids:
        raise LorafitError("the prompt is empty after tokenisation")
    if temperature < 0:
        raise LorafitError(f"temperature must be >= 0, got {temperature}")
    model.check_ids(prompt_ids)  # a tokenizer that does not match the model
    ops = model.backend
    rng = np.random.default_rng(seed)
    cache = [[None, None] for _ in range(model.args.num_hidden_layers)]
    ids = np.asarray([prompt_ids], dtype=np.int64)
    pos = np.arange(len(prompt_ids), dtype=np.int64)[None]
    seen = list(prompt_ids)
    reset = model.args.cache_reset_length
    for _ in range(max_new_tokens):
        if reset is not None and pos.shape[1] == 1 and int(pos[0, 0]) == reset:
            # the rotary frequencies switch here: recompute the cache with the new set
            cache = [[None, None] for _ in range(model.args.num_hidden_layers)]
            ids = np.asarray([seen], dtype=np.int64)
            pos = np.arange(len(seen), dtype=np.int64)[None]
        h = model.hidden(ops.from_numpy(ids), ops.from_numpy(pos), cache=cache)
        last = model.head(h[:, -1, :])
        logits = ops.to_numpy(ops.cast(last, "float32"))[0].astype(np.float64)
        token = _pick(logits, temperature, top_p, rng)
        yield token
        if token in eos_ids:
            return
        seen.append(token)
        ids = np.asarray([[token]], dtype=np.int64)
        pos = pos[:, -1:] + 1


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


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
