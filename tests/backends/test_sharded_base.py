"""--shard's frozen base (backends/torch/sharded_base.py): how a layer is cut. The gather
and the training run that uses it are tested across 2 processes in
tests/core/test_distributed.py; here, without processes, that the N slices hold the layer's
arrays exactly, end to end per dtype, and padded to N equal parts."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")


def test_the_slices_of_a_layer_are_its_arrays_end_to_end_padded_to_equal_parts():
    from lorafit.backends.base import SHARDED_LAYER
    from lorafit.backends.torch.sharded_base import ShardedLayer, shard_layers
    from lorafit.core.errors import LorafitError

    g = torch.Generator().manual_seed(0)
    arrays = {"self_attn.q_proj.weight": torch.randn(5, 3, generator=g),
              "input_layernorm.weight": torch.randn(7, generator=g),
              "mlp.down_proj.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16)}
    world = 3
    pieces = [ShardedLayer(arrays, r, world) for r in range(world)]
    for dtype, names in ((torch.float32, ["self_attn.q_proj.weight", "input_layernorm.weight"]),
                         (torch.bfloat16, ["mlp.down_proj.weight"])):
        flat = torch.cat([arrays[n].reshape(-1) for n in names])
        locals_ = [next(loc for _, loc in p.groups if loc.dtype == dtype) for p in pieces]
        per = -(-flat.numel() // world)
        assert all(loc.numel() == per for loc in locals_)
        joined = torch.cat(locals_)
        assert torch.equal(joined[:flat.numel()], flat) and not joined[flat.numel():].any()
        entries = next(e for e, loc in pieces[0].groups if loc.dtype == dtype)
        for name, shape, off, n in entries:  # where gather's views will read each array
            assert torch.equal(joined[off:off + n].view(shape), arrays[name])
    assert pieces[0].nbytes == -(-22 // 3) * 4 + -(-12 // 3) * 2
    params = {f"model.layers.{i}.{k}": v for i in range(2) for k, v in arrays.items()}
    params.update({"model.embed_tokens.weight": torch.zeros(4, 3),
                   "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 3)})
    cut = shard_layers(params, 1, world)
    assert sorted(cut) == sorted(["model.embed_tokens.weight",
                                  "model.layers.0.self_attn.q_proj.lora_A.weight",
                                  f"model.layers.0.{SHARDED_LAYER}",
                                  f"model.layers.1.{SHARDED_LAYER}"])
    with pytest.raises(LorafitError, match="quantized base is not sharded"):
        ShardedLayer({"w": torch.zeros(4, dtype=torch.uint8)}, 0, 2)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one: the gathers run for real (of one slice each)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists already")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("model_type,kw,lora_kw", [
    # k, v reused from earlier layers, per-layer inputs, soft-capping
    ("gemma4_text", dict(head_dim=16, global_head_dim=32, sliding_window=6,
                         num_hidden_layers=4, num_kv_shared_layers=2,
                         layer_types=["sliding_attention", "full_attention"] * 2,
                         hidden_size_per_layer_input=8, vocab_size_per_layer_input=512,
                         final_logit_softcapping=3.0), dict(targets="all-linear")),
    # experts (3D arrays in the layer), DoRA's norms of the gathered weights
    ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40),
     dict(targets="q_proj,v_proj", dora=True)),
])
def test_a_sharded_base_gives_the_plain_forwards_loss_and_gradients(
        tmp_path, tokenizer, torch_backend, one_rank_group, model_type, kw, lora_kw):
    """The decoder over gathered layers (recomputed, each gathered again in the backward)
    equals the plain forward: the families whose layers read more than their own weights."""
    import numpy as np
    from conftest import build_hf_model, random_ids
    from lorafit.backends.torch.sharded_base import shard_layers
    from lorafit.core import lora
    from lorafit.core.lora import LoraConfig
    from lorafit.models import default_positions
    from lorafit.models.loader import load_model

    folder, ref = build_hf_model(tmp_path, model_type, tokenizer, **kw)
    ops = torch_backend
    model = load_model(str(folder), ops)
    names = lora.attach(model, LoraConfig(r=2, alpha=4, **lora_kw), seed=0)
    rng = np.random.default_rng(0)
    for k in [k for k in names if "lora_B" in k]:  # B non-zero: every gradient is
        model.params[k] = ops.from_numpy(rng.normal(0, 0.1, tuple(model.params[k].shape))
                                         .astype(np.float32))
    ids = ops.from_numpy(random_ids(ref.config.vocab_size, (2, 12), seed=1))
    pos = default_positions(ops, (2, 12))
    frozen = {k: v for k, v in model.params.items() if k not in names}
    probe = ops.from_numpy(rng.normal(size=(2, 12, ref.config.hidden_size)).astype(np.float32))
    out = []
    for params in (frozen, shard_layers(frozen, 0, 1)):
        def f(tr, _):
            h = model.hidden(ids, pos, params={**params, **tr})
            return (h * probe).sum(), None
        (loss, _), g = ops.value_and_grad(f)({k: model.params[k] for k in names}, None)
        out.append((ops.to_float(loss), {k: ops.to_numpy(v) for k, v in g.items()}))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    for k in names:
        np.testing.assert_allclose(out[1][1][k], out[0][1][k], rtol=1e-4, atol=1e-6)
        assert np.abs(out[0][1][k]).max() > 0, k


@pytest.fixture(scope="module")
def tiny_moe_folders(tmp_path_factory, tokenizer):
    """Mixtral and Qwen3-MoE saved by transformers in the Hub's per-expert layout (one
    tensor per expert and projection), small: 4 experts of width 24 (and 40)."""
    from conftest import build_hf_model

    out = {}
    for mt, kw in (("mixtral", dict(num_local_experts=4, num_experts_per_tok=2,
                                    intermediate_size=24, hidden_size=32)),
                   ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=40, hidden_size=32,
                                      mlp_only_layers=[1]))):
        out[mt] = build_hf_model(tmp_path_factory.mktemp(mt), mt, tokenizer, **kw)[0]
    return out


@pytest.mark.parametrize("model", ["small_llama", "mixtral", "qwen3_moe"])
def test_a_layer_read_straight_from_the_files_is_the_slice_cut_from_the_whole_layer(
        request, tiny_moe_folders, model, monkeypatch):
    """--shard at load (models/loader.py, ShardedLayer.read): each rank's slices read from
    the safetensors files equal, bit for bit, the slices cut from the whole loaded layer
    (3 ranks, so slices start and end inside arrays and rows, and inside experts; and cast
    to bf16 on the way); nothing of the layers is held whole, and the arrays outside the
    layers are. The MoE checkpoints are stored per expert: the stacked experts are read
    expert by expert, only those in the rank's range (a dense layer beside them in
    Qwen3-MoE)."""
    from lorafit.backends.base import SHARDED_LAYER
    from lorafit.backends.torch import TorchBackend
    from lorafit.backends.torch import sharded_base
    from lorafit.backends.torch.sharded_base import ShardedLayer
    from lorafit.models.loader import load_model

    read = []  # the checkpoint tensors each rank's load reads from
    flat_range = sharded_base._flat_range
    monkeypatch.setattr(sharded_base, "_flat_range",
                        lambda h, key, *a: read.append(key) or flat_range(h, key, *a))
    folder = request.getfixturevalue(model)[0] if model == "small_llama" \
        else tiny_moe_folders[model]
    ops = TorchBackend("cpu")
    for dtype in ("float32", "bfloat16"):
        whole = load_model(str(folder), ops, dtype).params
        layers = sorted({k.split(".")[2] for k in whole if k.startswith("model.layers.")})
        for rank in range(3):
            ops.rank, ops.world_size = rank, 3
            read.clear()
            params = load_model(str(folder), ops, dtype, shard=True).params
            ops.rank, ops.world_size = 0, 1
            experts = [k for k in _keys(folder) if ".experts." in k]  # (none in Llama)
            assert len(set(read) & set(experts)) <= len(experts) * 2 / 3  # only its range
            assert sorted(k for k in params if not k.startswith("model.layers.")) == \
                sorted(k for k in whole if not k.startswith("model.layers."))
            for k in params:
                if not k.startswith("model.layers."):
                    assert torch.equal(params[k], whole[k]), k
            assert sorted(k for k in params if k.startswith("model.layers.")) == \
                sorted(f"model.layers.{i}.{SHARDED_LAYER}" for i in layers)
            for i in layers:
                got = params[f"model.layers.{i}.{SHARDED_LAYER}"]
                prefix = f"model.layers.{i}."
                names = [n for n in got.groups[0][0]]
                assert sorted(n[0] for n in names) == \
                    sorted(k[len(prefix):] for k in whole if k.startswith(prefix))
                cut = ShardedLayer({n[0]: whole[prefix + n[0]] for n in names}, rank, 3)
                assert [e for e, _ in got.groups] == [e for e, _ in cut.groups]
                assert got.groups[0][1].dtype == cut.groups[0][1].dtype
                assert torch.equal(got.groups[0][1], cut.groups[0][1]), (dtype, rank, i)
                assert got.nbytes == cut.nbytes
    if model != "small_llama":  # the experts are stacked from per-expert tensors
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in whole)
        assert any(".experts.0." in k for k in _keys(folder))


def _keys(folder) -> list:
    from lorafit.models.loader import safetensors_header, weight_files

    return [k for f in weight_files(folder) for k in safetensors_header(f)]


def load_peak(folder, at_load: bool) -> dict:
    """Rank 0 of 2 loading the base for --shard: the resident high-water mark of the load
    above where it started (/proc's VmHWM, restarted through clear_refs) and the bytes of
    the arrays held at the end. Loading and cutting need no process group."""
    import gc

    import psutil
    from lorafit.backends.torch import TorchBackend
    from lorafit.backends.torch.memory import _read_hwm
    from lorafit.models.loader import load_model

    ops = TorchBackend("cpu")
    ops.rank, ops.world_size = 0, 2
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = psutil.Process().memory_info().rss
    if _read_hwm() > before + 2**20:
        pytest.skip("this kernel does not restart the resident high-water mark")
    params = load_model(str(folder), ops, "float32", shard=at_load).params
    params = ops.shard_frozen(params)  # what the trainer does (nothing left if sliced)
    out = {"peak": _read_hwm() - before, "held": sum(ops.nbytes(v) for v in params.values())}
    del params
    gc.collect()
    return out


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="measures with /proc/self/status and clear_refs (Linux)")
def test_a_sharded_load_never_holds_the_whole_base(tmp_path):
    """Each rank's memory while loading with --shard: the arrays it holds are the part
    outside the layers plus 1/N of the layers, and the measured resident high-water mark of
    the load (/proc's VmHWM) stays well below the whole base, and below loading the whole
    base and cutting it afterwards (as before). (On the CPU the
    whole base is memory-mapped by safetensors and becomes resident as the cut reads it;
    on CUDA it was copied to the device whole.)"""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from lorafit.models import decoder, model_args

    cfg = dict(model_type="llama", hidden_size=384, intermediate_size=1024,
               num_attention_heads=8, num_key_value_heads=8, num_hidden_layers=8,
               vocab_size=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=256, tie_word_embeddings=False,
               torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    shapes = decoder.parameter_shapes(model_args(dict(cfg)))
    save_file({k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()},
              str(tmp_path / "model.safetensors"))
    size = lambda keys: sum(int(np.prod(shapes[k])) * 4 for k in keys)  # noqa: E731
    layers = size(k for k in shapes if k.startswith("model.layers."))
    outside = size(k for k in shapes if not k.startswith("model.layers."))
    got = {"after load": load_peak(tmp_path, False),  # (pays for first-time imports)
           "at load": load_peak(tmp_path, True)}
    print(f"whole base {(layers + outside) / 2**20:.1f} MiB; rank 0 of 2's load peak, "
          f"cut after loading {got['after load']['peak'] / 2**20:.1f} MiB, read as slices "
          f"{got['at load']['peak'] / 2**20:.1f} MiB")
    for way in got.values():  # the same arrays held in the end
        assert 0 <= way["held"] - (outside + layers / 2) <= 4 * cfg["num_hidden_layers"]
    assert got["at load"]["peak"] <= 0.7 * (layers + outside)
    # cutting after a whole load rises higher: to the whole base here, 0.74 of it on a CI
    # machine (how much of the memory-mapped file stays resident is the kernel's choice)
    assert got["at load"]["peak"] <= got["after load"]["peak"] - layers / 8


def test_a_fresh_dora_adapter_on_a_base_cut_at_load_gathers_its_norms(
        small_llama, torch_backend, one_rank_group):
    """A base already cut when the adapter attaches (--shard reads slices at load): DoRA's
    fresh magnitudes (row norms of the frozen weights) gather each layer (a collective) and
    equal those of the whole base; the parameter count counts the cut layers whole."""
    import numpy as np
    from lorafit.backends.torch.sharded_base import shard_layers
    from lorafit.core import lora
    from lorafit.core.lora import LoraConfig
    from lorafit.models.loader import load_model

    cfg = LoraConfig(r=2, alpha=4, targets="q_proj,v_proj,down_proj", dora=True)
    whole = load_model(str(small_llama[0]), torch_backend)
    names = lora.attach(whole, cfg, seed=0)
    cut = load_model(str(small_llama[0]), torch_backend)
    cut.params = shard_layers(cut.params, 0, 1)  # what a sharded load hands over
    assert lora.attach(cut, cfg, seed=0) == names
    for k in [k for k in names if k.endswith(lora.MAGNITUDE)]:
        np.testing.assert_array_equal(cut.params[k].numpy(), whole.params[k].numpy())
    shapes = whole.parameter_shapes()
    assert lora.count_params(cut.params, shapes) == lora.count_params(whole.params, shapes)
