"""An Ollama Modelfile for an exported GGUF: FROM, ADAPTER, TEMPLATE and stop tokens.

Ollama's TEMPLATE is a Go template, not the model's Jinja chat template. Most chat templates
render each message as `prefix + content + suffix` by role; those are found by rendering the
Jinja template with marker contents, rebuilt as a Go template, and the rebuild is checked by
rendering a conversation both ways. A template that does not fit that shape gets no TEMPLATE
line (Ollama then falls back to the GGUF's own chat template), and the caller is told.
"""

from __future__ import annotations

from typing import Callable

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> text
ROLES = ("system", "user", "assistant")
MARK = "\x00LORAFIT{}\x00"


def _split(text: str, mark: str) -> tuple[str, str]:
    before, found, after = text.partition(mark)
    if not found:
        raise ValueError(mark)
    return before, after


def _pieces(render: Render) -> dict:
    """{"start", role: (prefix, suffix), "generation"} from five small renderings; raises
    when the template does not render messages as prefix + content + suffix."""
    s, u, x = (MARK.format(i) for i in range(3))
    sys_ = {"role": "system", "content": s}
    user = {"role": "user", "content": u}
    asst = {"role": "assistant", "content": x}
    start_sp, ss = _split(render([sys_], False), s)
    start_up, us = _split(render([user], False), u)
    between, as_ = _split(_split(render([user, asst], False), u)[1], x)
    gap = _split(_split(render([sys_, user], False), s)[1], u)[0]
    gen = render([user], True)
    user_only = start_up + u + us
    if not (between.startswith(us) and gap.startswith(ss) and gen.startswith(user_only)):
        raise ValueError("not prefix + content + suffix")
    up = gap[len(ss):]
    if not start_up.endswith(up):
        raise ValueError("user prefix")
    start = start_up[:len(start_up) - len(up)]
    if not start_sp.startswith(start):
        raise ValueError("start")
    return {"start": start, "system": (start_sp[len(start):], ss), "user": (up, us),
            "assistant": (between[len(us):], as_), "generation": gen[len(user_only):]}


def _go(text: str) -> str:
    return text.replace("{{", "{{ \"{{\" }}")


def go_template(p: dict) -> str:
    """The Go template Ollama renders for a conversation, from the per-role pieces. No
    `{{-` trimming anywhere: it would eat the newlines the pieces end with."""
    parts = [_go(p["start"]), "{{ range $i, $m := .Messages }}"]
    for k, role in enumerate(ROLES):
        pre, suf = p[role]
        parts.append(("{{ if" if k == 0 else "{{ else if") + f' eq $m.Role "{role}" }}}}'
                     + _go(pre) + "{{ $m.Content }}" + _go(suf))
    parts.append("{{ end }}{{ end }}" + _go(p["generation"]))
    return "".join(parts)


def render_like_go(p: dict, messages: list) -> str:
    """What `go_template(p)` renders for `messages` plus the generation prompt (the check)."""
    text = p["start"]
    for m in messages:
        pre, suf = p[m["role"]]
        text += pre + m["content"] + suf
    return text + p["generation"]


def template_for(render: Render) -> str | None:
    """A Go TEMPLATE equivalent to the chat template, or None when none is found."""
    try:
        p = _pieces(render)
    except Exception:  # a template that needs other shapes (or raises on these)
        return None
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    try:
        expected = render(convo, True)
    except Exception:
        return None
    return go_template(p) if render_like_go(p, convo) == expected else None


def modelfile(model: str, adapter: str | None, template: str | None, stops: list[str]) -> str:
    lines = [f"FROM {model}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops) if s]
    return "\n".join(lines) + "\n"
