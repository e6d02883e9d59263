"""--shard's frozen base (backends/torch/sharded_base.py): how a layer is cut. The gather
and the training run that uses it are tested across 2 processes in
tests/core/test_distributed.py; here, without processes, that the N slices hold the layer's
arrays exactly, end to end per dtype, and padded to N equal parts."""

from __future__ import annotations

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
