"""Training data: JSONL (or a JSON list) -> token ids + loss masks -> batches, in numpy.

Four record formats are recognised, one per file (detected from the first valid record,
then every record is checked against it):
  messages           {"messages": [{"role", "content"}...]} loss on assistant turns
  prompt_completion  {"prompt": ..., "completion": ...}     loss on the completion
  alpaca             {"instruction", "input"?, "output"}    loss on the output
  text               {"text": ...}                          loss on every token
Problems are reported as `file:line: reason` (`file:record N: reason` for a JSON list);
`on_bad_record` decides whether they stop the run (before any model is loaded) or are
skipped. Bad data only ever raises LorafitError.

Shift convention: an example of L tokens gives L-1 (input, target) pairs; in a batch row,
column t holds input x_t and target x_{t+1}. Padding columns hold input 0, target 0, no loss.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Iterator, NamedTuple

import numpy as np

from lorafit.core.errors import LorafitError
from lorafit.core.examples import ExampleSet, ExampleSetBuilder
from lorafit.core.sources import Records, open_records

# Most specific first: a record with several formats' keys gets the most specific one
# (e.g. Alpaca dumps that also carry a pre-rendered "text").
FORMATS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
ROLES = ("system", "user", "assistant", "tool")
POLICIES = ("fail", "skip")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n")
GROUP_BATCHES = 50  # length grouping sorts within chunks of this many batches
MAX_REASON = 200  # characters of a third-party error message kept in a problem line


@dataclass
class DatasetStats:
    format: str
    records: int  # valid records (after validation, before tokenizing)
    examples: int = 0  # tokenized examples kept
    blank_lines: int = 0
    truncated: int = 0  # kept examples cut to max_seq_len
    loss_tokens: int = 0
    tokens: int = 0
    problems: list = field(default_factory=list)  # "file:line: reason"


class Batch(NamedTuple):
    """One micro-batch, from the data pipeline to the loss: numpy arrays as built here,
    backend arrays after `on(ops)`. A NamedTuple, so compiled and differentiated functions
    (mx.compile, mx.value_and_grad) take it as it is."""
    input_ids: Any  # int64 (B, T); padding 0
    targets: Any  # int64 (B, T); padding 0
    loss_mask: Any  # float32 (B, T)
    positions: Any  # int64 (B, T), reset per packed example
    segment_ids: Any = None  # int32 (B, T) when packed; padding has its own id

    @property
    def n_tokens(self) -> int:
        """Loss tokens (of a numpy batch)."""
        return int(np.asarray(self.loss_mask).sum())

    @property
    def shape(self) -> tuple:
        return tuple(self.input_ids.shape)

    def on(self, ops, pad_multiple: int = 1) -> "Batch":
        """The same batch as backend arrays, its columns padded (masked out) to a multiple
        of pad_multiple so compiled graphs are reused across batches."""
        pad = (-self.input_ids.shape[1]) % pad_multiple

        def put(a, fill=0):
            if a is None:
                return None
            if pad:
                a = np.pad(a, ((0, 0), (0, pad)), constant_values=fill)
            return ops.from_numpy(a)
        seg = self.segment_ids
        return Batch(put(self.input_ids), put(self.targets), put(self.loss_mask),
                     put(self.positions), None if seg is None else put(seg, seg.max() + 1))


class _BadRecord(Exception):
    """A problem with one record, reported as `source: reason` instead of stopping."""


def _one_line(text, limit: int = MAX_REASON) -> str:
    """Third-party messages may span lines; ours are printed on one."""
    from lorafit.core.sources import one_line

    return one_line(text, limit)


# -- reading and validating ----------------------------------------------------------------

def _json_type(value) -> str:
    """The JSON name of a parsed value, as the user wrote it."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def detect_format(record) -> str | None:
    """The most specific format whose fields the record has, or None."""
    if not isinstance(record, dict):
        return None
    return next((name for name, keys in FORMATS.items() if all(k in record for k in keys)), None)


def _check_string(value, what: str, allow_empty: bool = False) -> str | None:
    """Strings must be text the tokenizer can take: present, non-blank, valid Unicode."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {_json_type(value)}"
    if not allow_empty and not value.strip():
        return f"{what} is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what} holds an invalid \\u escape (a lone surrogate)"
    return None


def _check_calls(calls, i: int, role: str) -> str | None:
    """An assistant's tool calls: [{"type": "function", "function": {"name", "arguments"}}]
    (the OpenAI shape chat templates read)."""
    what = f"messages[{i}].tool_calls"
    if role != "assistant":
        return f"{what}: only assistant turns make tool calls"
    if not isinstance(calls, list):
        return f"{what} must be an array, got {_json_type(calls)}"
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not fn["name"].strip():
            return f"{what}[{k}] must be an object with function.name"
        if not isinstance(fn.get("arguments", {}), (dict, str)):
            return f"{what}[{k}].function.arguments must be an object or a JSON string"
    return None


def _check_tools(tools) -> str | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return 'field "tools" must be an array of objects (tool schemas)'
    return None


def _check_messages(msgs) -> str | None:
    if not isinstance(msgs, list):
        return f'field "messages" must be an array, got {_json_type(msgs)}'
    if not msgs:
        return 'field "messages" is empty'
    for i, m in enumerate(msgs):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            return f"messages[{i}] must be an object with role and content"
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            return (f"messages[{i}] has unknown role {_one_line(repr(m['role']), 40)} "
                    f"(expected {', '.join(ROLES)})")
        reason = _check_calls(calls, i, m["role"]) if calls is not None else None
        if not reason and not (calls and m.get("content") in (None, "")):
            reason = _check_string(m["content"], f"messages[{i}].content")
        if not reason and m.get("reasoning_content") is not None:
            reason = _check_string(m["reasoning_content"], f"messages[{i}].reasoning_content",
                                   allow_empty=True)
        if reason:
            return reason
    if not any(m["role"] == "assistant" for m in msgs):
        return "conversation has no assistant turn"
    return None


def validate(record, fmt: str) -> str | None:
    """The reason a record does not fit `fmt`, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    missing = [k for k in FORMATS[fmt] if k not in record]
    if missing:
        other = detect_format(record)
        if other:
            return f"a {other} record in a {fmt} file"
        return f"missing field(s) {', '.join(missing)}"
    if fmt == "messages":
        return _check_messages(record["messages"]) or _check_tools(record.get("tools"))
    for key in FORMATS[fmt]:
        reason = _check_string(record[key], f'field "{key}"')
        if reason:
            return reason
    if fmt == "alpaca" and record.get("input") is not None:
        return _check_string(record["input"], 'field "input"', allow_empty=True)
    return None


def _pick_format(path, entries) -> str:
    """The format of the first valid record (else the first recognisable one)."""
    found = [(detect_format(r), r) for _, r, bad in entries if bad is None]
    found = [(fmt, r) for fmt, r in found if fmt]
    fmt = next((f for f, r in found if validate(r, f) is None), found[0][0] if found else None)
    if fmt:
        return fmt
    if not entries:
        raise LorafitError(f"{path}: no records (the file is empty)")
    known = "text, prompt/completion, messages or instruction/output"
    unparsed = [f"{source}: {why}" for source, _, why in entries if why]
    if unparsed:
        more = f" (and {len(unparsed) - 1} more)" if len(unparsed) > 1 else ""
        raise LorafitError(f"{unparsed[0]}{more}; no record in a known format ({known})")
    source, record, _ = entries[0]
    seen = (f"fields {', '.join(map(str, list(record)[:6]))}" if isinstance(record, dict)
            else f"a JSON {_json_type(record)}")
    raise LorafitError(f"{source}: no record in a known format ({known}); the first holds "
                       f"{_one_line(seen, 80)}")


def _as_records(data) -> Records:
    """A Records stream for a path (any kind core/sources.py reads) or a Records itself."""
    return data if isinstance(data, Records) else open_records(str(data))


def scan(data) -> tuple[str, Iterator[tuple[object, object, str | None]]]:
    """(format, entries): the format of the first valid record (read ahead until one is
    found), then every entry as (where, record, problem or None) in order, streamed."""
    it = iter(data)
    ahead, fmt = [], None
    for entry in it:
        ahead.append(entry)
        _, record, bad = entry
        found = detect_format(record) if bad is None else None
        if found and validate(record, found) is None:
            fmt = found
            break
    if fmt is None:
        fmt = _pick_format(data, ahead)

    def entries():
        for where, record, bad in chain(ahead, it):
            yield where, record, bad or validate(record, fmt)
    return fmt, entries()


def read_records(path) -> tuple[str, list[tuple[str, dict]], list[str], int]:
    """(format, [(source, record)], problems, blank_lines): parsed and validated, in file
    order, without a tokenizer (all in memory: for small sets and tests)."""
    data = _as_records(path)
    fmt, entries = scan(data)
    good, problems = [], []
    for where, record, reason in entries:
        if reason:
            problems.append(f"{where}: {reason}")
        else:
            good.append((str(where), record))
    return fmt, good, problems, data.blank


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in POLICIES:
        raise LorafitError(f"on_bad_record must be one of {', '.join(POLICIES)}, "
                           f"got {on_bad_record!r}")


def _raise_problems(problems: list[str]) -> None:
    """One line: the first problem, how many more, and how to go on anyway."""
    more = f" (and {len(problems) - 1} more" if len(problems) > 1 else " ("
    sep = "; " if len(problems) > 1 else ""
    raise LorafitError(f"{problems[0]}{more}{sep}--on-bad-record skip drops bad records)")


def _raise_nothing_usable(path, what: str, problems: list[str]) -> None:
    hint = f"; first problem: {problems[0]}" if problems else ""
    raise LorafitError(f"{path}: no usable {what}{hint}")


def _settle(path, problems: list[str], good: int, on_bad_record: str) -> None:
    """The bad-record policy once a file's records are checked (or tokenized): any problem
    stops the run under "fail", and a file with no good record always does."""
    if problems and on_bad_record == "fail":
        _raise_problems(problems)
    if not good:
        _raise_nothing_usable(path, "records", problems)


def _read_checked(path, check) -> list:
    """Every entry (where, record, problem or None) of a file of JSON records (the other
    training formats' reader: GRPO prompts, preference pairs), each record that was read
    checked by check(record) -> reason or None. An empty file is an error. `path`: a --data
    value, or records already opened (core/sources.Records)."""
    from lorafit.core.sources import Records, open_records

    data = path if isinstance(path, Records) else open_records(str(path))
    entries = [(w, r, bad or check(r)) for w, r, bad in data]
    if not entries:
        raise LorafitError(f"{path}: no records (the file is empty)")
    return entries


def _problems_of(entries) -> list[str]:
    return [f"{w}: {why}" for w, _, why in entries if why]


def check_dataset_file(path, on_bad_record: str = "fail", method: str = "sft") -> DatasetStats:
    """Parse and validate without a tokenizer (streamed), so bad or empty data fails before
    any model is loaded. `examples`, `tokens` and friends stay 0. A preference method
    checks its own records (core/preference_data.py); the format is then their kind; GRPO
    checks prompts (core/grpo_data.py)."""
    if method == "grpo":
        from lorafit.core.grpo_data import check_prompt_file

        return DatasetStats(format="prompts", records=check_prompt_file(path, on_bad_record))
    if method != "sft":
        from lorafit.core.preference_data import check_records

        kind, good, problems = check_records(path, method, on_bad_record)
        return DatasetStats(format=kind, records=good, problems=problems)
    _check_policy(on_bad_record)
    data = _as_records(path)
    fmt, entries = scan(data)
    count, problems = 0, []
    for where, _, reason in entries:
        if reason:
            problems.append(f"{where}: {reason}")
        else:
            count += 1
    _settle(data, problems, count, on_bad_record)
    return DatasetStats(format=fmt, records=count, blank_lines=data.blank, problems=problems)


# -- tokenising ------------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    """Token ids without the tokenizer's own specials: we place bos/eos ourselves."""
    try:
        return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    except Exception as e:  # a third-party tokenizer may reject odd text in any way
        raise _BadRecord(f"the tokenizer failed ({_one_line(e)})") from None


def _special(tokenizer, name: str) -> list[int]:
    tid = getattr(tokenizer, f"{name}_token_id", None)
    return [] if tid is None else [int(tid)]


def _prompt_completion_ids(tokenizer, prompt: str, completion: str):
    """(prompt ids, completion ids). The completion is tokenized in context when the
    prompt's ids are a prefix of the whole (as text generated after the prompt would be),
    else on its own (a token merged across the boundary)."""
    p = _encode(tokenizer, prompt)
    whole = _encode(tokenizer, prompt + completion)
    if len(whole) > len(p) and whole[: len(p)] == p:
        return p, whole[len(p):]
    return p, _encode(tokenizer, completion)


def _chat_ids(tokenizer, record, train_on_prompt: bool, chat: dict):
    """(ids, loss mask) of a conversation (core/chat_mask.py)."""
    from lorafit.core.chat_mask import ChatError, chat_ids

    try:
        return chat_ids(tokenizer, record["messages"], record.get("tools"), train_on_prompt,
                        last_only=chat.get("chat_loss") == "last",
                        train_on_reasoning=bool(chat.get("train_on_reasoning")))
    except ChatError as e:
        raise _BadRecord(str(e)) from None


def _record_ids(fmt: str, record: dict, tokenizer, train_on_prompt: bool, chat: dict):
    """(ids, loss mask) of one validated record, before truncation."""
    if fmt == "messages":
        return _chat_ids(tokenizer, record, train_on_prompt, chat)
    bos, eos = _special(tokenizer, "bos"), _special(tokenizer, "eos")
    if fmt == "text":
        body = _encode(tokenizer, record["text"]) + eos
        return bos + body, [False] * len(bos) + [True] * len(body)
    if fmt == "alpaca":
        inp = record.get("input") or ""
        template = ALPACA_WITH_INPUT if inp.strip() else ALPACA_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=inp)
        completion = record["output"]
    else:
        prompt, completion = record["prompt"], record["completion"]
    p, c = _prompt_completion_ids(tokenizer, prompt, completion)
    p, c = bos + p, c + eos
    return p + c, [train_on_prompt] * len(p) + [True] * len(c)


def _check_tokenizing(fmt, tokenizer, max_seq_len) -> None:
    if max_seq_len < 2:
        raise LorafitError(f"the maximum sequence length must be at least 2, got {max_seq_len}")
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise LorafitError("messages data needs a tokenizer with a chat template; this one "
                           "has none (use prompt/completion or text data)")


def _tokenize_one(fmt, record, tokenizer, max_seq_len, train_on_prompt, chat):
    """(ids, mask, truncated) of one valid record, or raises _BadRecord. An example longer
    than max_seq_len keeps its start; one left with no loss token is a problem."""
    ids, mask = _record_ids(fmt, record, tokenizer, train_on_prompt, chat)
    mask = np.asarray(mask, dtype=bool)
    cut = len(ids) > max_seq_len
    if mask.size:
        mask[0] = False  # the first token is never predicted
    if not mask[:max_seq_len].any():
        raise _BadRecord(f"no loss tokens left after truncation to {max_seq_len} tokens (the "
                         f"example has {len(ids)}, loss starts at token "
                         f"{int(mask.argmax()) + 1})" if cut and mask.any()
                         else "no tokens to learn from")
    return np.asarray(ids[:max_seq_len], dtype=np.int32), mask[:max_seq_len], cut


def load_dataset(path, tokenizer, max_seq_len, on_bad_record="fail", train_on_prompt=False,
                 chat_loss="all", train_on_reasoning=False):
    """(examples as an ExampleSet, stats): the source read once, streamed, each record
    validated and tokenized into flat storage. Bad records fail (after counting them, still
    before any model loads) or are skipped."""
    _check_policy(on_bad_record)
    data = _as_records(path)
    fmt, entries = scan(data)
    _check_tokenizing(fmt, tokenizer, max_seq_len)
    chat = {"chat_loss": chat_loss, "train_on_reasoning": train_on_reasoning}
    build = ExampleSetBuilder()
    bad_read, bad_tokens = [], []  # problems found by reading, then by tokenizing
    records = truncated = loss_tokens = 0
    failing = on_bad_record == "fail"
    for where, record, reason in entries:
        if reason:
            bad_read.append(f"{where}: {reason}")
            continue
        records += 1
        if failing and (bad_read or bad_tokens):
            continue  # the run stops: only count what else is wrong
        try:
            ids, mask, cut = _tokenize_one(fmt, record, tokenizer, max_seq_len,
                                           train_on_prompt, chat)
        except _BadRecord as e:
            bad_tokens.append(f"{where}: {e}")
            continue
        truncated += cut
        loss_tokens += int(np.count_nonzero(mask))
        build.add(ids, mask, where)
    if failing and (bad_read or bad_tokens):
        _raise_problems(bad_read or bad_tokens)
    problems = bad_read + bad_tokens
    examples = build.finish()
    if not len(examples):
        _raise_nothing_usable(data, "examples", problems)
    stats = DatasetStats(format=fmt, records=records, examples=len(examples),
                         blank_lines=data.blank, truncated=truncated,
                         loss_tokens=loss_tokens, tokens=int(examples.tokens.size),
                         problems=problems)
    return examples, stats


def check_enough(examples, batch_size: int) -> None:
    """Fewer examples than one batch is a user error, found before the model loads."""
    if batch_size < 1:
        raise LorafitError(f"the batch size must be at least 1, got {batch_size}")
    if len(examples) < batch_size:
        raise LorafitError(f"only {len(examples)} training example(s), fewer than one batch "
                           f"of {batch_size}; add data or lower --batch-size")


def _rng(seed: int, *salt: int) -> np.random.Generator:
    """A generator keyed on the seed and a purpose, independent across purposes."""
    return np.random.default_rng([int(seed) % 2**63, *salt])


def split_validation(examples, fraction: float, seed: int):
    """(train, val): a held-out fraction (at least one example each side) that depends
    only on the seed, so a resumed run holds out the same examples. Order is kept."""
    if not fraction or fraction <= 0:
        return (examples if isinstance(examples, ExampleSet) else list(examples)), []
    if fraction >= 1:
        raise LorafitError(f"the validation fraction must be below 1, got {fraction}")
    n = len(examples)
    if n < 2:
        raise LorafitError(f"cannot hold out a validation fraction from {n} example(s)")
    n_val = min(max(1, round(n * fraction)), n - 1)
    held = np.zeros(n, dtype=bool)
    held[_rng(seed, 1).permutation(n)[:n_val]] = True
    if isinstance(examples, ExampleSet):
        return examples.subset(np.flatnonzero(~held)), examples.subset(np.flatnonzero(held))
    return ([e for i, e in enumerate(examples) if not held[i]],
            [e for i, e in enumerate(examples) if held[i]])


# -- batching --------------------------------------------------------------------------------

def _columns(examples: ExampleSet, seq_len: int) -> np.ndarray:
    """Columns each example fills in a row (L-1); none may exceed seq_len."""
    cols = examples.lengths() - 1
    over = np.flatnonzero(cols > seq_len)
    if over.size:
        k = int(over[0])
        raise LorafitError(f"{examples.source(k)}: {int(cols[k]) + 1} tokens do not fit a row "
                           f"of {seq_len}; truncate examples to the sequence length")
    return cols


def _pack(cols: list[int], order, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes to the fullest row that
    still has room. Ties keep `order`, so membership is shuffled with it, while the row
    count depends only on the lengths: the same every epoch, known in advance."""
    rows: list[list[int]] = []
    room: list[int] = []  # sorted distinct free capacities of open rows
    rows_with: dict[int, list[int]] = {}  # free capacity -> open rows
    for i in sorted(order, key=lambda i: -cols[i]):
        k = bisect_left(room, cols[i])
        if k < len(room):
            cap = room[k]
            r = rows_with[cap].pop()
            if not rows_with[cap]:
                del rows_with[cap], room[k]
        else:
            cap, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        left = cap - cols[i]
        if left > 0:
            if left not in rows_with:
                rows_with[left] = []
                insort(room, left)
            rows_with[left].append(r)
    return rows


def _assemble(examples: ExampleSet, rows, width: int, packed: bool) -> Batch:
    """Lay examples into (B, width) arrays: inputs, next-token targets, masks, positions."""
    b = len(rows)
    ids = np.zeros((b, width), np.int64)
    tgt = np.zeros((b, width), np.int64)
    mask = np.zeros((b, width), np.float32)
    pos = np.zeros((b, width), np.int64)
    seg = np.zeros((b, width), np.int32) if packed else None
    tokens, loss = examples.tokens, examples.mask
    for r, members in enumerate(rows):
        col = 0
        for s, i in enumerate(members):
            start, end = examples.span(int(i))
            n = end - start - 1
            ids[r, col:col + n] = tokens[start:end - 1]
            tgt[r, col:col + n] = tokens[start + 1:end]
            mask[r, col:col + n] = loss[start + 1:end]
            pos[r, col:col + n] = np.arange(n)
            if packed:
                seg[r, col:col + n] = s
            col += n
        if packed:
            seg[r, col:] = len(members)  # padding: a segment of its own
    return Batch(ids, tgt, mask, pos, seg)


@dataclass
class Plan:
    """One epoch's batch order as flat index arrays (a few bytes an example): batch k holds
    rows batch_starts[k]..batch_starts[k+1]; row r holds examples
    members[row_starts[r]:row_starts[r+1]]."""
    members: np.ndarray  # int64 example indices, row after row
    row_starts: np.ndarray  # int64 (rows + 1,)
    batch_starts: np.ndarray  # int64 (batches + 1,)

    def __len__(self) -> int:
        return len(self.batch_starts) - 1

    def batch_rows(self, k: int) -> list[np.ndarray]:
        """The example indices of each row of batch k."""
        r0, r1 = int(self.batch_starts[k]), int(self.batch_starts[k + 1])
        return [self.members[self.row_starts[r]:self.row_starts[r + 1]] for r in range(r0, r1)]

    def take(self, ks) -> "Plan":
        """The plan of batches ks (in that order): a share of an epoch."""
        rows = [self.batch_rows(int(k)) for k in ks]
        flat = [r for g in rows for r in g]
        return Plan(np.concatenate(flat) if flat else np.zeros(0, np.int64),
                    np.cumsum([0] + [r.size for r in flat], dtype=np.int64),
                    np.cumsum([0] + [len(g) for g in rows], dtype=np.int64))


def _packed_plan(cols, order, seq_len, batch_size, drop_last, rng) -> Plan:
    """Rows by best-fit packing, shuffled, then cut into batches."""
    rows = _pack(cols, order, seq_len)
    rows = [rows[k] for k in rng.permutation(len(rows))]
    n_batches = len(rows) // batch_size if drop_last else -(-len(rows) // batch_size)
    rows = rows[:n_batches * batch_size]
    starts = np.minimum(np.arange(n_batches + 1, dtype=np.int64) * batch_size, len(rows))
    return Plan(np.fromiter(chain.from_iterable(rows), dtype=np.int64),
                np.cumsum([0] + [len(r) for r in rows], dtype=np.int64), starts)


def _grouped_plan(cols, order, batch_size, drop_last, rng) -> Plan:
    """Batches of similar lengths: sorted (stably) within chunks of GROUP_BATCHES batches, so
    the shuffle still mixes the data, cut into batches, in shuffled order. Only the last
    batch of the data may be short (and drop_last drops it). One example a row."""
    n, chunk = len(order), GROUP_BATCHES * batch_size
    cols, order = np.asarray(cols, dtype=np.int64), np.asarray(order, dtype=np.int64)
    by_length = np.concatenate([part[np.argsort(cols[part], kind="stable")]
                                for part in np.split(order, range(chunk, n, chunk))])
    perm = rng.permutation(-(-n // batch_size))  # chunks hold whole batches: cut every bs
    sizes = np.minimum(batch_size, n - perm * batch_size)
    if drop_last:
        perm, sizes = perm[sizes == batch_size], sizes[sizes == batch_size]
    ends = np.cumsum(sizes)
    within = np.arange(int(ends[-1]) if ends.size else 0) - np.repeat(ends - sizes, sizes)
    members = by_length[np.repeat(perm * batch_size, sizes) + within]
    return Plan(members, np.arange(members.size + 1, dtype=np.int64),
                np.concatenate([[0], ends]).astype(np.int64))


def epoch_plan(examples, batch_size, seq_len, pack, seed, epoch, drop_last=False) -> Plan:
    """The batch order of one epoch, a pure function of (examples, seed, epoch).
    Unpacked: length-grouped, one example a row. Packed: rows of up to seq_len columns,
    examples whole (so the row count depends only on the lengths), rows shuffled into
    batches."""
    if batch_size < 1:
        raise LorafitError(f"the batch size must be at least 1, got {batch_size}")
    examples = ExampleSet.from_examples(examples)
    if not len(examples):
        return Plan(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))
    cols = _columns(examples, seq_len)
    rng = _rng(seed, 2, epoch)
    order = rng.permutation(len(examples))
    if pack:
        return _packed_plan(cols.tolist(), order.tolist(), seq_len, batch_size, drop_last, rng)
    return _grouped_plan(cols, order, batch_size, drop_last, rng)


class EpochBatches:
    """One epoch's batches, each built when indexed from its plan (memory: the plan and one
    batch, not a padded copy of the data)."""

    def __init__(self, examples: ExampleSet, plan: Plan, seq_len: int, packed: bool):
        self.examples, self.plan, self.seq_len, self.packed = examples, plan, seq_len, packed

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> Batch:
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        rows = self.plan.batch_rows(k)
        if self.packed:
            width = self.seq_len
        else:
            lengths = self.examples.lengths_of(np.concatenate(rows))
            width = int(lengths.max()) - 1
        return _assemble(self.examples, rows, width, self.packed)

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def make_batches(examples, batch_size, seq_len, pack, seed, epoch, drop_last=False):
    """All batches of one epoch (see epoch_plan), each built when indexed."""
    examples = ExampleSet.from_examples(examples)
    plan = epoch_plan(examples, batch_size, seq_len, pack, seed, epoch, drop_last)
    if not len(plan):
        return []
    return EpochBatches(examples, plan, seq_len, pack)


def count_batches(examples, batch_size, seq_len, pack, drop_last=False) -> int:
    """Batches per epoch without building them; the same for every seed and epoch."""
    if batch_size < 1:
        raise LorafitError(f"the batch size must be at least 1, got {batch_size}")
    n = len(examples)
    if pack and n:
        cols = _columns(ExampleSet.from_examples(examples), seq_len)
        n = len(_pack(cols.tolist(), range(len(cols)), seq_len))
    return n // batch_size if drop_last else math.ceil(n / batch_size)
