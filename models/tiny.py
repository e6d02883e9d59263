"""Tiny tokenizers and model folders built locally, for the demo and the tests.

Nothing here touches the network: the tokenizer is trained with `tokenizers` on a given
corpus (or is a fixed character vocabulary), then wrapped by transformers and saved.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def char_tokenizer(alphabet: str):
    """A character-level tokenizer over `alphabet` plus the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    return _wrap(tk)


def bpe_tokenizer(corpus: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `corpus`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    return _wrap(tk)


def _wrap(tk):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_numpy_model(folder: str | Path, config: dict, weights: dict, tokenizer) -> Path:
    """Write a Hugging Face model folder from numpy weights (no framework needed)."""
    import json

    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    return folder
