"""Preference data: records -> token ids + completion masks -> batches of pairs, in numpy.

Two record kinds, one per file (detected from the first record that has either's keys):
  pairs     {"prompt", "chosen", "rejected"}     DPO and ORPO
  labelled  {"prompt", "completion", "label"}    KTO (label true: desirable)
The prompt is a string or a list of messages; the completions are strings or lists of
assistant messages (rendered after the prompt with the chat template, loss on the last
assistant turn). Loss, and the sequence log-probabilities, cover only completion tokens.
Problems are `file:line: reason`, found before any weights load (core/data.py's policy).

Storage: one `ExampleSet`; a pair is examples 2k (chosen) and 2k + 1 (rejected). A batch of
B pairs has 2B rows, the B chosen first, then their B rejected in the same order (TRL's
layout), padded together to the longest. Pairs are never packed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lorafit.core import data as sft_data
from lorafit.core.data import Batch, _assemble, _BadRecord, _json_type, _rng
from lorafit.core.errors import LorafitError
from lorafit.core.examples import Example, ExampleSet, ExampleSetBuilder

KINDS = {"pairs": ("prompt", "chosen", "rejected"), "labelled": ("prompt", "completion", "label")}
METHOD_KIND = {"dpo": "pairs", "orpo": "pairs", "kto": "labelled"}


@dataclass
class PreferenceSet:
    """Tokenized preference data. pairs: examples 2k and 2k + 1 are pair k's chosen and
    rejected; labelled: one example a record, labels[k] True for a desirable one."""
    kind: str
    examples: ExampleSet
    labels: np.ndarray | None = None  # bool, labelled data only
    records: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        """Pairs (or labelled completions)."""
        n = len(self.examples)
        return n // 2 if self.kind == "pairs" else n

    def subset(self, ks) -> "PreferenceSet":
        ks = np.asarray(ks, dtype=np.int64)
        rows = np.stack([2 * ks, 2 * ks + 1], 1).reshape(-1) if self.kind == "pairs" else ks
        return PreferenceSet(self.kind, self.examples.subset(rows),
                             None if self.labels is None else self.labels[ks])


def _kind_of(record) -> str | None:
    if not isinstance(record, dict):
        return None
    return next((k for k, keys in KINDS.items() if all(f in record for f in keys)), None)


def _check_turns(value, what: str, roles: tuple | None) -> str | None:
    if isinstance(value, str):
        return sft_data._check_string(value, f'field "{what}"')
    if not isinstance(value, list) or not value:
        return f'field "{what}" must be a string or a non-empty list of messages, got ' \
               f"{_json_type(value)}"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in (roles or sft_data.ROLES):
            want = "an assistant" if roles else "a"
            return f"{what}[{i}] must be {want} message with role and content"
    return None


def validate(record, kind: str) -> str | None:
    """The reason a record does not fit `kind`, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    missing = [k for k in KINDS[kind] if k not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    reason = _check_turns(record["prompt"], "prompt", None)
    for key in KINDS[kind][1:]:
        if key == "label":
            if not reason and not isinstance(record["label"], bool):
                reason = f'field "label" must be true or false, got {_json_type(record["label"])}'
        elif not reason:
            reason = _check_turns(record[key], key, ("assistant",))
    if not reason and kind == "pairs" and record["chosen"] == record["rejected"]:
        reason = "chosen and rejected are the same"
    return reason


def scan(path, method: str):
    """(kind, entries): every entry (where, record, problem or None) of the file, checked
    against the kind `method` needs. `path`: a --data value, or records already opened
    (core/sources.py: --columns renamed, a folder's train or valid split)."""
    kind = METHOD_KIND[method]

    def check(record) -> str | None:
        found = _kind_of(record)
        if found and found != kind:
            return f"a {found} record ({', '.join(KINDS[found])}) but --method {method} " \
                   f"needs {', '.join(KINDS[kind])}"
        return validate(record, kind)

    return kind, sft_data._read_checked(path, check)


def check_records(path, method: str, on_bad_record: str = "fail") -> tuple[str, int, list]:
    """(kind, good records, problems) without a tokenizer. A file none of whose records
    has a preference kind's keys (SFT data under --method dpo) is one line, not a problem
    for every record."""
    sft_data._check_policy(on_bad_record)
    kind, entries = scan(path, method)
    if not any(_kind_of(record) for _, record, _ in entries):
        raise LorafitError(f"{path}: no {kind} records: --method {method} needs "
                           f"{', '.join(KINDS[kind])} fields (SFT data trains with "
                           "--method sft)")
    problems = sft_data._problems_of(entries)
    good = len(entries) - len(problems)
    sft_data._settle(path, problems, good, on_bad_record)
    return kind, good, problems


def check_preference_file(path, method: str, on_bad_record: str = "fail") -> int:
    """Parse and validate without a tokenizer: bad data stops before the model loads.
    Returns the count of good records."""
    return check_records(path, method, on_bad_record)[1]


# -- tokenizing ------------------------------------------------------------------------------

def _as_messages(value, role: str) -> list:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def completion_ids(tokenizer, prompt, completion, max_seq_len: int):
    """(ids, mask, truncated) of prompt + completion, mask on the completion's tokens (the
    first token never). Strings: bos + prompt + completion + eos, the completion tokenized
    in context (as core/data.py does); messages: the chat template, loss on the last
    assistant turn."""
    if isinstance(prompt, str) and isinstance(completion, str):
        bos, eos = sft_data._special(tokenizer, "bos"), sft_data._special(tokenizer, "eos")
        p, c = sft_data._prompt_completion_ids(tokenizer, prompt, completion)
        p, c = bos + p, c + eos
        ids, mask = p + c, [False] * len(p) + [True] * len(c)
    else:
        from lorafit.core.chat_mask import ChatError, chat_ids

        if not getattr(tokenizer, "chat_template", None):
            raise _BadRecord("message lists need a tokenizer with a chat template")
        msgs = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
        try:
            ids, mask = chat_ids(tokenizer, msgs, None, False, last_only=True)
        except ChatError as e:
            raise _BadRecord(str(e)) from None
    mask = np.asarray(mask, dtype=bool)
    if mask.size:
        mask[0] = False
    cut = len(ids) > max_seq_len
    if not mask[:max_seq_len].any():
        raise _BadRecord(f"no completion tokens left after truncation to {max_seq_len} tokens"
                         if cut else "no completion tokens")
    return np.asarray(ids[:max_seq_len], dtype=np.int32), mask[:max_seq_len], cut


def load_preferences(path, tokenizer, max_seq_len: int, method: str,
                     on_bad_record: str = "fail") -> tuple[PreferenceSet, list[str]]:
    """(the tokenized set, problems): bad records fail the run or are skipped."""
    sft_data._check_policy(on_bad_record)
    if max_seq_len < 2:
        raise LorafitError(f"the maximum sequence length must be at least 2, got {max_seq_len}")
    kind, entries = scan(path, method)
    build, labels, problems, truncated, records = ExampleSetBuilder(), [], [], 0, 0
    for where, record, reason in entries:
        if reason:
            problems.append(f"{where}: {reason}")
            continue
        records += 1
        keys = ("chosen", "rejected") if kind == "pairs" else ("completion",)
        try:
            parts = [completion_ids(tokenizer, record["prompt"], record[k], max_seq_len)
                     for k in keys]
        except _BadRecord as e:
            problems.append(f"{where}: {e}")
            continue
        for ids, mask, cut in parts:
            build.add(ids, mask, where)
            truncated += cut
        if kind == "labelled":
            labels.append(bool(record["label"]))
    examples = build.finish()
    sft_data._settle(path, problems, len(examples), on_bad_record)
    pset = PreferenceSet(kind, examples, np.asarray(labels, bool) if labels else None,
                         records, truncated)
    return pset, problems


# -- batching --------------------------------------------------------------------------------

class LabelledBatch(NamedTuple):
    """KTO: B completions, their labels, and the B mismatched rows (prompt i with completion
    i - 1 of the batch, cycled as TRL does) whose log-ratio estimates the KL term."""
    batch: Batch
    kl: Batch
    labels: np.ndarray  # bool (B,)

    @property
    def input_ids(self):
        return self.batch.input_ids


def _mismatched(examples: ExampleSet, ks) -> ExampleSet:
    """Prompt of example ks[i] followed by the completion of ks[i - 1]."""
    parts = [examples[int(k)] for k in ks]
    starts = [int(np.argmax(e.loss_mask)) for e in parts]
    out = []
    for i, e in enumerate(parts):
        j = (i - 1) % len(parts)
        c = parts[j]
        out.append(Example(np.concatenate([e.input_ids[:starts[i]], c.input_ids[starts[j]:]]),
                           np.concatenate([np.zeros(starts[i], bool), c.loss_mask[starts[j]:]]),
                           e.source))
    return ExampleSet.from_examples(out)


def preference_batches(pset: PreferenceSet, batch_size: int, seed: int, epoch: int) -> list:
    """One epoch's batches, a pure function of (data, seed, epoch): B pairs shuffled
    together -> 2B rows (chosen block, then rejected block). Labelled data: B completions a
    batch, one a row."""
    n = len(pset)
    if not n:
        return []
    order = _rng(seed, 2, epoch).permutation(n)
    groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [_batch(pset, g) for g in groups]


def _batch(pset: PreferenceSet, ks) -> Batch:
    if pset.kind == "pairs":
        rows = [[2 * int(k)] for k in ks] + [[2 * int(k) + 1] for k in ks]
    else:
        rows = [[int(k)] for k in ks]
    batch = _padded(pset.examples, rows)
    if pset.kind == "pairs":
        return batch
    kl = _mismatched(pset.examples, ks)
    return LabelledBatch(batch, _padded(kl, [[i] for i in range(len(kl))]), pset.labels[ks])


def _padded(examples: ExampleSet, rows) -> Batch:
    width = int(examples.lengths_of([r[0] for r in rows]).max()) - 1
    return _assemble(examples, rows, width, False)
