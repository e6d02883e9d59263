"""The engine batches rows with different adapters (LoRA of several ranks and targets, DoRA),
prompt lengths and arrival times; each row's greedy tokens equal a lone generation with that
adapter attached to the model (the PEFT-verified LoRA path), and sampled tokens depend only
on the request's own seed."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import build_hf_model, random_ids, write_peft_adapter


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    """{family: (model folder, {adapter name: folder})}: llama, and mistral with a sliding
    window shorter than the sequences."""
    out = {}
    for mt, extra in (("llama", {}), ("mistral", {"sliding_window": 8})):
        root = tmp_path_factory.mktemp(f"engine-{mt}")
        folder, base = build_hf_model(root / "model", mt, tokenizer, **extra)
        out[mt] = (folder, {
            "a": write_peft_adapter(root / "a", base, seed=1, r=4),
            "b": write_peft_adapter(root / "b", base, seed=2, r=8,
                                    targets=("q_proj", "o_proj", "up_proj", "down_proj")),
            "dora": write_peft_adapter(root / "dora", base, seed=3, r=4, dora=True,
                                       targets=("q_proj", "v_proj", "down_proj")),
        })
    return out


def lone(folder, adapter_dir, backend, prompt, n, **kw):
    from lorafit.commands.common import load_model_with_adapter
    from lorafit.core.generate import generate_ids

    model = load_model_with_adapter(str(folder), adapter_dir, backend)
    return list(generate_ids(model, prompt, max_new_tokens=n, **kw))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_mixed_adapter_batch_equals_lone_generation(served, backend, family):
    from lorafit.core import adapter_io
    from lorafit.core.engine import Engine, Request
    from lorafit.models.loader import load_model

    folder, adapters = served[family]
    model = load_model(str(folder), backend)
    engine = Engine(model, max_batch=4, max_len=64)
    for name, path in adapters.items():
        engine.add_adapter(name, *adapter_io.load_any(path))
    moves = []
    copy_row = engine.cache.copy_row
    engine.cache.copy_row = lambda *a: (moves.append(a), copy_row(*a))
    names = [None, "a", "b", "dora", None, "b", "dora", "a"]
    prompts = [random_ids(300, (1, 3 + 2 * i), seed=i)[0].tolist() for i in range(len(names))]
    lengths = [12, 5, 16, 9, 14, 3, 11, 7]
    got = {i: [] for i in range(len(names))}

    def submit(i):
        engine.submit(Request(prompts[i], lengths[i], adapter=names[i],
                              on_token=lambda t, _, i=i: got[i].append(t)))
    for i in range(3):
        submit(i)
    engine.step()
    engine.step()
    for i in range(3, len(names)):  # joining a running batch, more than it holds
        submit(i)
        engine.step()
    engine.run_until_done()
    assert not engine.busy() and engine.in_use("a") == 0
    assert moves  # rows finished out of order and were packed
    for i, name in enumerate(names):
        want = lone(folder, adapters[name] if name else None, backend, prompts[i], lengths[i])
        assert got[i] == want, (i, name)
    assert len({tuple(v) for v in got.values()}) > 3  # the adapters change the answers


def test_sampling_depends_only_on_the_request(served, torch_backend):
    from lorafit.core import adapter_io
    from lorafit.core.engine import Engine, Request
    from lorafit.models.loader import load_model

    folder, adapters = served["llama"]
    model = load_model(str(folder), torch_backend)
    engine = Engine(model, max_batch=8, max_len=64)
    engine.add_adapter("a", *adapter_io.load_any(adapters["a"]))
    prompt = random_ids(300, (1, 6), seed=7)[0].tolist()
    outs = []
    for crowd in (0, 5):
        got, others = [], []
        engine.submit(Request(prompt, 10, temperature=0.9, top_p=0.9, seed=3, adapter="a",
                              on_token=lambda t, _: got.append(t)))
        for j in range(crowd):
            engine.submit(Request(prompt[:3], 10, temperature=1.0, seed=j,
                                  on_token=lambda t, _: others.append(t)))
        engine.run_until_done()
        outs.append(got)
    assert outs[0] == outs[1] and len(outs[0]) == 10


def test_cancel_frees_the_row_and_refusals_are_clear(served, torch_backend):
    from lorafit.core import adapter_io
    from lorafit.core.engine import Engine, Request
    from lorafit.core.errors import LorafitError
    from lorafit.models.loader import load_model

    folder, adapters = served["llama"]
    engine = Engine(load_model(str(folder), torch_backend), max_batch=2, max_len=32)
    cfg, adapter = adapter_io.load_any(adapters["a"])
    engine.add_adapter("a", cfg, adapter)
    seq = engine.submit(Request([5, 6, 7], 20, adapter="a"))
    engine.step()
    with pytest.raises(LorafitError, match="in use"):
        engine.remove_adapter("a")
    engine.cancel(seq)
    assert not engine.step() and engine.in_use("a") == 0
    engine.remove_adapter("a")
    with pytest.raises(LorafitError, match="no adapter named"):
        engine.submit(Request([5], 3, adapter="a"))
    with pytest.raises(LorafitError, match="at most 32"):
        engine.submit(Request(list(range(3, 40)), 3))
    wrong = {k: np.zeros((v.shape[0], v.shape[1] + 1), np.float32) if "lora_A" in k else v
             for k, v in adapter.items()}
    with pytest.raises(LorafitError, match="does not fit"):
        engine.add_adapter("other-base", cfg, wrong)
