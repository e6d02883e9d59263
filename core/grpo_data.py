"""GRPO prompts: `{"prompt": str | messages}` records -> prompt token ids, in numpy.

A string prompt is bos + its tokens; a list of messages is rendered with the chat template
and the generation prompt (the completion is sampled after it). Problems are
`file:line: reason`, found before any weights load (core/data.py's policy); a prompt that
leaves no room for --max-new-tokens within --seq-len is one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorafit.core import data as sft_data
from lorafit.core.examples import ExampleSet, ExampleSetBuilder
from lorafit.core.preference_data import _check_turns


@dataclass
class PromptSet:
    """Tokenized prompts: example k holds prompt k's ids (no loss positions); prompts[k]
    is the record's prompt as given (what the reward function sees)."""
    examples: ExampleSet
    prompts: list

    def __len__(self) -> int:
        return len(self.examples)


def validate(record) -> str | None:
    """The reason a record is not a GRPO prompt, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {sft_data._json_type(record)}"
    if "prompt" not in record:
        return "missing field prompt"
    return _check_turns(record["prompt"], "prompt", None)


def scan(path) -> list:
    """Every entry (where, record, problem or None) of the file. `path`: a --data value,
    or records already opened (core/sources.py: --columns renamed)."""
    return sft_data._read_checked(path, validate)


def check_prompt_file(path, on_bad_record: str = "fail") -> int:
    """Parse and validate without a tokenizer: bad data stops before the model loads.
    Returns the count of good records."""
    sft_data._check_policy(on_bad_record)
    entries = scan(path)
    problems = sft_data._problems_of(entries)
    good = len(entries) - len(problems)
    sft_data._settle(path, problems, good, on_bad_record)
    return good


def prompt_ids(tokenizer, prompt) -> list:
    """The ids a completion is sampled after (see the module docstring)."""
    if isinstance(prompt, str):
        return sft_data._special(tokenizer, "bos") + \
            list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise sft_data._BadRecord("message lists need a tokenizer with a chat template")
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def load_prompts(path, tokenizer, seq_len: int, max_new_tokens: int,
                 on_bad_record: str = "fail") -> tuple[PromptSet, list[str]]:
    """(the tokenized prompts, problems): bad records fail the run or are skipped."""
    sft_data._check_policy(on_bad_record)
    room = seq_len - max_new_tokens
    build, prompts, problems = ExampleSetBuilder(), [], []
    for where, record, reason in scan(path):
        if not reason:
            try:
                ids = prompt_ids(tokenizer, record["prompt"])
            except sft_data._BadRecord as e:
                ids, reason = None, str(e)
            if ids is not None and not ids:
                reason = "the prompt is empty after tokenisation"
            elif ids is not None and len(ids) > room:
                reason = f"the prompt has {len(ids)} tokens: with --max-new-tokens " \
                         f"{max_new_tokens} it does not fit --seq-len {seq_len}"
        if reason:
            problems.append(f"{where}: {reason}")
            continue
        build.add(np.asarray(ids, np.int32), np.zeros(len(ids), bool), where)
        prompts.append(record["prompt"])
    examples = build.finish()
    sft_data._settle(path, problems, len(examples), on_bad_record)
    return PromptSet(examples, prompts), problems
