"""Per-expert MoE checkpoints (the Hub's layout, which transformers v5's save_pretrained
also writes) fused into the stacked 3D expert parameters models/blocks/moe.py uses."""

from __future__ import annotations


def fuse_experts(ops, weights: dict, args, pattern, gate: str, up: str, down: str) -> dict:
    """pattern matches a per-expert key with groups (layer prefix, expert, projection name);
    gate/up/down are the checkpoint's projection names. Each layer's experts become
    `<prefix>mlp.experts.gate_up_proj` (E, 2F, C) = [gate; up] per expert and
    `<prefix>mlp.experts.down_proj` (E, C, F); the per-expert tensors are dropped as each
    layer is fused."""
    per_layer: dict = {}
    for k in list(weights):
        m = pattern.fullmatch(k)
        if m:
            per_layer.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = weights.pop(k)
    for prefix, parts in per_layer.items():
        n = args.num_local_experts

        def stacked(rows):
            return ops.concat([r.reshape(1, *r.shape) for r in rows], axis=0)

        weights[prefix + "mlp.experts.gate_up_proj"] = stacked(
            [ops.concat([parts.pop((e, gate)), parts.pop((e, up))], axis=0) for e in range(n)])
        weights[prefix + "mlp.experts.down_proj"] = stacked(
            [parts.pop((e, down)) for e in range(n)])
    return weights


def expert_pieces(name: str, shape: tuple, template: str, gate: str, up: str,
                  down: str) -> list | None:
    """The per-expert checkpoint tensors [(name, shape)] whose row-major contents, laid end
    to end, are the stacked array `name` of that shape that fuse_experts builds (expert
    by expert: gate then up for gate_up_proj, as gate_up_proj[e] = [gate_e; up_e]); None
    for any other array. template names one expert's tensor within the layer, with {e}
    and {proj}. --shard reads a rank's slice of a stacked array from these
    (models/loader.py plan_layer_slices), opening only the experts in its range."""
    prefix, sep, array = name.rpartition("mlp.experts.")
    if not sep or len(shape) != 3:
        return None
    experts, rows, cols = (int(d) for d in shape)
    if array == "gate_up_proj" and rows % 2 == 0:
        return [(prefix + template.format(e=e, proj=p), (rows // 2, cols))
                for e in range(experts) for p in (gate, up)]
    if array == "down_proj":
        return [(prefix + template.format(e=e, proj=down), (rows, cols))
                for e in range(experts)]
    return None
