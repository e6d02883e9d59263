"""OpenAI's request and response shapes: fields read and checked one by one (a wrong one
is a 400 that names it), and the completion / chat completion objects and stream chunks.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


class ApiError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Params:
    model: str
    chat: bool
    prompt: str | None  # /v1/completions
    messages: list | None  # /v1/chat/completions
    max_tokens: int | None  # None: as many as the context and the server's limit allow
    temperature: float
    top_p: float
    stop: list
    seed: int | None
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, low: float, high: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ApiError(400, f"{key} must be a number in [{low}, {high}]", key)
    return float(v)


def _integer(body: dict, key: str, default, low: int, high: int):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ApiError(400, f"{key} must be an integer in [{low}, {high}]", key)
    return v


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """A 400 naming the field for what this server cannot do, rather than an answer that
    silently lacks it (a client asking for logprobs would read None)."""
    asked = {"logprobs": body.get("logprobs") not in (None, False) if chat
             else body.get("logprobs") is not None,
             "top_logprobs": chat and body.get("top_logprobs") not in (None, 0),
             "echo": not chat and bool(body.get("echo")),
             "best_of": not chat and body.get("best_of") not in (None, 1),
             "tools": chat and bool(body.get("tools"))}
    for key, wanted in asked.items():
        if wanted:
            raise ApiError(400, f"{key} is not supported by this server", key)


def _content(message: dict, i: int) -> str:
    c = message.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        parts = []
        for part in c:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               "messages")
            parts.append(part["text"])
        return "".join(parts)
    if c is None and message.get("role") == "assistant":
        return ""
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   "messages")


def parse(body, chat: bool, max_tokens_limit: int) -> Params:
    """Check a request body; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string)", "model")
    prompt = messages = None
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant",
                                                                 "developer"):
                raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant",
                               "messages")
            role = "system" if m["role"] == "developer" else m["role"]
            messages.append({"role": role, "content": _content(m, i)})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
    default_max = None if chat else 16  # OpenAI's defaults (chat: what the context allows)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _integer(body, key, default_max, 1, max_tokens_limit)
    if _integer(body, "n", 1, 1, 1) != 1:
        raise ApiError(400, "n must be 1", "n")
    _refuse_unsupported(body, chat)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4
            and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "stop must be a string or a list of at most 4 non-empty strings",
                       "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return Params(model=model, chat=chat, prompt=prompt, messages=messages,
                  max_tokens=max_tokens,
                  temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                  top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), stop=stop,
                  seed=_integer(body, "seed", None, -2 ** 63, 2 ** 63 - 1), stream=stream,
                  include_usage=bool(options.get("include_usage")))


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(p: Params, rid: str, text: str, finish: str, use: dict) -> dict:
    if p.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if p.chat else "text_completion",
            "created": int(time.time()), "model": p.model, "choices": [choice], "usage": use}


def chunk(p: Params, rid: str, text: str | None, finish: str | None, first: bool = False,
          use: dict | None = None) -> dict:
    """One streamed piece: text (or only a finish reason, or only usage when use is given)."""
    if use is not None:
        choices = []
    elif p.chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if p.chat else "text_completion",
           "created": int(time.time()), "model": p.model, "choices": choices}
    if use is not None or p.include_usage:
        out["usage"] = use
    return out
