"""Training data: JSONL (or a JSON list) -> token ids + loss masks -> batches, in numpy.

Four record formats are recognised, one per file (detected from the first valid record,
then every record is checked against it):
  text               {"text": ...}                          loss on every token
  prompt_completion  {"prompt": ..., "completion": ...}     loss on the completion
  messages           {"messages": [{"role", "content"}...]} loss on assistant turns
  alpaca             {"instruction", "input"?, "output"}    loss on the output
Problems are reported as `file:line: reason`; `on_bad_record` decides whether they stop
the run (before any model is loaded) or are skipped.

Shift convention: an example of L tokens gives L-1 (input, target) pairs; in a batch row,
column t holds input x_t and target x_{t+1}. Padding columns hold token 0 with no loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafit.core.errors import LorafitError

FORMATS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
}
ROLES = ("system", "user", "assistant", "tool")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that "
                     "provides further context. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                     "### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                   "### Response:\n")


@dataclass
class Example:
    input_ids: np.ndarray  # int32 (L,)
    loss_mask: np.ndarray  # bool (L,): token i is a target (predicted from tokens < i)
    source: str  # "file:line"


@dataclass
class DatasetStats:
    format: str
    records: int
    examples: int = 0
    blank_lines: int = 0
    truncated: int = 0
    loss_tokens: int = 0
    tokens: int = 0
    problems: list = field(default_factory=list)


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 (B, T)
    targets: np.ndarray  # int64 (B, T)
    loss_mask: np.ndarray  # float32 (B, T)
    positions: np.ndarray  # int64 (B, T), reset per packed example
    segment_ids: np.ndarray | None  # int32 (B, T) when packed
    n_tokens: int  # loss tokens


# -- reading and validating ----------------------------------------------------------------

def detect_format(record: dict) -> str | None:
    for name, keys in FORMATS.items():
        if all(k in record for k in keys):
            return name
    return None


def _nonempty_str(record, key) -> str | None:
    v = record.get(key)
    if not isinstance(v, str):
        return f'field "{key}" must be a string, got {type(v).__name__}'
    if not v.strip():
        return f'field "{key}" is empty'
    return None


def validate(record, fmt: str) -> str | None:
    """The reason a record does not fit `fmt`, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    found = detect_format(record)
    if found != fmt:
        if found is None:
            return f"missing field(s) {', '.join(k for k in FORMATS[fmt] if k not in record)}"
        return f"a {found} record in a {fmt} file"
    if fmt == "messages":
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return 'field "messages" must be a non-empty list'
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return f"message {i} needs role and content"
            if m["role"] not in ROLES:
                return f"message {i} has unknown role {m['role']!r}"
            if not isinstance(m["content"], str):
                return f"message {i} content must be a string"
            if m["role"] == "assistant" and not m["content"].strip():
                return f"message {i} (assistant) is empty"
        if not any(m["role"] == "assistant" for m in msgs):
            return "conversation has no assistant turn"
        return None
    keys = FORMATS[fmt]
    for k in keys:
        reason = _nonempty_str(record, k)
        if reason:
            return reason
    if fmt == "alpaca" and record.get("input") is not None and not isinstance(record["input"], str):
        return 'field "input" must be a string'
    return None


def _raw_records(path: Path) -> tuple[list[tuple[str, object]], list[str], int]:
    """[(source, parsed or exception text)], problems, blank lines."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LorafitError(f"{path}: no such data file") from None
    except UnicodeDecodeError as e:
        raise LorafitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    name = str(path)
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise LorafitError(f"{name}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise LorafitError(f"{name}: a .json data file must hold a list of records")
        return [(f"{name}: record {i}", r) for i, r in enumerate(items, 1)], [], 0
    out, problems, blank = [], [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            blank += 1
            continue
        try:
            out.append((f"{name}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{name}:{lineno}: malformed JSON ({e.msg})")
    return out, problems, blank


def read_records(path) -> tuple[str, list[tuple[str, dict]], list[str], int]:
    """(format, [(source, record)], problems, blank_lines): parsed and validated."""
    path = Path(path)
    raw, problems, blank = _raw_records(path)
    fmt = next((detect_format(r) for _, r in raw
                if isinstance(r, dict) and detect_format(r)), None)
    if fmt is None:
        if not raw and not problems:
            raise LorafitError(f"{path}: no records (empty file)")
        raise LorafitError(f"{path}: no record in a known format (text, prompt/completion, "
                           "messages or instruction/output)"
                           + (f"; first problem: {problems[0]}" if problems else ""))
    good = []
    for source, record in raw:
        reason = validate(record, fmt)
        if reason:
            problems.append(f"{source}: {reason}")
        else:
            good.append((source, record))
    problems.sort(key=_source_order)
    return fmt, good, problems, blank


def _source_order(problem: str):
    head = problem.split(": ", 1)[0]
    try:
        return int(head.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def _raise_problems(problems: list[str]) -> None:
    more = f" (and {len(problems) - 1} more; --on-bad-record skip drops them)" \
        if len(problems) > 1 else " (--on-bad-record skip drops it)"
    raise LorafitError(problems[0] + more)


def check_dataset_file(path, on_bad_record: str = "fail") -> DatasetStats:
    """Parse and validate without a tokenizer: fails early, before any model is loaded."""
    fmt, good, problems, blank = read_records(path)
    if problems and on_bad_record == "fail":
        _raise_problems(problems)
    if not good:
        raise LorafitError(f"{path}: no usable records")
    return DatasetStats(format=fmt, records=len(good), blank_lines=blank, problems=problems)


# -- tokenising ------------------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _pieces(fmt: str, record: dict, tokenizer, train_on_prompt: bool):
    """[(token ids, carries loss)] for one record."""
    if fmt == "text":
        return [(_bos(tokenizer), False), (_ids(tokenizer, record["text"]) + _eos(tokenizer), True)]
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
    elif fmt == "alpaca":
        inp = record.get("input") or ""
        template = ALPACA_WITH_INPUT if inp.strip() else ALPACA_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=inp)
        completion = record["output"]
    else:
        return _chat_pieces(record["messages"], tokenizer, train_on_prompt)
    return [(_bos(tokenizer) + _ids(tokenizer, prompt), train_on_prompt),
            (_ids(tokenizer, completion) + _eos(tokenizer), True)]


def _render(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))


def _chat_pieces(messages, tokenizer, train_on_prompt):
    """Split the rendered chat at each message boundary; assistant parts carry loss.
    Relies on the template rendering a conversation's prefix as a token prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorafitError("messages data needs a tokenizer with a chat template")
    pieces, previous = [], []
    for i in range(len(messages)):
        ids = _render(tokenizer, messages[: i + 1])
        if ids[: len(previous)] != previous:
            raise LorafitError("the chat template does not render conversations "
                               "incrementally; loss masks cannot be placed (use "
                               "--train-on-prompt or prompt/completion data)")
        loss = train_on_prompt or messages[i]["role"] == "assistant"
        pieces.append((ids[len(previous):], loss))
        previous = ids
    return pieces


def tokenize_records(fmt, records, tokenizer, max_seq_len, train_on_prompt=False):
    """(examples, problems, truncated count)."""
    examples, problems, truncated = [], [], 0
    for source, record in records:
        ids, mask = [], []
        for piece, loss in _pieces(fmt, record, tokenizer, train_on_prompt):
            ids += piece
            mask += [loss] * len(piece)
        if len(ids) > max_seq_len:
            truncated += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        mask_arr = np.asarray(mask, dtype=bool)
        if mask_arr.size:
            mask_arr[0] = False  # the first token is never predicted
        if len(ids) < 2 or not mask_arr.any():
            problems.append(f"{source}: no loss tokens left after truncation to "
                            f"{max_seq_len} tokens")
            continue
        examples.append(Example(np.asarray(ids, dtype=np.int32), mask_arr, source))
    return examples, problems, truncated


def load_dataset(path, tokenizer, max_seq_len, on_bad_record="fail", train_on_prompt=False):
    """(examples, stats) from a data file; bad records fail or are skipped."""
    fmt, records, problems, blank = read_records(path)
    if problems and on_bad_record == "fail":
        _raise_problems(problems)
    examples, more, truncated = tokenize_records(fmt, records, tokenizer, max_seq_len,
                                                 train_on_prompt)
    if more and on_bad_record == "fail":
        _raise_problems(more)
    problems += more
    if not examples:
        raise LorafitError(f"{path}: no usable examples")
    stats = DatasetStats(format=fmt, records=len(records), examples=len(examples),
                         blank_lines=blank, truncated=truncated,
                         loss_tokens=int(sum(e.loss_mask.sum() for e in examples)),
                         tokens=int(sum(e.input_ids.size for e in examples)),
                         problems=problems)
    return examples, stats


def check_enough(examples, batch_size: int) -> None:
    if len(examples) < batch_size:
        raise LorafitError(f"only {len(examples)} training example(s), fewer than one batch "
                           f"of {batch_size}; add data or lower --batch-size")


def split_validation(examples, fraction: float, seed: int):
    """(train, val): a deterministic held-out fraction (at least one example each)."""
    if not 0 < fraction < 1:
        return list(examples), []
    order = np.random.default_rng(seed + 7919).permutation(len(examples))
    n_val = min(max(1, int(round(len(examples) * fraction))), len(examples) - 1)
    val_idx = set(order[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in val_idx],
            [e for i, e in enumerate(examples) if i in val_idx])


# -- batching --------------------------------------------------------------------------------

def _rows_unpacked(examples, order, batch_size, rng):
    """Length-grouped batches: sort within chunks of 50 batches, then shuffle batch order."""
    chunk = batch_size * 50
    groups = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: examples[i].input_ids.size)
        groups += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [groups[i] for i in rng.permutation(len(groups))]


def _pack(examples, order, seq_len):
    """Greedy packing of whole examples into rows of at most seq_len + 1 tokens."""
    rows, row, used = [], [], 0
    for i in order:
        n = examples[i].input_ids.size
        if row and used + n > seq_len + 1:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def _assemble(examples, rows: list[list[int]], width: int, packed: bool) -> Batch:
    b = len(rows)
    ids = np.zeros((b, width), np.int64)
    tgt = np.zeros((b, width), np.int64)
    mask = np.zeros((b, width), np.float32)
    pos = np.zeros((b, width), np.int64)
    seg = np.zeros((b, width), np.int32) if packed else None
    for r, members in enumerate(rows):
        col = 0
        for s, i in enumerate(members):
            e = examples[i]
            n = e.input_ids.size - 1
            ids[r, col:col + n] = e.input_ids[:-1]
            tgt[r, col:col + n] = e.input_ids[1:]
            mask[r, col:col + n] = e.loss_mask[1:]
            pos[r, col:col + n] = np.arange(n)
            if packed:
                seg[r, col:col + n] = s
            col += n
        if packed:
            seg[r, col:] = len(members)  # padding: its own segment
    return Batch(ids, tgt, mask, pos, seg, int(mask.sum()))


def make_batches(examples, batch_size, seq_len, pack, seed, epoch, drop_last=False):
    """All batches of one epoch, a pure function of (examples, seed, epoch)."""
    if not examples:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples)).tolist()
    if pack:
        rows = _pack(examples, order, seq_len)
        groups = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        groups = [g for g in groups if not drop_last or len(g) == batch_size]
        return [_assemble(examples, g, seq_len, True) for g in groups]
    groups = _rows_unpacked(examples, order, batch_size, rng)
    if drop_last:
        groups = [g for g in groups if len(g) == batch_size]
    return [_assemble(examples, [[i] for i in g],
                      max(examples[i].input_ids.size for i in g) - 1, False) for g in groups]


def count_batches(examples, batch_size, seq_len, pack) -> int:
    if pack:
        return -(-len(_pack(examples, list(range(len(examples))), seq_len)) // batch_size)
    return -(-len(examples) // batch_size)
