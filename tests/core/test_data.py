"""Data: which tokens carry loss for each format, bad records, packing and batching."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorafit.core.data import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, check_dataset_file,
                               check_enough, count_batches, load_dataset, make_batches,
                               read_records, split_validation)
from lorafit.core.examples import Example
from lorafit.core.errors import LorafitError
from lorafit.models.tiny import char_tokenizer

MAX = 512
ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!#'\"-_()\n"
            "<>|/")


@pytest.fixture
def chars():
    """A fresh character tokenizer: one token per character, so counts are exact."""
    return char_tokenizer(ALPHABET)


def write_jsonl(path, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def loss_text(tokenizer, ex: Example) -> str:
    return tokenizer.decode(ex.input_ids[ex.loss_mask].tolist())


def only(path, tokenizer, **kw) -> Example:
    (ex,), _ = load_dataset(path, tokenizer, kw.pop("max_seq_len", MAX), **kw)
    return ex


# -- which tokens carry loss --------------------------------------------------------------

def test_text_loss_on_every_token_but_the_first(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    (ex,), stats = load_dataset(path, tokenizer, MAX)
    assert stats.format == "text" and ex.source == f"{path}:1"
    assert ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == bool
    body = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert ex.input_ids.tolist() == [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id]
    assert ex.loss_mask.tolist() == [False] + [True] * (len(body) + 1)
    assert stats.loss_tokens == len(body) + 1 and stats.tokens == len(body) + 2


def test_text_without_bos_never_targets_the_first_token(tmp_path, chars):
    chars.bos_token = None
    ex = only(write_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}]), chars)
    assert chars.decode(ex.input_ids.tolist()) == "abc</s>"
    assert ex.loss_mask.tolist() == [False, True, True, True]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_completion_loss_on_completion_only(tmp_path, chars, train_on_prompt):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "two plus two?", "completion": " four"}])
    ex = only(path, chars, train_on_prompt=train_on_prompt)
    assert chars.decode(ex.input_ids.tolist()) == "<s>two plus two? four</s>"
    n_prompt = 1 + len("two plus two?")
    if train_on_prompt:
        assert ex.loss_mask.tolist() == [False] + [True] * (len(ex.input_ids) - 1)
    else:
        assert np.flatnonzero(ex.loss_mask).tolist() == list(range(n_prompt, n_prompt + 6))
        assert loss_text(chars, ex) == " four</s>"


def test_prompt_completion_with_bpe_tokenizer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "two plus two?", "completion": " four"}])
    ex = only(path, tokenizer)
    completion = tokenizer(" four", add_special_tokens=False)["input_ids"]
    assert int(ex.loss_mask.sum()) == len(completion) + 1
    assert loss_text(tokenizer, ex) == " four</s>"
    assert int(only(path, tokenizer, train_on_prompt=True).loss_mask.sum()) == \
        len(ex.input_ids) - 1


def test_alpaca_loss_on_output_only_and_input_section_only_when_given(tmp_path, chars):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "say hi", "input": "", "output": "hi there"},
        {"instruction": "add", "input": "two and two", "output": "four"},
        {"instruction": "say yo", "output": "yo"},
        {"instruction": "say ok", "input": None, "output": "ok"}])
    (a, b, c, d), stats = load_dataset(path, chars, MAX)
    assert stats.format == "alpaca"
    assert [loss_text(chars, e) for e in (a, b, c, d)] == \
        ["hi there</s>", "four</s>", "yo</s>", "ok</s>"]
    assert chars.decode(a.input_ids.tolist()) == \
        "<s>" + ALPACA_NO_INPUT.format(instruction="say hi") + "hi there</s>"
    assert chars.decode(b.input_ids.tolist()) == \
        "<s>" + ALPACA_WITH_INPUT.format(instruction="add", input="two and two") + "four</s>"
    assert "### Input:" not in chars.decode(c.input_ids.tolist())
    assert "### Input:" not in chars.decode(d.input_ids.tolist())
    (e, *_), _ = load_dataset(path, chars, MAX, train_on_prompt=True)
    assert int(e.loss_mask.sum()) == len(e.input_ids) - 1


CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "four"}]


@pytest.mark.parametrize("tok", ["chars", "tokenizer"])
def test_messages_loss_on_every_assistant_turn_only(tmp_path, request, tok):
    tok = request.getfixturevalue(tok)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    (ex,), stats = load_dataset(path, tok, MAX)
    assert stats.format == "messages"
    assert ex.input_ids.tolist() == list(tok.apply_chat_template(
        CHAT, tokenize=True, return_dict=False))
    # the assistant contents and their end of turn; no role header, no other turn
    assert loss_text(tok, ex) == "hi</s>four</s>"
    spans = np.flatnonzero(np.diff(np.r_[0, ex.loss_mask.astype(int), 0]))
    assert len(spans) == 4  # two separate runs of loss tokens
    (ex_all,), _ = load_dataset(path, tok, MAX, train_on_prompt=True)
    assert ex_all.input_ids.tolist() == ex.input_ids.tolist()
    assert int(ex_all.loss_mask.sum()) == len(ex_all.input_ids) - 1


def test_messages_need_a_chat_template(tmp_path, chars):
    chars.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(LorafitError, match="chat template"):
        load_dataset(path, chars, MAX, on_bad_record="skip")


def test_template_without_the_prefix_property_still_masks_each_turn(tmp_path, chars):
    """The last message renders differently, so a conversation's prefixes are not prefixes
    of it; the turns are still found (core/chat_mask.py)."""
    chars.chat_template = ("{% for m in messages %}{% if loop.last %}<|last|>{% endif %}"
                           "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    assert loss_text(chars, only(path, chars)) == "hifour"
    ex = only(path, chars, train_on_prompt=True)  # loss on everything
    assert int(ex.loss_mask.sum()) == len(ex.input_ids) - 1


def test_role_header_never_gets_loss(tmp_path, chars):
    chars.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                           "{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT[1:3]}])
    assert loss_text(chars, only(path, chars)) == "hi"


def test_chat_template_errors_are_record_problems(tmp_path, chars):
    chars.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}"
                           "{{ raise_exception('tools are\nnot supported') }}{% endif %}"
                           "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": CHAT},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    with pytest.raises(LorafitError) as err:
        load_dataset(path, chars, MAX)
    assert str(err.value).startswith(f"{path}:2: the chat template failed (tools are not")
    examples, stats = load_dataset(path, chars, MAX, on_bad_record="skip")
    assert [e.source for e in examples] == [f"{path}:1"] and len(stats.problems) == 1


# -- bad records ------------------------------------------------------------------------------

OK_CHAT = ('{"messages": [{"role": "user", "content": "hi"}, '
           '{"role": "assistant", "content": "yo"}]}')
BAD_CASES = [
    ('{"text": "ok"}\n{"text": broken\n', 2, "malformed JSON"),
    ('{"text": "ok"}\n{"text": 5}\n', 2, 'field "text" must be a string, got number'),
    ('{"text": "ok"}\n{"text": "   "}\n', 2, 'field "text" is empty'),
    ('{"text": "ok"}\n[1, 2]\n', 2, "expected a JSON object, got array"),
    ('{"text": "ok"}\n{"prompt": "a", "completion": "b"}\n', 2,
     "a prompt_completion record in a text file"),
    ('{"text": "ok"}\n{"other": 1}\n', 2, "missing field(s) text"),
    ('{"text": "ok"}\n{"text": "a\\ud800b"}\n', 2, "lone surrogate"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n', 2,
     'field "completion" is empty'),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": null, "completion": "b"}\n', 2,
     'field "prompt" must be a string, got null'),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": 3, "output": "b"}\n',
     2, 'field "input" must be a string'),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', 2, "missing field(s) output"),
    (OK_CHAT + '\n{"messages": [{"role": "user", "content": "hi"}]}\n', 2,
     "no assistant turn"),
    (OK_CHAT + '\n{"messages": [{"role": "wizard", "content": "hi"}, '
     '{"role": "assistant", "content": "x"}]}\n', 2, "unknown role 'wizard'"),
    (OK_CHAT + '\n{"messages": [{"role": "user", "content": ""}, '
     '{"role": "assistant", "content": "x"}]}\n', 2, "messages[0].content is empty"),
    (OK_CHAT + '\n{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n',
     2, "messages[0] must be an object with role and content"),
    (OK_CHAT + '\n{"messages": []}\n', 2, 'field "messages" is empty'),
    (OK_CHAT + '\n{"messages": "hi"}\n', 2, 'field "messages" must be an array'),
    (OK_CHAT + '\n{"text": "hi"}\n', 2, "a text record in a messages file"),
    ('{"text": 5}\n{"text": "ok"}\n', 1, "must be a string"),
    ('{"text": "ok"}\n\n{"text": "ok"}\n{"text": "}\n', 4, "malformed JSON"),
]


@pytest.mark.parametrize("content,line,reason", BAD_CASES)
def test_bad_records_are_reported_by_file_and_line(tmp_path, tokenizer, content, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    for check in (lambda: check_dataset_file(path),
                  lambda: load_dataset(path, tokenizer, MAX)):
        with pytest.raises(LorafitError) as err:
            check()
        msg = str(err.value)
        assert msg.startswith(f"{path}:{line}: ") and reason in msg and "\n" not in msg
    n_good = len([x for x in content.splitlines() if x.strip()]) - 1
    stats = check_dataset_file(path, on_bad_record="skip")
    assert stats.records == n_good and len(stats.problems) == 1
    assert stats.problems[0].startswith(f"{path}:{line}: ") and reason in stats.problems[0]
    examples, stats = load_dataset(path, tokenizer, MAX, on_bad_record="skip")
    assert len(examples) == n_good and len(stats.problems) == 1
    assert stats.problems[0].startswith(f"{path}:{line}: ") and reason in stats.problems[0]
    assert f"{path}:{line}" not in [e.source for e in examples]


def test_fail_message_counts_the_other_problems(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 1}\n{"text": ""}\n{"text": }\n')
    with pytest.raises(LorafitError) as err:
        check_dataset_file(path)
    assert str(err.value).startswith(f"{path}:2: ") and "(and 2 more" in str(err.value)
    stats = check_dataset_file(path, "skip")
    assert [p.split(": ")[0] for p in stats.problems] == [f"{path}:{i}" for i in (2, 3, 4)]
    with pytest.raises(LorafitError, match="on_bad_record"):
        check_dataset_file(path, "ignore")


def test_format_comes_from_the_first_valid_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": 1, "completion": "x"},
                                              {"text": "a"}, {"text": "b"}])
    fmt, records, problems, blank = read_records(path)
    assert fmt == "text" and len(records) == 2 and problems[0].startswith(f"{path}:1: ")
    # several formats' fields: the most specific wins (alpaca dumps carry a "text" too)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b", "text": "c"}])
    assert read_records(path)[0] == "alpaca"


def test_bom_crlf_blank_lines_and_unicode_line_separators(tmp_path, chars):
    path = tmp_path / "bom.jsonl"
    odd = json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False).encode()
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "ab"}\r\n\r\n   \n' + odd + b"\n\n")
    examples, stats = load_dataset(path, chars, MAX, on_bad_record="skip")
    assert stats.blank_lines == 3 and [e.source for e in examples] == [f"{path}:1", f"{path}:4"]
    assert not stats.problems


def test_undecodable_line_is_a_record_problem(tmp_path, chars):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ab"}\n{"text": "\xff"}\n')
    with pytest.raises(LorafitError, match=rf"^{path}:2: not UTF-8"):
        check_dataset_file(path)
    (tmp_path / "u16.jsonl").write_bytes('{"text": "ab"}\n'.encode("utf-16"))
    with pytest.raises(LorafitError, match="UTF-16"):
        check_dataset_file(tmp_path / "u16.jsonl")


def test_json_list_files(tmp_path, chars):
    jpath = tmp_path / "d.json"
    jpath.write_bytes(b"\xef\xbb\xbf" + json.dumps(
        [{"prompt": "x", "completion": "y"}, {"prompt": "x"}, {"prompt": "a", "completion": "b"}],
        indent=1).encode())
    with pytest.raises(LorafitError, match=rf"^{jpath}:record 2: missing field\(s\) completion"):
        load_dataset(jpath, chars, MAX)
    examples, stats = load_dataset(jpath, chars, MAX, on_bad_record="skip")
    assert [e.source for e in examples] == [f"{jpath}:record 1", f"{jpath}:record 3"]
    assert stats.problems == [f"{jpath}:record 2: missing field(s) completion"]
    jpath.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(LorafitError, match=rf"^{jpath}:2: malformed JSON"):
        check_dataset_file(jpath)
    jpath.write_text('{"text": "a"}')  # a JSONL file named .json
    assert check_dataset_file(jpath).records == 1
    lpath = tmp_path / "list.jsonl"  # a JSON list named .jsonl
    lpath.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert check_dataset_file(lpath).records == 2


def test_missing_empty_and_unusable_files(tmp_path, tokenizer):
    with pytest.raises(LorafitError, match="no such data file"):
        check_dataset_file(tmp_path / "nope.jsonl")
    with pytest.raises(LorafitError, match="folder"):
        check_dataset_file(tmp_path)
    for content in ("", "\n\n  \n", "[]"):
        (tmp_path / "e.jsonl").write_text(content)
        with pytest.raises(LorafitError, match="empty"):
            check_dataset_file(tmp_path / "e.jsonl")
    (tmp_path / "u.jsonl").write_text('{"foo": 1}\n{"bar": 2}\n')
    with pytest.raises(LorafitError, match=r"u.jsonl:1: no record in a known format .*foo"):
        check_dataset_file(tmp_path / "u.jsonl", "skip")
    (tmp_path / "m.jsonl").write_text('{"text": \n{"text": "a"\n')
    with pytest.raises(LorafitError, match=r"m.jsonl:1: malformed JSON .*\(and 1 more\)"):
        check_dataset_file(tmp_path / "m.jsonl", "skip")
    (tmp_path / "b.jsonl").write_text('{"text": 1}\n{"text": ""}\n')
    with pytest.raises(LorafitError, match=r"no usable records; first problem: .*b.jsonl:1: "):
        check_dataset_file(tmp_path / "b.jsonl", "skip")
    with pytest.raises(LorafitError, match="no usable"):
        load_dataset(tmp_path / "b.jsonl", tokenizer, MAX, on_bad_record="skip")


def test_random_garbage_only_ever_raises_lorafit_errors(tmp_path, chars):
    rng = np.random.default_rng(0)
    pieces = ['{"text": "ab"}', '{"text": ', "[", "]", '"x"', "null", "1e999", "{}", "\ud800",
              '{"messages": [{"role": "user", "content": "a"}]}', '{"prompt": "a"}',
              '{"messages": [{"role": "assistant", "content": {"a": 1}}]}', "\\u0000", "\xff",
              '{"instruction": "a", "input": [], "output": "b"}', "9" * 5000, "[" * 5000]
    for k in range(40):
        text = "\n".join("".join(rng.choice(pieces, rng.integers(1, 4))) for _ in range(4))
        path = tmp_path / f"g{k}{'.json' if k % 5 == 0 else '.jsonl'}"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        for policy in ("fail", "skip"):
            try:
                check_dataset_file(path, policy)
                load_dataset(path, chars, 8, on_bad_record=policy)
            except LorafitError as e:
                assert "\n" not in str(e)


# -- truncation -------------------------------------------------------------------------------

def test_truncation_is_counted_and_all_truncated_loss_is_reported(tmp_path, chars):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hi", "completion": " " + "w" * 40},
        {"prompt": "x" * 40, "completion": " four"},
        {"prompt": "hi", "completion": " ok"}])
    with pytest.raises(LorafitError, match=rf"^{path}:2: no loss tokens left after truncation "
                                           r"to 16 tokens \(the example has 47"):
        load_dataset(path, chars, 16)
    examples, stats = load_dataset(path, chars, 16, on_bad_record="skip")
    assert [e.input_ids.size for e in examples] == [16, 7]
    assert stats.truncated == 1 and stats.examples == 2 and stats.records == 3
    assert stats.problems[0].startswith(f"{path}:2: ")
    cut = examples[0]
    assert chars.decode(cut.input_ids.tolist()) == "<s>hi " + "w" * 12  # the start is kept
    assert cut.loss_mask.tolist() == [False] * 3 + [True] * 13
    assert stats.loss_tokens == 13 + 4 and stats.tokens == 16 + 7


def test_text_examples_cut_to_the_sequence_length_which_must_be_at_least_2(tmp_path, chars):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"text": "abcdef"}])
    examples, stats = load_dataset(path, chars, 4)
    assert [e.input_ids.size for e in examples] == [4, 4] and stats.truncated == 1
    assert not stats.problems
    with pytest.raises(LorafitError, match="maximum sequence length must be at least 2, got 1"):
        load_dataset(path, chars, 1)


def test_too_few_examples_for_one_batch(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}])
    examples, _ = load_dataset(path, tokenizer, MAX)
    with pytest.raises(LorafitError, match="only 2 training example.*fewer than one batch of 4"):
        check_enough(examples, 4)
    check_enough(examples, 2)


# -- validation split -------------------------------------------------------------------------

def _examples(n, rng, lo=3, hi=20):
    out = []
    for i in range(n):
        L = int(rng.integers(lo, hi))
        mask = rng.random(L) > 0.3
        mask[0] = False
        mask[-1] = True
        out.append(Example(rng.integers(5, 100, L).astype(np.int32), mask, f"f:{i}"))
    return out


def test_validation_split_is_deterministic_and_disjoint():
    examples = _examples(50, np.random.default_rng(0))
    t1, v1 = split_validation(examples, 0.2, 0)
    t2, v2 = split_validation(examples, 0.2, 0)
    _, v3 = split_validation(examples, 0.2, 1)
    assert len(v1) == 10 and len(t1) == 40
    assert [e.source for e in v1] == [e.source for e in v2] != [e.source for e in v3]
    assert sorted(e.source for e in t1 + v1) == sorted(e.source for e in examples)
    assert split_validation(examples, 0, 0) == (examples, [])
    assert len(split_validation(examples[:2], 0.01, 0)[1]) == 1
    with pytest.raises(LorafitError):
        split_validation(examples, 1.0, 0)


# -- batching ---------------------------------------------------------------------------------

def _segments(batch):
    """(row, columns) of each example laid into a batch. Padding is where the target is 0
    (the token ids of `_examples` never are)."""
    for r in range(batch.input_ids.shape[0]):
        used = batch.targets[r] != 0
        seg = batch.segment_ids[r] if batch.segment_ids is not None else np.zeros_like(used)
        for s in np.unique(seg[used]):
            yield r, np.flatnonzero((seg == s) & used)


def _check_epoch(batches, examples):
    """Every example exactly once, whole, with its own mask, positions from 0 and targets
    that are its inputs shifted by one."""
    seen = []
    for b in batches:
        for r, cols in _segments(b):
            assert cols.tolist() == list(range(cols[0], cols[-1] + 1))  # contiguous
            assert b.positions[r, cols].tolist() == list(range(len(cols)))
            ids, tgt = b.input_ids[r, cols], b.targets[r, cols]
            assert ids[1:].tolist() == tgt[:-1].tolist()
            seen.append((tuple(ids.tolist()) + (int(tgt[-1]),),
                         tuple(b.loss_mask[r, cols].tolist())))
    expect = [(tuple(e.input_ids.tolist()), tuple(e.loss_mask[1:].astype(float).tolist()))
              for e in examples]
    assert sorted(seen) == sorted(expect)


def _used(batch, r):
    return int(np.count_nonzero(batch.targets[r]))


def test_packing_rows_positions_segments_and_totals():
    examples = _examples(40, np.random.default_rng(0))
    packed = make_batches(examples, 4, 32, True, seed=1, epoch=0)
    unpacked = make_batches(examples, 4, 32, False, seed=1, epoch=0)
    total = sum(int(e.loss_mask[1:].sum()) for e in examples)
    assert sum(b.n_tokens for b in packed) == sum(b.n_tokens for b in unpacked) == total
    for b in packed:
        assert b.input_ids.shape[1] == 32 and b.segment_ids.dtype == np.int32
        assert b.input_ids.dtype == b.targets.dtype == b.positions.dtype == np.int64
        assert b.loss_mask.dtype == np.float32 and b.n_tokens == int(b.loss_mask.sum())
        for r in range(b.input_ids.shape[0]):
            seg, pad = b.segment_ids[r], b.targets[r] == 0
            assert (np.diff(seg) >= 0).all()  # one run per example: ids distinct
            assert not set(seg[pad].tolist()) & set(seg[~pad].tolist())  # padding apart
            assert not b.loss_mask[r, pad].any() and not b.input_ids[r, pad].any()
    _check_epoch(packed, examples)
    _check_epoch(unpacked, examples)
    cols = sum(e.input_ids.size - 1 for e in examples)
    assert sum(b.input_ids.shape[0] for b in packed) <= -(-cols // 32) + 1  # dense


def test_batches_are_deterministic_per_epoch_and_counted():
    examples = _examples(123, np.random.default_rng(1), 2, 40)
    for pack in (False, True):
        a = make_batches(examples, 8, 48, pack, seed=3, epoch=0)
        b = make_batches(examples, 8, 48, pack, seed=3, epoch=0)
        c = make_batches(examples, 8, 48, pack, seed=3, epoch=1)
        assert len(a) == len(b) and all(
            np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.loss_mask, y.loss_mask)
            for x, y in zip(a, b))
        assert any(x.input_ids.shape != y.input_ids.shape or
                   not np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
        for epoch in range(3):
            for drop_last in (False, True):
                n = len(make_batches(examples, 8, 48, pack, 3, epoch, drop_last=drop_last))
                assert n == count_batches(examples, 8, 48, pack, drop_last=drop_last)
        full = make_batches(examples, 8, 48, pack, 3, 0, drop_last=True)
        assert all(x.input_ids.shape[0] == 8 for x in full)
    assert count_batches(examples, 8, 48, False) == 16
    assert make_batches([], 8, 48, True, 0, 0) == []


def test_unpacked_batches_padded_to_their_own_longest_example():
    examples = _examples(300, np.random.default_rng(0), 3, 60)
    batches = make_batches(examples, 8, 64, False, seed=3, epoch=0)
    assert all(b.segment_ids is None for b in batches)
    widths = []
    for b in batches:
        lengths = [_used(b, r) for r in range(b.input_ids.shape[0])]
        assert b.input_ids.shape[1] == max(lengths)  # padded to the longest, not to 64
        assert not b.loss_mask[np.arange(b.input_ids.shape[1]) >= np.array(lengths)[:, None]].any()
        widths.append(b.input_ids.shape[1])
    assert len(set(widths)) > 3
    spread = np.mean([np.ptp([_used(b, r) for r in range(b.input_ids.shape[0])])
                      for b in batches])
    assert spread < 10  # grouped by length: little padding inside a batch
    _check_epoch(batches, examples)


def test_an_example_wider_than_a_row_is_refused():
    examples = _examples(3, np.random.default_rng(0), 40, 41)
    with pytest.raises(LorafitError, match="do not fit a row of 16"):
        make_batches(examples, 2, 16, True, 0, 0)


def test_an_epoch_plan_is_a_separate_step_and_can_be_shared_out():
    """make_batches = epoch_plan (the order) + batches built on demand; a share of the
    plan (plan.take) builds exactly those batches."""
    from lorafit.core.data import EpochBatches, epoch_plan
    from lorafit.core.examples import ExampleSet

    examples = ExampleSet.from_examples(_examples(90, np.random.default_rng(2), 2, 30))
    for pack in (False, True):
        plan = epoch_plan(examples, 4, 32, pack, seed=5, epoch=1)
        whole = make_batches(examples, 4, 32, pack, seed=5, epoch=1)
        assert len(plan) == len(whole)
        share = EpochBatches(examples, plan.take(range(1, len(plan), 2)), 32, pack)
        for k, b in enumerate(share):
            ref = whole[1 + 2 * k]
            assert all(np.array_equal(x, y) for x, y in zip(b, ref) if x is not None)
