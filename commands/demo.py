"""`lorafit demo`: fine-tune a tiny model on a small task and show, on held-out prompts,
that the adapter learned it.

The task is a letter shift ("shift: hello =" -> " ifmmp"): a rule, not a lookup, so the
score on strings never seen in training measures learning rather than memory. The base
model is a small Llama built deterministically from a fixed seed at first use (no
download), with a character tokenizer; only the LoRA adapter is trained.
"""

from __future__ import annotations

import json
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ALPHABET = string.ascii_lowercase
WORD_LEN = 5
MODEL_SEED = 1234
DATA_SEED = 7
MODEL_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=128,
                    intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32",
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu")


def shift(word: str) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + 1) % 26] for c in word)


def prompt_for(word: str) -> str:
    return f"shift: {word} ="


def build_model(folder: Path) -> Path:
    """A random-init Llama (std 0.02, norms at 1) and a character tokenizer."""
    from lorafit.models import parameter_shapes
    from lorafit.models.tiny import char_tokenizer, save_numpy_model

    tok = char_tokenizer(ALPHABET + " :=")
    cfg = dict(MODEL_CONFIG, vocab_size=len(tok))
    rng = np.random.default_rng(MODEL_SEED)
    weights = {}
    for name, shape in parameter_shapes(cfg).items():
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, np.float32)
        else:
            weights[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    return save_numpy_model(folder, cfg, weights, tok)


def make_data(folder: Path, n_train: int, n_test: int) -> tuple[Path, list[str]]:
    """Training JSONL of prompt/completion pairs, and held-out words never trained on."""
    rng = np.random.default_rng(DATA_SEED)
    words: list[str] = []
    seen = set()
    while len(words) < n_train + n_test:
        w = "".join(rng.choice(list(ALPHABET), WORD_LEN))
        if w not in seen:
            seen.add(w)
            words.append(w)
    train, test = words[:n_train], words[n_train:]
    path = folder / "train.jsonl"
    with open(path, "w") as f:
        for w in train:
            f.write(json.dumps({"prompt": prompt_for(w), "completion": " " + shift(w)}) + "\n")
    return path, test


def answers(model, words: list[str]) -> list[str]:
    from lorafit.core.generate import generate_text

    return [generate_text(model, prompt_for(w), max_new_tokens=WORD_LEN + 2).strip()
            for w in words]


def exact_match(preds: list[str], words: list[str]) -> float:
    return sum(p == shift(w) for p, w in zip(preds, words)) / len(words)


def main(backend: str = "auto", output: str | None = None, steps: int | None = None,
         held_out: int = 100) -> int:
    """Returns 0 when the adapter scores higher than the base model on the held-out words.
    `held_out` (words scored before and after) is there for the test, which keeps it short."""
    from lorafit.backends import get_backend
    from lorafit.commands.common import load_model_with_adapter
    from lorafit.commands.train import run_training
    from lorafit.core import rundir
    from lorafit.core.config import TrainConfig

    root = Path(output) if output else Path(tempfile.mkdtemp(prefix="lorafit-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"lorafit demo: teaching a tiny Llama to shift letters (hello -> ifmmp) in {root}")
    model_dir = build_model(root / "base-model")
    data, test_words = make_data(root, n_train=3000, n_test=held_out)
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(root / "run"),
                      backend=backend, rank=16, alpha=32, targets="all-linear",
                      batch_size=32, lr=3e-3, schedule="cosine", warmup_steps=20,
                      max_steps=steps or 400, seq_len=32, seed=0, log_every=10,
                      save_every=200)
    ops = get_backend(cfg.backend, cfg.device)  # the device the run trains on
    base = load_model_with_adapter(str(model_dir), None, ops)
    t0 = time.time()
    before = answers(base, test_words)
    say(f"held-out exact match before training: {exact_match(before, test_words):.0%} "
        f"({len(test_words)} words never seen in training)")
    run_training(cfg)
    adapter_dir = rundir.adapter_path(cfg.output)
    tuned = load_model_with_adapter(str(model_dir), adapter_dir, ops)
    after = answers(tuned, test_words)
    score_before, score_after = exact_match(before, test_words), exact_match(after, test_words)
    print(f"\nheld-out exact match: base {score_before:.0%} -> with adapter {score_after:.0%} "
          f"({len(test_words)} held-out words, {time.time() - t0:.0f}s)")
    print(f"\n{'prompt':<16} {'expected':<9} {'base model':<12} {'with adapter':<12}")
    for w, b, a in list(zip(test_words, before, after))[:6]:
        mark = "ok" if a == shift(w) else "x"
        print(f"{prompt_for(w):<16} {shift(w):<9} {b[:12]!r:<12} {a!r:<12} {mark}")
    print(f"\nadapter (PEFT layout): {adapter_dir}")
    return 0 if score_after > score_before else 1
