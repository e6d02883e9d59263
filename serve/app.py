"""The HTTP side of `lorafit serve`: an OpenAI-compatible API on Starlette.

One engine thread runs the generation engine (core/engine.py) whenever it has work; request
handlers, on the event loop, tokenize, submit, and read their tokens back from a queue the
engine's callback fills. Nothing here touches a framework: the model lives in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from lorafit.core.engine import Request
from lorafit.core.errors import LorafitError
from lorafit.core.generate import encode_prompt
from lorafit.serve import protocol
from lorafit.serve.protocol import ApiError

log = logging.getLogger("lorafit.serve")


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096
    max_tokens: int = 1024


class TextStream:
    """Tokens to text pieces: decoded as a whole (so multi-byte characters and merges come
    out right), cut at the first stop string, holding back what may be a stop's start."""

    def __init__(self, tokenizer, eos: set, stops: list):
        self.tok, self.eos, self.stops = tokenizer, eos, stops
        self.ids, self.text, self.sent = [], "", 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, token: int) -> bool:
        """Take a token; True when a stop string has now appeared."""
        if token in self.eos:
            return False
        self.ids.append(token)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        start = max(0, self.sent - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def piece(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":  # an incomplete char
                end -= 1
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out


class Server:
    """What the handlers share: the engine and its thread, the adapters, counters."""

    def __init__(self, engine, tokenizer, eos_ids: set, store, base_name: str,
                 api_key: str | None = None, limits: Limits | None = None,
                 log_every: float = 30.0):
        self.engine, self.tok, self.eos, self.store = engine, tokenizer, set(eos_ids), store
        self.base_name, self.api_key = base_name, api_key
        self.limits = limits or Limits()
        self.log_every = log_every
        self.requests = self.errors = 0
        self._stop = threading.Event()
        self._thread = None

    # -- the engine thread --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorafit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            engine.wake.wait(0.5)
            engine.wake.clear()
            while engine.busy() and not self._stop.is_set():
                try:
                    engine.step()
                except Exception as e:  # noqa: BLE001 - one line, then keep serving
                    log.error("engine step failed: %s: %s", type(e).__name__, e)
                    engine.abort_all()

    async def report(self) -> None:
        """The periodic log line: requests, tokens/s, what is running, adapters held."""
        last_tokens, last_time, last_requests = self.engine.tokens_out, time.monotonic(), 0
        while True:
            await asyncio.sleep(self.log_every)
            now, tokens = time.monotonic(), self.engine.tokens_out
            if tokens != last_tokens or self.requests != last_requests:
                log.info("requests %d (%d errors), %.1f tokens/s, running %d, adapters in "
                         "memory: %s", self.requests, self.errors,
                         (tokens - last_tokens) / (now - last_time), self.engine.running(),
                         ", ".join(self.store.loaded()) or "none")
            last_tokens, last_time, last_requests = tokens, now, self.requests

    # -- requests -----------------------------------------------------------------------
    def check_key(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    async def read_json(self, request: HttpRequest):
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None

    def encode(self, p: protocol.Params) -> list:
        try:
            if p.chat:
                if not getattr(self.tok, "chat_template", None):
                    raise ApiError(400, "this model's tokenizer has no chat template; use "
                                   "/v1/completions", "messages")
                return list(self.tok.apply_chat_template(p.messages, add_generation_prompt=True,
                                                         tokenize=True, return_dict=False))
            return encode_prompt(self.tok, p.prompt)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages
            raise ApiError(400, f"cannot apply the chat template: {e}", "messages") from None

    async def adapter_for(self, model: str) -> str | None:
        """The adapter a model name stands for, loaded (None: the base); the caller unpins
        it once its request is submitted."""
        if model == self.base_name:
            return None
        self.store.pin(model)
        try:
            await self._load(model)
        except BaseException:
            self.store.unpin(model)
            raise
        return model

    async def _load(self, model: str) -> None:
        try:
            await self.store.ensure(model)
        except KeyError:
            raise ApiError(404, f"the model {model!r} does not exist", "model",
                           "model_not_found") from None
        except LorafitError as e:
            raise ApiError(400, str(e), "model") from None

    async def tokens(self, p: protocol.Params, ids: list):
        """Yield (text piece, finish reason or None, completion tokens) as tokens come."""
        lim = self.limits
        if len(ids) > lim.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is "
                           f"{lim.max_prompt_tokens}", "messages" if p.chat else "prompt")
        if p.max_tokens is None:
            p.max_tokens = max(1, min(lim.max_tokens, self.engine.max_len - len(ids)))
        if len(ids) + p.max_tokens > self.engine.max_len:
            raise ApiError(400, f"this model's context holds {self.engine.max_len} tokens: "
                           f"{len(ids)} in the prompt + {p.max_tokens} max_tokens is too many",
                           "max_tokens", "context_length_exceeded")
        adapter = await self.adapter_for(p.model)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def on_token(token, finish):
            loop.call_soon_threadsafe(queue.put_nowait, (token, finish))
        seed = p.seed if p.seed is not None else \
            (secrets.randbits(63) if p.temperature > 0 else 0)
        req = Request(ids, p.max_tokens, p.temperature, p.top_p, seed, None,
                      frozenset(self.eos), on_token)
        seq = None
        try:
            for _ in range(3):  # evicted in the instant before its pin: load it again
                req.adapter = adapter
                try:
                    seq = self.engine.submit(req)
                    break
                except LorafitError as e:
                    if adapter is None or "no adapter named" not in str(e):
                        raise ApiError(400, str(e)) from None
                    await self._load(adapter)
        finally:
            if adapter is not None:
                self.store.unpin(adapter)
        if seq is None:
            raise ApiError(503, "the adapter could not be kept loaded; try again",
                           kind="server_error")
        text, count, finish = TextStream(self.tok, self.eos, p.stop), 0, None
        try:
            while finish is None:
                token, finish = await queue.get()
                if token is None:
                    raise ApiError(500, "generation failed", kind="server_error")
                count += 1
                if text.add(token):
                    finish = "stop"
                    self.engine.cancel(seq)
                yield text.piece(final=finish is not None), finish, count
        finally:
            if finish is None:  # the client went away, or an error: free the row
                self.engine.cancel(seq)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(server: Server) -> Starlette:
    def guarded(handler):
        async def endpoint(request: HttpRequest):
            try:
                return await handler(request)
            except ApiError as e:
                server.errors += e.status >= 500
                return _error(e)
            except Exception as e:  # noqa: BLE001 - one log line, never a traceback
                server.errors += 1
                log.error("%s %s failed: %s: %s", request.method, request.url.path,
                          type(e).__name__, e)
                return _error(ApiError(500, "internal error", kind="server_error"))
        return endpoint

    async def health(request):
        return JSONResponse({"status": "ok", "running": server.engine.running()})

    async def models(request):
        server.check_key(request)
        names = [server.base_name] + server.store.names()
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "lorafit"} for n in names]})

    async def completion(request, chat: bool):
        server.check_key(request)
        p = protocol.parse(await server.read_json(request), chat, server.limits.max_tokens)
        ids = server.encode(p)
        server.requests += 1
        rid = protocol.new_id(chat)
        gen = server.tokens(p, ids)
        if p.stream:
            first = await _first(gen)  # errors before any output are still an HTTP status
            return StreamingResponse(_sse(server, p, rid, len(ids), gen, first),
                                     media_type="text/event-stream")
        pieces, finish, count = [], None, 0

        async def collect():
            nonlocal finish, count
            async for piece, finish, count in gen:
                pieces.append(piece)
        task = asyncio.ensure_future(collect())
        while not task.done():  # a client that hangs up frees its row
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await gen.aclose()
                return JSONResponse({}, status_code=499)
        task.result()
        return JSONResponse(protocol.response(p, rid, "".join(pieces), finish,
                                              protocol.usage(len(ids), count)))

    async def chat_completions(request):
        return await completion(request, True)

    async def completions(request):
        return await completion(request, False)

    async def http_error(request, exc: HTTPException):
        return _error(ApiError(exc.status_code, exc.detail or "not found"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        reporter = asyncio.ensure_future(server.report())
        try:
            yield
        finally:
            reporter.cancel()
            server.stop()

    routes = [Route("/health", guarded(health), methods=["GET"]),
              Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
              Route("/v1/completions", guarded(completions), methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error})


_DONE = object()


async def _first(gen):
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return _DONE


async def _sse(server: Server, p, rid: str, prompt_tokens: int, gen, first):
    """Server-sent events: a chunk per text piece, the finish reason, usage if asked, [DONE].
    If the client goes away, Starlette cancels this and the row is freed (gen's finally)."""
    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"
    count, opened = 0, False
    try:
        item = first
        while item is not _DONE:
            piece, finish, count = item
            if piece or not opened and p.chat:
                yield event(protocol.chunk(p, rid, piece, None, first=not opened))
                opened = True
            if finish is not None:
                yield event(protocol.chunk(p, rid, None, finish))
                break
            item = await _first(gen)
        if p.include_usage:
            yield event(protocol.chunk(p, rid, None, None, use=protocol.usage(prompt_tokens,
                                                                              count)))
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield event(e.body())
    finally:
        await gen.aclose()
