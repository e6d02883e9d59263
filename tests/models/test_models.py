"""lorafit's model definitions against transformers: logits and greedy generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES, random_ids
from lorafit.core.generate import generate_ids
from lorafit.models.loader import load_model


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_logits_match_transformers(tiny_models, backend, model_type):
    folder, ref = tiny_models[model_type]
    ids = random_ids(ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    model = load_model(str(folder), backend)
    got = backend.to_numpy(model.logits(backend.from_numpy(ids)))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_greedy_generation_matches_transformers(tiny_models, backend, model_type):
    folder, ref = tiny_models[model_type]
    prompt = random_ids(ref.config.vocab_size, (1, 20), seed=3)  # longer than the windows
    with torch.no_grad():
        out = ref.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                           eos_token_id=None, pad_token_id=0, min_new_tokens=20)
    expected = out[0, prompt.shape[1]:].tolist()
    model = load_model(str(folder), backend)
    got = list(generate_ids(model, prompt[0].tolist(), max_new_tokens=20, temperature=0.0))
    assert got == expected


def test_kv_cache_equals_full_forward(tiny_models, backend):
    """Logits of a token computed through the cache equal a fresh full forward."""
    folder, ref = tiny_models["llama"]
    model = load_model(str(folder), backend)
    ids = random_ids(ref.config.vocab_size, (1, 10))
    full = backend.to_numpy(model.logits(backend.from_numpy(ids)))[0, -1]
    cache = [[None, None] for _ in range(model.args.num_hidden_layers)]
    B = backend
    pos = np.arange(10)[None]
    model.hidden(B.from_numpy(ids[:, :9]), B.from_numpy(pos[:, :9]), cache=cache)
    h = model.hidden(B.from_numpy(ids[:, 9:]), B.from_numpy(pos[:, 9:]), cache=cache)
    step = B.to_numpy(B.linear(h, model.output_weight()))[0, -1]
    assert np.abs(step - full).max() < 1e-4


def test_sharded_folder_loads(tmp_path, tiny_models, torch_backend):
    folder, ref = tiny_models["mistral"]
    ref.save_pretrained(str(tmp_path), max_shard_size="20KB")
    import json
    assert (tmp_path / "model.safetensors.index.json").exists()
    shards = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    assert len(shards) > 1
    model = load_model(str(tmp_path), torch_backend)
    ids = random_ids(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    got = torch_backend.to_numpy(model.logits(torch_backend.from_numpy(ids)))
    assert np.abs(got - expected).max() <= 1e-4


def test_bf16_weights_load_in_bf16(tmp_path, tiny_models, backend):
    """bf16 is a storage and compute dtype on both backends (checked on a small shape)."""
    folder, ref = tiny_models["llama"]
    model = load_model(str(folder), backend, dtype="bfloat16")
    assert backend.dtype_name(model.params["model.embed_tokens.weight"]) == "bfloat16"
    ids = random_ids(ref.config.vocab_size, (1, 8))
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    got = backend.to_numpy(model.logits(backend.from_numpy(ids)))
    assert np.abs(got - expected).max() < 0.15 * np.abs(expected).max()


LOAD_PROBE = r"""
import sys, psutil
from lorafit.backends import get_backend
from lorafit.models.loader import load_model
B = get_backend(sys.argv[2], "cpu")
base = psutil.Process().memory_info().rss
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
model = load_model(sys.argv[1], B, sys.argv[3])
B.synchronize()
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
size = sum(B.nbytes(v) for v in model.params.values())
print(hwm - base, size)
"""


@pytest.mark.parametrize("backend_name,dtype", [("torch", "float32"), ("torch", "bfloat16"),
                                                ("mlx", "float32")])
def test_loading_never_holds_a_second_full_copy(tmp_path, backend_name, dtype):
    """Peak host memory while loading stays near the weights' size in the target dtype."""
    import subprocess
    import sys

    from lorafit.models import parameter_shapes
    from lorafit.models.tiny import char_tokenizer, save_numpy_model

    cfg = dict(model_type="llama", hidden_size=512, intermediate_size=1408, vocab_size=16000,
               num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s, dtype=np.float32) * 0.02
               for k, s in parameter_shapes(cfg).items()}
    save_numpy_model(tmp_path, cfg, {}, char_tokenizer("ab"))
    (tmp_path / "model.safetensors").unlink()
    from safetensors.numpy import save_file
    names, shards, wmap = sorted(weights), 6, {}
    for i in range(shards):  # a sharded checkpoint, as large models come
        part = {k: weights[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(tmp_path / fname))
        wmap.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    shard_bytes = max(sum(weights[k].nbytes for k in names[i::shards]) for i in range(shards))
    del weights
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(tmp_path), backend_name, dtype],
                         capture_output=True, text=True, check=True)
    growth, size = map(int, out.stdout.split())
    assert size > 90 * 2**20 * (0.5 if dtype == "bfloat16" else 1)
    # the weights in their target dtype, plus at most the shard being read (its pages are
    # mapped while it is open), plus interpreter noise
    assert growth < size + shard_bytes + 48 * 2**20, (growth / 2**20, size / 2**20)
