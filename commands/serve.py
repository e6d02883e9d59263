"""`lorafit serve`: one base model in memory, many adapters, an OpenAI-compatible API.

Loads the base and the named adapters up front (a broken one, or one for another base, is
a one-line error before anything listens), prints a startup line, then runs uvicorn.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lorafit.core.errors import LorafitError


def parse_adapters(items: list | None) -> dict:
    """NAME=PATH pairs (a bare PATH is named after its folder)."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise LorafitError(f"--adapter {item!r}: give NAME=PATH")
        if name in out:
            raise LorafitError(f"--adapter: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise LorafitError(f"--adapter {name}: {path} is not a folder")
        out[name] = path
    return out


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def build(model: str, adapters: list | None = None, adapter_dir: str | None = None,
          api_key: str | None = None, max_adapters: int = 8, backend: str = "auto",
          device: str | None = None, dtype: str | None = None, quantize: str | None = None,
          max_batch: int = 16, max_len: int = 2048, max_tokens: int = 1024,
          max_body_bytes: int = 1 << 20, log_every: float = 30.0, verbose: bool = False,
          max_adapter_mb: float | None = None):
    """(Server, Starlette app, startup description) for these options."""
    from lorafit.backends import get_backend
    from lorafit.core.engine import Engine
    from lorafit.core.generate import eos_token_ids
    from lorafit.models.loader import load_model
    from lorafit.serve.adapters import AdapterStore
    from lorafit.serve.app import Limits, Server, build_app

    named = parse_adapters(adapters)
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise LorafitError(f"--adapter-dir {adapter_dir}: no such folder")
    if max_batch < 1 or max_len < 2 or max_tokens < 1 or max_adapters < 1:
        raise LorafitError("--max-batch, --max-len, --max-tokens and --max-adapters must be "
                           "positive")
    if max_adapter_mb is not None and max_adapter_mb <= 0:
        raise LorafitError("--max-adapter-mb must be positive")
    ops = get_backend(backend, device, verbose=verbose)
    m = load_model(model, ops, dtype, quantize)
    base_name = Path(model.rstrip("/")).name or "base"
    engine = Engine(m, max_batch=max_batch,
                    max_len=min(max_len, m.args.max_position_embeddings))
    store = AdapterStore(engine, named, adapter_dir, max_adapters, reserved=(base_name,),
                         max_bytes=None if max_adapter_mb is None
                         else int(max_adapter_mb * 2**20))
    for name in named:  # given by name: loaded now, so a bad one stops the start
        store.load_now(name)
    tok = m.tokenizer
    server = Server(engine, tok, eos_token_ids(tok, m.args), store, base_name, api_key,
                    Limits(max_body_bytes, engine.max_len - 1, max_tokens), log_every)
    mem = engine.memory_bytes()
    desc = (f"base {base_name} ({m.args.model_type}, {ops.name}/{ops.device}, {m.dtype}); "
            f"adapters: {', '.join(store.names()) or 'none'}; memory: weights "
            f"{_mb(mem['weights'])}, adapters {_mb(mem['adapters'])}, KV cache "
            f"{_mb(mem['kv_cache'])} ({max_batch} x {engine.max_len} tokens)")
    return server, build_app(server), desc


def main(model: str, adapters: list | None = None, adapter_dir: str | None = None,
         host: str = "127.0.0.1", port: int = 8000, **kw) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    server, app, desc = build(model, adapters, adapter_dir, verbose=True, **kw)
    shown = f"[{host}]" if ":" in host else host
    print(f"lorafit serve: http://{shown}:{port}/v1  {desc}", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not kw.get("api_key"):
        print(f"warning: listening on {host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
