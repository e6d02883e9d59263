"""`lorafit serve` driven by the official openai client over the loopback, against a real
server process: mixed-adapter concurrent answers equal what `lorafit generate` prints for
each adapter (torch and MLX, streaming and not), bad requests get OpenAI error bodies and no
traceback reaches the log, and a bounded load test with LRU eviction and a client that
hangs up mid-stream."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import build_hf_model, write_peft_adapter

KEY = "sk-test-key"
PROMPTS = ["hello world", "the quick brown fox", "tiny corpus", "jumps over the lazy dog",
           "hello", "world tokenizer the"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny llama, adapters a and b given by name, and an adapter folder holding an mlx-lm
    export (c), a lorafit run folder (d), and an adapter made for another base (wrong)."""
    from lorafit.core import adapter_io

    root = tmp_path_factory.mktemp("serve")
    folder, base = build_hf_model(root / "tiny", "llama", tokenizer)
    a = write_peft_adapter(root / "a", base, seed=1, r=4)
    b = write_peft_adapter(root / "b", base, seed=2, r=8, targets=("q_proj", "o_proj",
                                                                   "up_proj", "down_proj"))
    pool = root / "pool"
    pool.mkdir()
    cfg, leaves = adapter_io.load_any(write_peft_adapter(root / "c-src", base, seed=3, r=2))
    adapter_io.save_mlx_lm(pool / "c", leaves, cfg, num_layers=2)
    run = pool / "d"
    write_peft_adapter(run / "adapter", base, seed=4, r=4, targets=("k_proj", "gate_proj"))
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    _, other = build_hf_model(root / "other", "llama", tokenizer, hidden_size=32)
    write_peft_adapter(pool / "wrong", other, seed=5)
    return folder, {"a": a, "b": b, "c": pool / "c", "d": run / "adapter"}, pool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc, port, log):
        self.proc, self.url, self.log = proc, f"http://127.0.0.1:{port}", log

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def start_server(setup, backend_name, tmp_path, *extra):
    folder, adapters, pool = setup
    port = _free_port()
    log = tmp_path / f"server-{backend_name}.log"
    argv = ["serve", "--model", str(folder), "--backend", backend_name, "--port", str(port),
            "--api-key", KEY, "--adapter", f"a={adapters['a']}", "--adapter",
            f"b={adapters['b']}", "--adapter-dir", str(pool), "--max-adapters", "2",
            "--max-len", "128", "--max-tokens", "64", "--log-every", "1", *extra]
    env = {**os.environ, "LORAFIT_NO_REEXEC": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from lorafit.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", *argv],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    served = Served(proc, port, log)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(served.url + "/health", timeout=1).status_code == 200:
                return served
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("the server did not start:\n" + log.read_text())


def stop_server(served):
    served.proc.terminate()
    served.proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["torch", "mlx"])
def server(request, setup, tmp_path_factory):
    served = start_server(setup, request.param, tmp_path_factory.mktemp("log"))
    served.backend = request.param
    yield served
    stop_server(served)
    assert "Traceback" not in served.log.read_text(), served.log.read_text()


def reference(setup, backend_name, model, prompt, chat, n) -> str:
    """What `lorafit generate` prints (less its newline) for this adapter and prompt."""
    from lorafit.commands.common import load_model_with_adapter
    from lorafit.core.generate import generate_text

    folder, adapters, _ = setup
    key = (backend_name, model)
    if key not in _models:
        _models[key] = load_model_with_adapter(str(folder), adapters.get(model), backend_name)
    return generate_text(_models[key], prompt, n, chat=chat)


_models: dict = {}


def ask(client, model, prompt, chat, stream, n):
    """(text, finish reason, usage) through the openai client."""
    kw = dict(model=model, max_tokens=n, temperature=0, stream=stream)
    if stream:
        kw["stream_options"] = {"include_usage": True}
    if chat:
        out = client.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                             **kw)
    else:
        out = client.completions.create(prompt=prompt, **kw)
    if not stream:
        c = out.choices[0]
        return (c.message.content if chat else c.text), c.finish_reason, out.usage
    text, finish, use = "", None, None
    for ch in out:
        if ch.usage is not None:
            use = ch.usage
        for c in ch.choices:
            text += (c.delta.content or "") if chat else c.text
            finish = c.finish_reason or finish
    return text, finish, use


def test_mixed_concurrent_requests_equal_lorafit_generate(server, setup):
    client = server.client()
    listed = {m.id for m in client.models.list().data}
    assert {"tiny", "a", "b", "c", "d", "wrong"} <= listed
    jobs = [(["tiny", "a", "b"][i % 3], PROMPTS[i % len(PROMPTS)], i % 2 == 0, i % 4 < 2,
             6 + (i * 5) % 17) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda j: ask(client, *j), jobs))
    answers = set()
    for (model, prompt, chat, stream, n), (text, finish, use) in zip(jobs, got):
        want = reference(setup, server.backend, model, prompt, chat, n)
        assert text == want, (model, prompt, chat, stream)
        assert finish in ("stop", "length") and use.completion_tokens <= n
        assert use.total_tokens == use.prompt_tokens + use.completion_tokens
        answers.add((prompt, chat, text))
    assert len(answers) > len({(p, c) for _, p, c, _, _ in jobs})  # adapters change answers


def test_stop_seed_and_sampling(server):
    client = server.client()
    full, _, _ = ask(client, "a", "hello world", False, False, 20)
    assert len(full) > 4
    cut = full[2:4]
    out = client.completions.create(model="a", prompt="hello world", max_tokens=20,
                                    temperature=0, stop=[cut])
    assert out.choices[0].text == full[:full.index(cut)]
    assert out.choices[0].finish_reason == "stop"
    streamed, _, _ = ask_stop(client, cut)
    assert streamed == full[:full.index(cut)]
    free = client.chat.completions.create(model="tiny", temperature=0,  # no max_tokens
                                          messages=[{"role": "user", "content": "hi"}])
    assert free.usage.completion_tokens <= 64 and free.choices[0].finish_reason
    kw = dict(model="b", prompt="the quick", max_tokens=12, temperature=1.0, top_p=0.9)
    one = client.completions.create(seed=11, **kw).choices[0].text
    assert one == client.completions.create(seed=11, **kw).choices[0].text


def ask_stop(client, cut):
    out = client.completions.create(model="a", prompt="hello world", max_tokens=20,
                                    temperature=0, stop=cut, stream=True)
    text = "".join(c.choices[0].text for c in out if c.choices)
    return text, None, None


def post(server, path, body=None, raw=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=30)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_bad_requests_get_openai_errors(server, setup):
    import openai

    ok = {"model": "a", "prompt": "hello", "max_tokens": 2}
    cases = [
        (post(server, "/v1/completions", raw=b"{not json"), 400, None),
        (post(server, "/v1/completions", raw=b"[1, 2]"), 400, None),
        (post(server, "/v1/completions", {"prompt": "x"}), 400, "model"),
        (post(server, "/v1/completions", {**ok, "model": "nobody"}), 404, "model"),
        (post(server, "/v1/completions", {**ok, "model": "../a"}), 404, "model"),
        (post(server, "/v1/completions", {**ok, "model": str(setup[1]["a"])}), 404,
         "model"),
        (post(server, "/v1/completions", {**ok, "model": "wrong"}), 400, "model"),
        (post(server, "/v1/completions", {**ok, "max_tokens": "3"}), 400, "max_tokens"),
        (post(server, "/v1/completions", {**ok, "max_tokens": 10_000}), 400, "max_tokens"),
        (post(server, "/v1/completions", {**ok, "temperature": -1}), 400, "temperature"),
        (post(server, "/v1/completions", {**ok, "n": 2}), 400, "n"),
        (post(server, "/v1/completions", {**ok, "stop": [1]}), 400, "stop"),
        (post(server, "/v1/completions", {**ok, "logprobs": 0}), 400, "logprobs"),
        (post(server, "/v1/completions", {**ok, "echo": True}), 400, "echo"),
        (post(server, "/v1/completions", {**ok, "best_of": 2}), 400, "best_of"),
        (post(server, "/v1/completions", {**ok, "prompt": 5}), 400, "prompt"),
        (post(server, "/v1/completions", {**ok, "prompt": "hello " * 200}), 400, "prompt"),
        (post(server, "/v1/chat/completions", {"model": "a", "messages": "hi"}), 400,
         "messages"),
        (post(server, "/v1/chat/completions", {"model": "a", "messages": [{"role": "x"}]}),
         400, "messages"),
        (post(server, "/v1/completions", raw=b"x" * (2 << 20)), 413, None),
        (post(server, "/v1/completions", ok, key=None), 401, None),
        (post(server, "/v1/completions", ok, key="wrong"), 401, None),
        (post(server, "/v1/nothing", ok), 404, None),
        (httpx.get(server.url + "/v1/completions"), 405, None),
    ]
    for i, (r, status, param) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], (i, err)
        if param:
            assert err["param"] == param, (i, err)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nobody", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="a", messages=[], max_tokens=2)
    hi = [{"role": "user", "content": "hi"}]
    for extra in ({"logprobs": True}, {"logprobs": True, "top_logprobs": 2}, {"n": 2},
                  {"tools": [{"type": "function", "function": {"name": "f"}}]}):
        with pytest.raises(openai.BadRequestError) as e:  # as the openai client sends them
            server.client().chat.completions.create(model="a", messages=hi, max_tokens=2,
                                                    **extra)
        assert e.value.body["param"] == list(extra)[0], (extra, e.value.body)
    plain = server.client().chat.completions.create(model="a", messages=hi, max_tokens=2,
                                                    logprobs=False, n=1)
    assert plain.choices[0].logprobs is None
    assert post(server, "/v1/completions", ok).status_code == 200  # still serving
    time.sleep(1.5)  # a periodic log line
    log = server.log.read_text()
    assert "Traceback" not in log and "requests" in log and "tokens/s" in log, log
    assert "lorafit serve: http://127.0.0.1:" in log and "adapters: a, b, c, d" in log, log


def test_a_missing_or_foreign_adapter_stops_the_start(setup, tmp_path):
    folder, _, pool = setup
    for adapter, needle in ((f"x={pool / 'wrong'}", "does not fit"),
                            (f"x={tmp_path / 'none'}", "not a folder")):
        proc = subprocess.run([sys.executable, "-c", "import sys; from lorafit.cli import "
                               "main; sys.exit(main(sys.argv[1:]))", "serve", "--model",
                               str(folder), "--backend", "torch", "--adapter", adapter,
                               "--port", str(_free_port())],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LORAFIT_NO_REEXEC": "1"})
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_load_lru_and_a_client_that_hangs_up(setup, tmp_path):
    """200 requests, 16 at a time, over 4 adapters with room for 2 (LRU at work): no
    errors, memory flat after warm-up; a streaming client killed mid-answer frees its row."""
    served = start_server(setup, "torch", tmp_path)
    try:
        client = served.client(timeout=60)
        models = ["a", "b", "c", "d", "tiny"]

        def one(i):
            text, finish, use = ask(client, models[i % 5], PROMPTS[i % len(PROMPTS)],
                                    i % 3 == 0, i % 2 == 0, 8)
            return use.completion_tokens
        with ThreadPoolExecutor(16) as pool:
            assert all(n >= 1 for n in pool.map(one, range(40)))  # warm-up
            before = served.rss_kb()
            assert all(n >= 1 for n in pool.map(one, range(40, 200)))
        after = served.rss_kb()
        assert after - before < 40_000, (before, after)  # KB: flat, not per-request growth
        # a client that hangs up mid-stream
        body = {"model": "a", "prompt": "hello world", "max_tokens": 60, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            next(r.iter_lines())
        deadline = time.time() + 10
        while httpx.get(served.url + "/health").json()["running"] and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(served.url + "/health").json()["running"] == 0
        assert ask(client, "b", "hello", False, False, 4)[2].completion_tokens >= 1
    finally:
        stop_server(served)
    log = served.log.read_text()
    assert "Traceback" not in log and "failed" not in log, log


def test_adapter_lru_bounds_what_is_resident(setup):
    """More adapters than the bound, in process: at most max_loaded (then max_bytes) held,
    an evicted one read again on demand, a running row kept right while the adapters around
    it are evicted and renumbered, and every answer equal to `lorafit generate`."""
    import asyncio

    from lorafit.backends import get_backend
    from lorafit.core.engine import Engine, Request
    from lorafit.core.generate import encode_prompt, eos_token_ids
    from lorafit.models.loader import load_model
    from lorafit.serve.adapters import AdapterStore

    folder, adapters, pool = setup
    model = load_model(str(folder), get_backend("torch", "cpu"))
    engine = Engine(model, max_batch=4, max_len=64)
    store = AdapterStore(engine, {k: adapters[k] for k in "ab"}, pool, max_loaded=2)
    tok, eos = model.tokenizer, frozenset(eos_token_ids(model.tokenizer, model.args))

    def submit(name, prompt):
        out = []
        engine.submit(Request(encode_prompt(tok, prompt), 6, adapter=name, eos_ids=eos,
                              on_token=lambda t, _: out.append(t)))
        return lambda: tok.decode([t for t in out if t not in eos], skip_special_tokens=True)

    def check(name, text, prompt):
        assert text == reference(setup, "torch", name, prompt, False, 6), name

    for name in "ab":
        asyncio.run(store.ensure(name))
    running = submit("b", PROMPTS[0])  # b decodes while a is evicted and b renumbered
    engine.step()
    asyncio.run(store.ensure("c"))
    assert store.loaded() == ["b", "c"] and engine.adapters() == ["b", "c"]
    other = submit("c", PROMPTS[1])
    engine.run_until_done()
    check("b", running(), PROMPTS[0])
    check("c", other(), PROMPTS[1])
    for i, name in enumerate("dabdc"):
        asyncio.run(store.ensure(name))
        assert len(store.loaded()) <= 2 and sorted(store.loaded()) == engine.adapters()
        got = submit(name, PROMPTS[i])
        engine.run_until_done()
        check(name, got(), PROMPTS[i])
    assert store.loads == 8  # a and b read again after their eviction
    two = store.resident_bytes()
    store.max_bytes = 1  # a byte budget no two adapters fit: one held at a time
    for i, name in enumerate("ab"):
        asyncio.run(store.ensure(name))
        assert store.loaded() == [name] and engine.adapters() == [name]
        got = submit(name, PROMPTS[i + 2])
        engine.run_until_done()
        check(name, got(), PROMPTS[i + 2])
    from lorafit.core import adapter_io
    alone = sum(v.nbytes for v in adapter_io.load_any(adapters["b"])[1].values())
    assert store.resident_bytes() == 2 * alone != two  # the base's zero slot and b's, no gap
    from lorafit.commands.serve import build
    from lorafit.core.errors import LorafitError
    with pytest.raises(LorafitError, match="--max-adapter-mb must be positive"):
        build(str(folder), max_adapter_mb=0)
