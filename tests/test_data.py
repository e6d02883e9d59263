"""Data: which tokens carry loss for each format, bad records, packing and batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorafit.core.data import (Example, check_dataset_file, check_enough, load_dataset,
                               make_batches, split_validation)
from lorafit.core.errors import LorafitError

MAX = 256


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def loss_text(tokenizer, ex: Example) -> str:
    return tokenizer.decode(ex.input_ids[ex.loss_mask].tolist())


def test_text_records_carry_loss_on_every_token_but_the_first(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    (ex,), stats = load_dataset(path, tokenizer, MAX)
    assert stats.format == "text"
    body = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert ex.input_ids.tolist() == [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id]
    assert ex.loss_mask.tolist() == [False] + [True] * (len(body) + 1)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_completion_loss_on_completion_only(tmp_path, tokenizer, train_on_prompt):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "two plus two?", "completion": " four"}])
    (ex,), _ = load_dataset(path, tokenizer, MAX, train_on_prompt=train_on_prompt)
    completion = tokenizer(" four", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("two plus two?", add_special_tokens=False)["input_ids"]
    n_loss = len(completion) + 1 + (len(prompt) if train_on_prompt else 0)
    assert int(ex.loss_mask.sum()) == n_loss
    if not train_on_prompt:
        assert loss_text(tokenizer, ex) == " four</s>"


def test_alpaca_loss_on_output_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "say hi", "input": "", "output": "hi there"},
        {"instruction": "add", "input": "two and two", "output": "four"}])
    (a, b), stats = load_dataset(path, tokenizer, MAX)
    assert stats.format == "alpaca"
    assert loss_text(tokenizer, a) == "hi there</s>"
    assert loss_text(tokenizer, b) == "four</s>"
    assert "### Input:" in tokenizer.decode(b.input_ids.tolist())
    assert "### Input:" not in tokenizer.decode(a.input_ids.tolist())


def test_messages_loss_on_every_assistant_turn_only(tmp_path, tokenizer):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "two plus two"},
            {"role": "assistant", "content": "four"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs}])
    (ex,), stats = load_dataset(path, tokenizer, MAX)
    assert stats.format == "messages"
    assert ex.input_ids.tolist() == list(tokenizer.apply_chat_template(
        msgs, tokenize=True, return_dict=False))
    text = loss_text(tokenizer, ex)
    assert "hi" in text and "four" in text
    assert "hello" not in text and "be brief" not in text and "two plus two" not in text
    (ex_all,), _ = load_dataset(path, tokenizer, MAX, train_on_prompt=True)
    assert int(ex_all.loss_mask.sum()) == len(ex_all.input_ids) - 1


BAD_CASES = [
    ('{"text": "ok"}\n{"text": broken\n', 2, "malformed JSON"),
    ('{"text": "ok"}\n{"text": 5}\n', 2, "must be a string"),
    ('{"text": "ok"}\n{"text": "   "}\n', 2, "empty"),
    ('{"text": "ok"}\n{"prompt": "a", "completion": "b"}\n', 2, "prompt_completion record in a text file"),
    ('{"text": "ok"}\n{"other": 1}\n', 2, "missing field"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"messages": [{"role": "user", "content": "hi"}]}\n', 2, "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
     '{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     2, "unknown role"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n', 2, "empty"),
]


@pytest.mark.parametrize("content,line,reason", BAD_CASES)
def test_bad_records_are_reported_by_file_and_line(tmp_path, tokenizer, content, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(LorafitError) as err:
        check_dataset_file(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:{line}: ") and reason in msg and "\n" not in msg
    examples, stats = load_dataset(path, tokenizer, MAX, on_bad_record="skip")
    assert len(examples) == 1 and len(stats.problems) == 1
    assert stats.problems[0].startswith(f"{path}:{line}: ")


def test_bom_blank_lines_and_json_lists(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a b"}\n\n   \n{"text": "c d"}\n')
    examples, stats = load_dataset(path, tokenizer, MAX)
    assert len(examples) == 2 and stats.blank_lines == 2
    jpath = tmp_path / "d.json"
    jpath.write_text(json.dumps([{"prompt": "x", "completion": "y"}, {"prompt": "x"}]))
    with pytest.raises(LorafitError, match=r"record 2: missing field"):
        load_dataset(jpath, tokenizer, MAX)


def test_truncation_is_counted_and_all_truncated_loss_is_reported(tmp_path, tokenizer):
    long_prompt = " ".join(["hello world"] * 40)
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hi", "completion": " " + " ".join(["world"] * 40)},
        {"prompt": long_prompt, "completion": " four"}])
    with pytest.raises(LorafitError, match=r"d.jsonl:2: no loss tokens left after truncation"):
        load_dataset(path, tokenizer, 16)
    examples, stats = load_dataset(path, tokenizer, 16, on_bad_record="skip")
    assert len(examples) == 1 and examples[0].input_ids.size == 16
    assert stats.truncated == 2


def test_empty_file_and_too_few_examples(tmp_path, tokenizer):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(LorafitError, match="empty"):
        check_dataset_file(tmp_path / "e.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    examples, _ = load_dataset(path, tokenizer, MAX)
    with pytest.raises(LorafitError, match="fewer than one batch"):
        check_enough(examples, 4)


def _examples(n, rng, lo=3, hi=20):
    out = []
    for i in range(n):
        L = int(rng.integers(lo, hi))
        mask = rng.random(L) > 0.3
        mask[0] = False
        mask[-1] = True
        out.append(Example(rng.integers(5, 100, L).astype(np.int32), mask, f"f:{i}"))
    return out


def test_packing_rows_positions_segments_and_totals():
    rng = np.random.default_rng(0)
    examples = _examples(40, rng)
    packed = make_batches(examples, 4, 32, True, seed=1, epoch=0)
    unpacked = make_batches(examples, 4, 32, False, seed=1, epoch=0)
    assert all(b.input_ids.shape[1] == 32 for b in packed)
    assert sum(b.n_tokens for b in packed) == sum(b.n_tokens for b in unpacked) == \
        sum(int(e.loss_mask[1:].sum()) for e in examples)
    seen = []
    for b in packed:
        for r in range(b.input_ids.shape[0]):
            seg, pos = b.segment_ids[r], b.positions[r]
            for s in np.unique(seg):
                cols = np.where(seg == s)[0]
                if b.loss_mask[r, cols].sum() == 0 and (b.input_ids[r, cols] == 0).all():
                    continue  # padding
                assert pos[cols].tolist() == list(range(len(cols)))  # positions reset
                seen.append(tuple(b.input_ids[r, cols].tolist()))
    assert sorted(seen) == sorted(tuple(e.input_ids[:-1].tolist()) for e in examples)


def test_batches_are_deterministic_per_epoch_and_length_grouped():
    rng = np.random.default_rng(0)
    examples = _examples(300, rng, 3, 60)
    a = make_batches(examples, 8, 64, False, seed=3, epoch=0)
    b = make_batches(examples, 8, 64, False, seed=3, epoch=0)
    c = make_batches(examples, 8, 64, False, seed=3, epoch=1)
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert any(not np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    widths = [x.input_ids.shape[1] for x in a]
    assert len(set(widths)) > 3  # each batch padded to its own longest example
    spread = np.mean([np.ptp([np.count_nonzero(r) for r in x.input_ids]) for x in a])
    assert spread < 10  # grouped by length: little padding inside a batch


def test_validation_split_is_deterministic():
    examples = _examples(50, np.random.default_rng(0))
    t1, v1 = split_validation(examples, 0.2, 0)
    t2, v2 = split_validation(examples, 0.2, 0)
    assert len(v1) == 10 and len(t1) == 40
    assert [e.source for e in v1] == [e.source for e in v2]
