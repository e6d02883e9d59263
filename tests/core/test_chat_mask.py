"""Chat masking without the prefix assumption: templates written here behave like Qwen3's
(earlier turns lose their <think> blocks), Mistral v0.3's (the system prompt joins the last
user turn) and Llama 3's (role headers); the loss mask must be exactly the assistant turns'
tokens. Each expectation is written out by hand as (text, loss) pieces."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
from tokenizers import AddedToken

from lorafit.core.chat_mask import chat_ids
from lorafit.core.data import load_dataset
from lorafit.models.tiny import char_tokenizer

QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>"
    "{%- for t in tools %}{{ '\\n' }}{{ t | tojson }}{%- endfor %}{{ '\\n' }}</tools>"
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content or '' %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is string %}{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "<|im_start|>assistant\n"
    "{%- if loop.index0 > ns.last_user %}<think>\n{{ reasoning }}\n</think>\n\n{%- endif %}"
    "{{ content }}"
    "{%- for c in m.tool_calls or [] %}{%- if content or not loop.first %}{{ '\\n' }}"
    "{%- endif %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}"
    "<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")

MISTRAL_V03 = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in loop_messages %}{%- if m.role == 'user' %}{%- set ns.last_user = "
    "loop.index0 %}{%- endif %}{%- endfor %}"
    "<s>"
    "{%- for m in loop_messages %}"
    "{%- if m.role == 'user' %}"
    "{%- if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- if loop.index0 == ns.last_user and system is defined %}"
    "[INST] {{ system }}\n\n{{ m.content }}[/INST]"
    "{%- else %}[INST] {{ m.content }}[/INST]{%- endif %}"
    "{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS]["
    "{%- for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}{%- if not loop.last %}, {% endif %}{%- endfor %}]"
    "</s>"
    "{%- elif m.role == 'assistant' %} {{ m.content }}</s>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{\"content\": {{ m.content | tojson }}}"
    "[/TOOL_RESULTS]"
    "{%- endif %}{%- endfor %}")

LLAMA3 = (
    "<|begin_of_text|>"
    "{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- endif %}")

CHATML_MARKED = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{%- else %}{{ m.content }}<|im_end|>{%- endif %}{{ '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")

# written without whitespace control (transformers renders with trim_blocks: a newline
# right after a block tag is dropped)
QWEN3, MISTRAL_V03, LLAMA3, CHATML_MARKED = (t.replace("{%-", "{%") for t in (
    QWEN3, MISTRAL_V03, LLAMA3, CHATML_MARKED))

SPECIALS = ["<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_tokenizer(template):
    tok = char_tokenizer(string.printable)
    tok.add_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.chat_template = template
    return tok


def expect(tok, pieces):
    """(ids, mask) from hand-written (text, loss) pieces; the char tokenizer is
    concatenative, so pieces tokenize on their own."""
    ids, mask = [], []
    for text, loss in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        mask += [loss] * len(part)
    return ids, mask


def check(tok, messages, pieces, **kw):
    ids, mask = chat_ids(tok, messages, kw.pop("tools", None), **kw)
    want_ids, want_mask = expect(tok, pieces)
    assert ids == want_ids, (tok.decode(ids), tok.decode(want_ids))
    got = [tok.decode([t]) + ("*" if m else "") for t, m in zip(ids, mask)]
    want = [tok.decode([t]) + ("*" if m else "") for t, m in zip(want_ids, want_mask)]
    assert got == want  # token by token: * marks a loss token


CHAT = [{"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add them"}]


def test_qwen3_like_template_drops_earlier_thinking_and_masks_exact_turns():
    tok = make_tokenizer(QWEN3)
    # not a prefix: the first turn renders with a <think> block only while it is the last
    prefix = tok.apply_chat_template(CHAT[:2], tokenize=False)
    assert not tok.apply_chat_template(CHAT, tokenize=False).startswith(prefix)
    head = [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
            ("hello<|im_end|>", True),
            ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False)]
    check(tok, CHAT, head + [("<think>\nadd them\n</think>\n\n", False),
                             ("4<|im_end|>", True), ("\n", False)])
    # reasoning is trained on where the template keeps it, on request
    check(tok, CHAT, head + [("<think>\n", False), ("add them\n</think>\n\n4<|im_end|>", True),
                             ("\n", False)], train_on_reasoning=True)
    last = [(text, loss and k > 1) for k, (text, loss) in enumerate(
        head + [("<think>\nadd them\n</think>\n\n", False), ("4<|im_end|>", True),
                ("\n", False)])]
    check(tok, CHAT, last, last_only=True)


def test_mistral_v03_with_a_system_prompt():
    tok = make_tokenizer(MISTRAL_V03)
    msgs = [{"role": "system", "content": "be brief"}] + \
        [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CHAT]
    prefix = tok.apply_chat_template(msgs[:3], tokenize=False)
    assert not tok.apply_chat_template(msgs, tokenize=False).startswith(prefix)
    check(tok, msgs, [("<s>[INST] hi[/INST] ", False), ("hello</s>", True),
                      ("[INST] be brief\n\n2+2?[/INST] ", False), ("4</s>", True)])


def test_llama3_headers():
    tok = make_tokenizer(LLAMA3)
    msgs = [{"role": "system", "content": "be brief"}] + \
        [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CHAT]
    hdr = "<|start_header_id|>{}<|end_header_id|>\n\n"
    check(tok, msgs, [("<|begin_of_text|>" + hdr.format("system") + "be brief<|eot_id|>" +
                       hdr.format("user") + "hi<|eot_id|>" + hdr.format("assistant"), False),
                      ("hello<|eot_id|>", True),
                      (hdr.format("user") + "2+2?<|eot_id|>" + hdr.format("assistant"), False),
                      ("4<|eot_id|>", True)])


def test_generation_blocks_give_the_templates_own_mask():
    tok = make_tokenizer(CHATML_MARKED)
    msgs = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CHAT]
    check(tok, msgs, [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
                      ("hello<|im_end|>", True),
                      ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
                      ("4<|im_end|>", True), ("\n", False)])
    check(tok, msgs, [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"
                       "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
                      ("4<|im_end|>", True), ("\n", False)], last_only=True)


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "now",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]
CALL = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
TOOL_CHAT = [{"role": "user", "content": "weather in Oslo?"},
             {"role": "assistant", "content": None, "tool_calls": CALL},
             {"role": "tool", "content": "rain"},
             {"role": "assistant", "content": "It rains."}]


def test_tool_calls_are_learned_with_their_wrappers():
    tok = make_tokenizer(QWEN3)
    tools_text = json.dumps(TOOLS[0])
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    check(tok, TOOL_CHAT, [
        (f"<|im_start|>system\n# Tools\n<tools>\n{tools_text}\n</tools><|im_end|>\n"
         "<|im_start|>user\nweather in Oslo?<|im_end|>\n<|im_start|>assistant\n<think>\n\n"
         "</think>\n\n", False),
        (call + "<|im_end|>", True),
        ("\n<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
         "<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("It rains.<|im_end|>", True), ("\n", False)], tools=TOOLS)
    tok = make_tokenizer(MISTRAL_V03)
    check(tok, TOOL_CHAT, [
        (f"<s>[AVAILABLE_TOOLS]{json.dumps(TOOLS)}[/AVAILABLE_TOOLS][INST] weather in Oslo?"
         "[/INST]", False),
        ('[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo"}}]</s>', True),
        ('[TOOL_RESULTS]{"content": "rain"}[/TOOL_RESULTS] ', False),
        ("It rains.</s>", True)], tools=TOOLS)


@pytest.mark.parametrize("inline", [True, False], ids=["think-in-content", "reasoning_content"])
def test_qwen3_last_turn_thinking_then_calling_keeps_the_think_block_out(inline):
    """The last turn (whose <think> block Qwen3 keeps) reasons, then calls a tool: the
    reasoning, inline in the content as Qwen3 data often has it or as reasoning_content,
    carries loss only with train_on_reasoning."""
    tok = make_tokenizer(QWEN3)
    turn = {"role": "assistant", "tool_calls": CALL}
    turn.update({"content": "<think>\nneed weather\n</think>\n\nChecking."} if inline else
                {"content": "Checking.", "reasoning_content": "need weather"})
    msgs = [TOOL_CHAT[0], turn]
    head = ("<|im_start|>user\nweather in Oslo?<|im_end|>\n<|im_start|>assistant\n"
            "<think>\n")
    answer = ('Checking.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n'
              "</tool_call><|im_end|>")
    check(tok, msgs, [(head + "need weather\n</think>\n\n", False), (answer, True),
                      ("\n", False)])
    check(tok, msgs, [(head, False), ("need weather\n</think>\n\n" + answer, True),
                      ("\n", False)], train_on_reasoning=True)
    # an earlier turn's inline thinking is dropped by the template, the answer learned
    msgs = [CHAT[0], {"role": "assistant", "content": "<think>\ngreet back\n</think>\n\nhello"},
            *CHAT[2:]]
    check(tok, msgs, [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
                      ("hello<|im_end|>", True),
                      ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
                       "<think>\nadd them\n</think>\n\n", False),
                      ("4<|im_end|>", True), ("\n", False)])


def test_a_tool_calling_set_loads_and_trains(tmp_path, tokenizer):
    """Records with tools, calls with null content and tool turns go through load_dataset
    (validation included) and a short training run."""
    from conftest import build_hf_model

    from lorafit.commands.train import build_trainer
    from lorafit.core.config import TrainConfig

    tok = make_tokenizer(QWEN3)
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps({"messages": TOOL_CHAT, "tools": TOOLS}) + "\n"
                            for _ in range(4)))
    examples, stats = load_dataset(path, tok, 512)
    assert stats.format == "messages" and len(examples) == 4
    text = tok.decode(examples[0].input_ids[examples[0].loss_mask].tolist())
    assert text == ('<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n'
                    "</tool_call><|im_end|>It rains.<|im_end|>")
    folder, _ = build_hf_model(tmp_path / "m", "qwen3", tok, max_position_embeddings=512)
    cfg = TrainConfig(model=str(folder), data=str(path), output=str(tmp_path / "run"),
                      backend="torch", rank=2, batch_size=2, max_steps=2, seq_len=512)
    trainer = build_trainer(cfg, [], report=lambda t: None)
    assert trainer.run() == "completed"


@pytest.mark.parametrize("bad,reason", [
    ({"role": "user", "content": "x", "tool_calls": CALL}, "only assistant turns make tool"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {}}]},
     "must be an object with function.name"),
    ({"role": "assistant", "content": None}, "must be a string, got null"),
    ({"role": "assistant", "content": "x", "reasoning_content": 3}, "reasoning_content must"),
])
def test_bad_tool_records_are_reported(tmp_path, bad, reason):
    tok = make_tokenizer(QWEN3)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": TOOL_CHAT}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "q"}, bad]}) + "\n")
    _, stats = load_dataset(path, tok, 512, on_bad_record="skip")
    assert len(stats.problems) == 1 and stats.problems[0].startswith(f"{path}:2: ")
    assert reason in stats.problems[0]
    path.write_text(json.dumps({"messages": TOOL_CHAT, "tools": "x"}) + "\n")
    with pytest.raises(Exception, match='field "tools" must be an array'):
        load_dataset(path, tok, 512)


def test_every_chat_option_reaches_the_examples(tmp_path):
    tok = make_tokenizer(LLAMA3)
    path = tmp_path / "d.jsonl"
    msgs = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CHAT]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    (all_,), _ = load_dataset(path, tok, 512)
    (last,), _ = load_dataset(path, tok, 512, chat_loss="last")
    assert tok.decode(all_.input_ids[all_.loss_mask].tolist()) == "hello<|eot_id|>4<|eot_id|>"
    assert tok.decode(last.input_ids[last.loss_mask].tolist()) == "4<|eot_id|>"
    assert np.array_equal(all_.input_ids, last.input_ids)
