"""Which tokens of a conversation carry loss: the assistant turns, found in the full
rendering of the conversation without assuming that a template renders a conversation's
prefixes as prefixes (Qwen3 drops earlier turns' <think> blocks; Mistral v0.3 moves the
system prompt into the last user turn).

Two ways, best first:
- The template marks assistant text with `{% generation %}` blocks: transformers returns
  the mask itself (apply_chat_template(return_assistant_tokens_mask=True)).
- Otherwise each assistant turn is located by rendering the conversation again with that
  turn's text replaced by a sentinel: the two renderings differ exactly where the turn's
  text sits, whatever the template does to the other turns. A turn with tool calls starts
  right after its role header (the generation prompt), so the call's wrapper is learned.
  Each span then runs through the end-of-turn special token that follows it (`<|im_end|>`,
  `<|eot_id|>`, `</s>`), and character spans become tokens through the tokenizer's offsets.

Reasoning (`reasoning_content`) is rendered or dropped as the template does; loss covers it
only with `train_on_reasoning` (and only where the template keeps it).
"""

from __future__ import annotations

import copy

SENTINEL = "LoRaFiTsPaN{}x"  # ASCII: survives tojson and trim; never in real data
MAX_TAIL = 64  # tokens after a turn searched for its end-of-turn special token


class ChatError(Exception):
    """A conversation whose turns cannot be rendered or located: a record problem."""


def _one_line(text, limit=200) -> str:
    from lorafit.core.sources import one_line

    return one_line(text, limit)


def render(tokenizer, messages, tools=None, generation_prompt: bool = False) -> str:
    kw = {"tools": tools} if tools else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt, **kw)
    except Exception as e:  # templates raise on conversations they do not accept
        raise ChatError(f"the chat template failed ({_one_line(e)})") from None


def has_generation_marks(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "generation %}" in template


def _encode(tokenizer, text: str):
    """(ids, character offsets) of a rendering, specials placed by the template."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ChatError("the tokenizer gives no character offsets (a slow tokenizer); use a "
                        "fast one (tokenizer.json) or --train-on-prompt") from None
    except Exception as e:
        raise ChatError(f"the tokenizer failed ({_one_line(e)})") from None
    return [int(t) for t in enc["input_ids"]], [tuple(o) for o in enc["offset_mapping"]]


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _sentinel_call(call, k: int, turn: int):
    """A tool call of the same shape with its name and argument values replaced."""
    call = copy.deepcopy(call)
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict):
        fn["name"] = SENTINEL.format(f"{turn}n{k}")
        args = fn.get("arguments")
        if isinstance(args, dict):
            fn["arguments"] = {a: SENTINEL.format(f"{turn}a{k}") for a in args} or \
                {"x": SENTINEL.format(f"{turn}a{k}")}
        else:
            fn["arguments"] = SENTINEL.format(f"{turn}a{k}")
    return call


def _diff(full: str, other: str) -> tuple[int, int]:
    """(start, end) in `full` of what differs from `other` (common prefix and suffix cut)."""
    n = min(len(full), len(other))
    start = next((k for k in range(n) if full[k] != other[k]), n)
    tail = 0
    while tail < n - start and full[-1 - tail] == other[-1 - tail]:
        tail += 1
    return start, len(full) - tail


def _kept_reasoning(content, reasoning: bool) -> str:
    """The inline `<think>...</think>` block that opens a turn's text (Qwen3-style data
    keeps reasoning in the content), kept in front of the sentinel unless reasoning is
    trained: the template then renders or drops it alike in both renderings, so it stays
    out of the difference, as `reasoning_content` does."""
    if reasoning or not isinstance(content, str) or "</think>" not in content:
        return ""
    return content[:content.rfind("</think>") + len("</think>")]


def _turn_span(tokenizer, messages, tools, i: int, full: str, reasoning: bool):
    """(start, end) characters of assistant message i's generated text in `full`."""
    m = messages[i]
    marker = _kept_reasoning(m.get("content"), reasoning) + SENTINEL.format(i)
    variant = dict(m, content=marker)
    if reasoning and isinstance(m.get("reasoning_content"), str):
        variant["reasoning_content"] = SENTINEL.format(f"{i}r")
    if m.get("tool_calls"):
        variant["tool_calls"] = [_sentinel_call(c, k, i) for k, c in enumerate(m["tool_calls"])]
    other = render(tokenizer, messages[:i] + [variant] + messages[i + 1:], tools)
    seen = other.count(SENTINEL.format(i))
    if seen == 0 and m.get("tool_calls"):  # a template may skip a calling turn's content
        seen = int(SENTINEL.format(f"{i}n0") in other)
    if seen != 1:
        raise ChatError(f"messages[{i}]: the chat template does not render this assistant "
                        "turn once, so its tokens cannot be found; use --train-on-prompt")
    start, end = _diff(full, other)
    if m.get("tool_calls"):  # the calls' wrapper ([TOOL_CALLS], <tool_call>) is generated too
        start = min(start, _calls_start(tokenizer, messages, tools, i, full, marker, start))
    return start, end


def _calls_start(tokenizer, messages, tools, i, full, marker, start) -> int:
    """Where a turn with tool calls starts: where it differs from the same turn holding
    text only (`marker`: the kept reasoning, then the sentinel), else right after the role
    header."""
    plain = {k: v for k, v in messages[i].items() if k != "tool_calls"}
    plain["content"] = marker
    try:
        other = render(tokenizer, messages[:i] + [plain] + messages[i + 1:], tools)
    except ChatError:
        other = None
    if other is not None and other.count(SENTINEL.format(i)) == 1:
        return _diff(full, other)[0]
    header = _generation_header(tokenizer, messages[:i], tools)
    at = full.rfind(header, 0, start + 1) if header else -1
    return at + len(header) if at >= 0 else start


def _generation_header(tokenizer, history, tools) -> str:
    """What the template adds for a model to start answering (its role header)."""
    if not history:
        return ""
    with_prompt = render(tokenizer, history, tools, generation_prompt=True)
    without = render(tokenizer, history, tools)
    n = 0
    while n < min(len(with_prompt), len(without)) and with_prompt[n] == without[n]:
        n += 1
    return with_prompt[n:]


def _marked_mask(tokenizer, messages, tools, ids_len: int):
    kw = {"tools": tools} if tools else {}
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **kw)
    except Exception as e:
        raise ChatError(f"the chat template failed ({_one_line(e)})") from None
    mask = [bool(x) for x in out["assistant_masks"]]
    if len(mask) != ids_len:
        raise ChatError("the template's assistant mask does not match its tokens")
    return mask


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for k, on in enumerate(mask + [False]):
        if on and start is None:
            start = k
        elif not on and start is not None:
            runs.append((start, k))
            start = None
    return runs


def chat_ids(tokenizer, messages, tools=None, train_on_prompt: bool = False,
             last_only: bool = False, train_on_reasoning: bool = False):
    """(ids, loss mask) of a conversation: the full rendering's tokens, loss on the
    assistant turns (all, or the last only)."""
    full = render(tokenizer, messages, tools)
    ids, offsets = _encode(tokenizer, full)
    if train_on_prompt:
        return ids, [True] * len(ids)
    if has_generation_marks(tokenizer):
        mask = _marked_mask(tokenizer, messages, tools, len(ids))
        if last_only:
            runs = _runs(mask)
            mask = [False] * len(ids)
            for k in range(*runs[-1]) if runs else ():
                mask[k] = True
        return ids, mask
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    spans = [_turn_span(tokenizer, messages, tools, i, full, train_on_reasoning)
             for i in turns]
    specials = _special_ids(tokenizer)
    header = _generation_header(tokenizer, messages[:turns[-1]], tools) if turns else ""
    openers = {t for t in _encode(tokenizer, header)[0] if t in specials} if header else set()
    return ids, _span_mask(ids, offsets, spans, specials - openers, openers)


def _span_mask(ids, offsets, spans, enders, openers) -> list[bool]:
    """Tokens overlapping each span, then through the end-of-turn special token that
    follows (within MAX_TAIL tokens, before the next span and before a special token that
    opens a turn: a template without an end-of-turn token gets none)."""
    mask = [False] * len(ids)
    starts = sorted(s for s, _ in spans)
    for s, e in spans:
        if e <= s:
            continue  # the template left this turn out
        last = None
        for k, (a, b) in enumerate(offsets):
            if b > s and a < e or (a == b and s <= a < e):
                mask[k] = True
                last = k
        if last is None:
            continue
        limit = next((x for x in starts if x >= e), None)
        for k in range(last + 1, min(len(ids), last + 1 + MAX_TAIL)):
            if limit is not None and offsets[k][0] >= limit:
                break
            if ids[k] in openers:
                break
            if ids[k] in enders:
                for j in range(last + 1, k + 1):
                    mask[j] = True
                break
    return mask
