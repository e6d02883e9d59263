"""LoRA and DoRA with PEFT's semantics, as leaves beside the frozen weights: the one home
of all adapter and quantized-linear math. A model family only says which projections exist;
its forward calls `project` for each, whatever backend the arrays live on.

A targeted projection `W` (out, in) gains `lora_A` (r, in) and `lora_B` (out, r);
y = x W^T + s * dropout(x) A^T B^T with s = alpha / r (alpha / sqrt(r) with rsLoRA).
A is drawn as PEFT's default (Kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))),
B starts at zero, so the adapted model starts equal to the base. Initial values come from
numpy and the run's seed, so every backend starts from identical weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorafit.backends.base import LAYERS, SHARDED_LAYER
from lorafit.core.errors import LorafitError

LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"

# Mixture-of-experts weights are 3D (experts, out, in) parameters; PEFT adapts them with its
# ParamWrapper: lora_A (E*r, in), lora_B (out, E*r), expert e's update being
# B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]. With transformers v5, PEFT fuses
# the per-expert gate and up adapters into one on `experts.gate_up_proj` with twice the rank
# and twice alpha (its rank_pattern / alpha_pattern), so the fused pair is the two it replaces.
FUSED_RANK = {"gate_up_proj": 2}
MAGNITUDE = "lora_magnitude_vector"  # DoRA's learned per-output-row magnitude (PEFT's name)


@dataclass
class LoraConfig:
    r: int = 8
    """Rank of the update."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: list | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (`q_proj`, `down_proj`, ...) or "all-linear" (every projection but the head)."""
    layers: list | None = None
    """Layer indices to adapt; None adapts every layer."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): a learned magnitude per output row, as PEFT's use_dora."""

    def __post_init__(self):
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if not isinstance(self.r, int) or self.r <= 0:
            raise LorafitError(f"LoRA rank must be a positive integer, got {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise LorafitError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LorafitError("no LoRA targets given")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# -- the forward of one projection --------------------------------------------------------

def base_linear(ops, lp: dict, name: str, x, quant, bias=None):
    """The frozen projection, full precision or quantized (packed weight, scales, biases)."""
    if quant is None:
        return ops.linear(x, lp[name + ".weight"], bias)
    y = ops.quantized_linear(x, lp[name + ".weight"], lp[name + ".scales"],
                             lp.get(name + ".biases"), quant["bits"], quant["group_size"])
    return y + bias if bias is not None else y


def dense_weight(ops, lp: dict, name: str, quant):
    """The frozen weight as a dense matrix (dequantized when stored quantized)."""
    if quant is None:
        return lp[name + ".weight"]
    return ops.dequantize(lp[name + ".weight"], lp[name + ".scales"], lp.get(name + ".biases"),
                          quant["bits"], quant["group_size"])


def _quant(lp: dict, name: str, quant_cfg):
    return quant_cfg if quant_cfg and name + ".scales" in lp else None


STACK_A, STACK_B = "stacked_A", "stacked_B"  # the engine's per-row adapter stacks
STACK_DORA = "stacked_dora"  # (E, out): DoRA's m / ||W + s B A||_row per adapter, 1 if none


@dataclass
class RowAdapters:
    """Each row of a batch with its own adapter (S-LoRA / Punica): beside a frozen weight sit
    every served adapter's factors stacked, A (E, r, in) and B (E, out, r), slot 0 all
    zeros (the base model) and smaller ranks zero-padded; the base matmul runs once for the
    batch and each token's low-rank update gathers its own A and B (ops.gather_linear).
    DoRA's factor m / ||W + s B A|| is a constant at inference, stacked per adapter too."""
    index: Any  # (B*T, 1) int backend array: each token's adapter slot
    scale: Any  # (B, T, 1) float backend array: that adapter's alpha / r
    dropout: float = 0.0  # inference only


def _project_rows(ops, lp: dict, name: str, x, y, rows: RowAdapters, bias=None):
    """y (the base projection, without its bias where the stack has DoRA factors) plus
    each token's own low-rank update (see RowAdapters)."""
    stack_a, stack_b = lp[f"{name}.{STACK_A}"], lp[f"{name}.{STACK_B}"]
    b, t, d_in = x.shape
    adtype = ops.dtype_name(stack_a)
    xa = x if ops.dtype_name(x) == adtype else ops.cast(x, adtype)
    low = ops.gather_linear(xa.reshape(b * t, 1, d_in), stack_a, rows.index)
    delta = ops.gather_linear(low, stack_b, rows.index).reshape(b, t, -1) * rows.scale
    dora = lp.get(f"{name}.{STACK_DORA}")
    if dora is not None:  # as project's DoRA: (y + delta) scaled per row, then the bias
        factor = ops.embedding(rows.index.reshape(b, t), dora)
        out = ops.cast(ops.cast(y, adtype) * factor + delta * factor, ops.dtype_name(y))
        return out + bias if bias is not None else out
    if ops.dtype_name(delta) != ops.dtype_name(y):
        delta = ops.cast(delta, ops.dtype_name(y))
    return y + delta


def _fusable(ops, lp: dict, name: str, x, lora, quant_cfg) -> bool:
    """Whether the projection is a plain LoRA pair (no DoRA, no dropout) on a dense base of
    the adapter's dtype: the case ops.lora_linear and ops.lora_linears take."""
    lora_a, weight = lp.get(f"{name}.{LORA_A}"), lp.get(name + ".weight")
    return (lora_a is not None and not lora.dropout
            and lp.get(f"{name}.{MAGNITUDE}") is None and weight is not None
            and _quant(lp, name, quant_cfg) is None
            and ops.dtype_name(x) == ops.dtype_name(lora_a) == ops.dtype_name(weight))


def project_shared(ops, lp: dict, names, x, lora, quant_cfg=None) -> list:
    """The projections `names` of one input x (q, k, v; gate, up), as project gives each.
    Those that are plain LoRA pairs on dense bases go through ops.lora_linears together:
    the torch backend forms their A products as one (N, sum r) matmul, so x (and, in the
    backward, dL/dx's adapter share and dA's input) is read once, not once per projection."""
    fused = [] if isinstance(lora, RowAdapters) else [
        n for n in names if _fusable(ops, lp, n, x, lora, quant_cfg)]
    if len(fused) < 2:
        return [project(ops, lp, n, x, lora, quant_cfg) for n in names]
    outs = dict(zip(fused, ops.lora_linears(x, [
        (lp[n + ".weight"], lp.get(n + ".bias"), lp[f"{n}.{LORA_A}"], lp[f"{n}.{LORA_B}"])
        for n in fused], lora.scale)))
    return [outs[n] if n in outs else project(ops, lp, n, x, lora, quant_cfg) for n in names]


def project(ops, lp: dict, name: str, x, lora, quant_cfg=None):
    """A linear projection with its LoRA pair, if any: x W^T + b + s * drop(x) A^T B^T.
    With a DoRA magnitude m the update is PEFT's: m / ||W + s B A||_row scales the
    adapted output (the norm is detached, as in the DoRA paper, section 4.3).
    lp maps names within a layer (or the whole model) to arrays; quant_cfg is the model's
    {"bits", "group_size"} when its projections may be stored quantized."""
    bias = lp.get(name + ".bias")
    lora_a = lp.get(f"{name}.{LORA_A}")
    magnitude = lp.get(f"{name}.{MAGNITUDE}")
    quant = _quant(lp, name, quant_cfg)
    if isinstance(lora, RowAdapters) and f"{name}.{STACK_A}" in lp:
        bare = f"{name}.{STACK_DORA}" in lp  # DoRA scales the output before the bias
        y = base_linear(ops, lp, name, x, quant, bias=None if bare else bias)
        return _project_rows(ops, lp, name, x, y, lora, bias if bare else None)
    dropout = lora is not None and lora.dropout
    if _fusable(ops, lp, name, x, lora, quant_cfg):
        # base + update as one op: the torch backend fuses them (backends/torch, _LoraLinear)
        return ops.lora_linear(x, lp[name + ".weight"], bias, lora_a, lp[f"{name}.{LORA_B}"],
                               lora.scale)
    y = base_linear(ops, lp, name, x, quant,
                    bias=bias if lora_a is None or magnitude is None else None)
    if lora_a is None:
        return y
    xa = ops.dropout(x, lora.dropout) if dropout else x
    adtype = ops.dtype_name(lora_a)
    if ops.dtype_name(xa) != adtype:
        xa = ops.cast(xa, adtype)
    lora_b = lp[f"{name}.{LORA_B}"]
    # s scales the (N, r) intermediate rather than the (N, out) update: the same product,
    # r / out of the multiplies, forward and backward
    delta = ops.linear(ops.linear(xa, lora_a) * lora.scale, lora_b)
    if magnitude is not None:
        lora_weight = ops.linear(lora_b, ops.swapaxes(lora_a, 0, 1))  # B @ A: (out, in)
        dense = ops.cast(dense_weight(ops, lp, name, quant), adtype)
        norm = ops.stop_gradient(ops.row_norms(dense + lora.scale * lora_weight))
        scale = magnitude / norm
        out = ops.cast(y, adtype) * scale + delta * scale
        out = ops.cast(out, ops.dtype_name(y))
        return out + bias if bias is not None else out
    if ops.dtype_name(delta) != ops.dtype_name(y):
        delta = ops.cast(delta, ops.dtype_name(y))
    return y + delta


# -- adapters on a model ------------------------------------------------------------------

def weight_key(shapes: dict, module: str) -> str:
    """The frozen parameter a module's adapter sits on: `<module>.weight`, or the module
    name itself for an MoE's 3D expert parameter (`...experts.gate_up_proj`)."""
    return module + ".weight" if module + ".weight" in shapes else module


def expert_rank(cfg: LoraConfig, module: str) -> int:
    """The rank of an adapter on a 3D expert parameter (PEFT's fused gate_up: 2r)."""
    return cfg.r * FUSED_RANK.get(module.rsplit(".", 1)[-1], 1)


def expert_lora_factors(ops, lora_a, lora_b, experts: int):
    """PEFT's per-expert factors of a 3D adapter: A (E, r, in) and B (E, out, r)."""
    a3 = lora_a.reshape(experts, -1, lora_a.shape[-1])
    b3 = lora_b.reshape(lora_b.shape[0], -1, experts)  # (out, r, E)
    return a3, ops.swapaxes(ops.swapaxes(b3, 0, 2), 1, 2)


def target_modules(cfg: LoraConfig, linear_shapes: dict, module_names: tuple) -> list[str]:
    """Full module names (`model.layers.0.self_attn.q_proj`) that get an adapter.

    linear_shapes maps every frozen `<module>.weight` to its shape; module_names are the
    family's projection names (all-linear selects all of them)."""
    wanted = set(module_names) if cfg.targets == "all-linear" else set(cfg.targets)
    unknown = wanted - set(module_names)
    if unknown:
        raise LorafitError(f"unknown LoRA target(s) {', '.join(sorted(unknown))}; this model "
                           f"has: {', '.join(module_names)} (or all-linear)")
    out = []
    # stacked expert parameters are (E, out, in) without a `.weight` suffix (a conv1d's
    # (C, 1, K) weight is not one)
    moe_model = any(len(s) == 3 and not k.endswith(".weight") for k, s in linear_shapes.items())
    # a family whose stacked experts take no adapter (gate_up_proj not among its names:
    # PEFT adapts only nn.Linear modules there) keeps its 2D down_proj as a target
    expert_targets = moe_model and "gate_up_proj" in module_names
    for key, shape in linear_shapes.items():
        if expert_targets and len(shape) == 2 and key.endswith(".down_proj.weight"):
            continue  # PEFT (transformers v5) maps down_proj to the experts' parameter only
        if moe_model and not expert_targets and len(shape) == 3 and not key.endswith(".weight"):
            continue
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
        elif len(shape) == 3:  # an MoE's stacked expert weights
            module = key
        else:
            continue
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in wanted:
            continue
        m = re.match(r"model\.layers\.(\d+)\.", module)
        if cfg.layers is not None and (m is None or int(m.group(1)) not in cfg.layers):
            continue
        out.append(module)
    if not out:
        raise LorafitError("the LoRA targets and layer selection match no module")
    return sorted(out, key=_natural_key)  # the same order whatever order weights loaded in


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def init_adapter(cfg: LoraConfig, shapes: dict, module_names: tuple, seed: int) -> dict:
    """Fresh adapter leaves {name: np.float32 array}, identical for a given seed."""
    rng = np.random.default_rng(seed)
    out = {}
    for module in target_modules(cfg, shapes, module_names):
        shape = shapes[weight_key(shapes, module)]
        if len(shape) == 3:  # experts (E, out, in): PEFT's ParamWrapper layout
            if cfg.dora or cfg.rslora or cfg.dropout:
                raise LorafitError(f"{module}: adapters on MoE experts support plain LoRA "
                                   "only (no DoRA, rsLoRA or dropout, as PEFT's ParamWrapper)")
            n, d_out, d_in = shape
            rank = expert_rank(cfg, module) * n
            out[f"{module}.{LORA_A}"] = rng.uniform(-1.0 / math.sqrt(d_in), 1.0 / math.sqrt(d_in),
                                                    (rank, d_in)).astype(np.float32)
            out[f"{module}.{LORA_B}"] = np.zeros((d_out, rank), dtype=np.float32)
            continue
        d_out, d_in = shape
        bound = 1.0 / math.sqrt(d_in)
        out[f"{module}.{LORA_A}"] = rng.uniform(-bound, bound, (cfg.r, d_in)).astype(np.float32)
        out[f"{module}.{LORA_B}"] = np.zeros((d_out, cfg.r), dtype=np.float32)
    return out


def attach(model, cfg: LoraConfig, adapter: dict | None = None, seed: int = 0,
           dtype: str = "float32") -> list[str]:
    """Add adapter leaves to model.params (fresh from seed, or the given numpy arrays);
    returns the names of the trainable leaves."""
    shapes = model.parameter_shapes()  # logical shapes, whatever the storage
    if adapter is None:
        adapter = init_adapter(cfg, shapes, model.linear_modules(), seed)
    check_adapter_fits(adapter, shapes)
    ops = model.backend
    for name, value in adapter.items():
        model.params[name] = ops.from_numpy(np.asarray(value, dtype=np.float32), dtype)
    model.lora = cfg
    if cfg.dora:
        gathered: dict = {}  # a layer cut across processes at load, gathered once
        for name in [k for k in adapter if k.endswith(LORA_A)]:
            mag = f"{_module(name)}.{MAGNITUDE}"
            if mag not in model.params:  # fresh DoRA: m = ||W + s B A|| row-wise (= ||W||)
                w = _dense(model, _module(name), gathered)
                delta = ops.linear(model.params[f"{_module(name)}.{LORA_B}"],
                                   ops.swapaxes(model.params[name], 0, 1))
                model.params[mag] = ops.cast(
                    ops.row_norms(ops.cast(w, "float32") + cfg.scale * delta), dtype)
    elif any(k.endswith(MAGNITUDE) for k in adapter):
        raise LorafitError("the adapter has DoRA magnitudes but the config does not say dora")
    return adapter_leaves(model.params)


def _dense(model, module: str, gathered: dict | None = None):
    """The frozen weight of a module as a dense backend array (dequantized if needed)."""
    if module + ".weight" not in model.params and module not in model.params:
        return _sharded_weight(model, module, {} if gathered is None else gathered)
    if module + ".weight" not in model.params:  # an MoE's 3D expert parameter
        return model.params[module]
    return dense_weight(model.backend, model.params, module,
                        _quant(model.params, module, model.args.quantization))


def _sharded_weight(model, module: str, gathered: dict):
    """A weight its process holds 1/N of (--shard, cut while loading): the module's layer
    gathered whole (a collective: every rank attaches the same modules in the same order),
    kept in `gathered` for the layer's next modules."""
    prefix = module[:module.index(".", len(LAYERS)) + 1]  # model.layers.<i>.
    if gathered.get("prefix") != prefix:
        layer = {k[len(prefix):]: v for k, v in model.params.items()
                 if k.startswith(prefix) and ".lora_" not in k}
        gathered.clear()
        gathered.update(prefix=prefix, arrays=model.backend.gather_frozen(layer))
    rest = module[len(prefix):]
    arrays = gathered["arrays"]
    return arrays[rest + ".weight"] if rest + ".weight" in arrays else arrays[rest]


def check_adapter_fits(adapter: dict, shapes: dict) -> None:
    """Every adapter leaf must sit on an existing projection with matching sizes."""
    for name in sorted(adapter):
        a = tuple(adapter[name].shape)
        module = name.rsplit(".lora_", 1)[0]
        w = shapes.get(weight_key(shapes, module))
        if w is not None and len(w) == 3:  # experts: A (E*r, in), B (out, E*r)
            w = (w[1], w[2])
        if w is None:
            raise LorafitError(f"adapter key {name} names a module the model does not have")
        if name.endswith(MAGNITUDE):
            if a != (w[0],):
                raise LorafitError(f"adapter does not fit the model: {name} has shape {a}, "
                                   f"the model needs ({w[0]},)")
            continue
        if len(a) != 2:
            raise LorafitError(f"adapter key {name} has shape {a}; expected a matrix")
        ok = a[1] == w[1] if name.endswith(LORA_A) else a[0] == w[0]
        if not ok:
            want = f"(r, {w[1]})" if name.endswith(LORA_A) else f"({w[0]}, r)"
            raise LorafitError(f"adapter does not fit the model: {name} has shape {a}, "
                               f"the model needs {want} (weight {module}.weight is {w})")


def adapter_leaves(params: dict) -> list[str]:
    return sorted(k for k in params if ".lora_" in k)


def detach(model) -> dict:
    """Remove the adapter leaves from the model; returns them as numpy arrays."""
    ops = model.backend
    out = {k: ops.to_numpy(model.params.pop(k)) for k in adapter_leaves(model.params)}
    model.lora = None
    return out


def merged_weights(weights: dict, adapter: dict, scale: float) -> dict:
    """{module.weight: W + s * B A} in numpy float32 for each adapted module.
    Refuses to produce non-finite weights (PEFT's safe_merge)."""
    out = {}
    for name in sorted(adapter):
        if not name.endswith(LORA_A):
            continue
        module = _module(name)
        lora_a, lora_b = adapter[name], adapter[f"{module}.{LORA_B}"]
        key = weight_key(weights, module)
        w = np.asarray(weights[key], dtype=np.float32)
        if w.ndim == 3:  # experts: expert e gets B_e A_e (see FUSED_RANK)
            n = w.shape[0]
            a3 = lora_a.astype(np.float32).reshape(n, -1, lora_a.shape[-1])
            b3 = lora_b.astype(np.float32).reshape(lora_b.shape[0], -1, n)
            merged = w + scale * np.einsum("ore,eri->eoi", b3, a3)
        else:
            merged = w + scale * (lora_b.astype(np.float32) @ lora_a.astype(np.float32))
        magnitude = adapter.get(f"{module}.{MAGNITUDE}")
        if magnitude is not None:  # DoRA: rescale each row to its learned magnitude
            norm = np.linalg.norm(merged, axis=1)
            merged = merged * (np.asarray(magnitude, np.float32) / norm)[:, None]
        if not np.isfinite(merged).all():
            raise LorafitError(f"merging {module} gives non-finite weights; adapter is broken")
        out[key] = merged
    return out


def merge(model) -> None:
    """Fold the adapter into the frozen weights and drop the adapter leaves."""
    ops, scale = model.backend, model.lora.scale
    adapter = {k: ops.to_numpy(model.params[k]) for k in adapter_leaves(model.params)}
    weights = {weight_key(model.params, _module(k)): ops.to_numpy(_dense(model, _module(k)))
               for k in adapter if k.endswith(LORA_A)}
    for name, w in merged_weights(weights, adapter, scale).items():
        model.params[name] = ops.from_numpy(w, model.dtype)
        for q in (".scales", ".biases"):  # a quantized base becomes dense where merged
            model.params.pop(name[: -len(".weight")] + q, None)
    detach(model)


def unmerge(model, adapter: dict, cfg: LoraConfig) -> None:
    """Undo `merge`: subtract s * B A from each weight and put the adapter back."""
    if cfg.dora:
        raise LorafitError("a merged DoRA adapter cannot be unmerged (the row norms of the "
                           "original weights are gone); reload the base model instead")
    ops = model.backend
    weights = {weight_key(model.params, _module(k)):
               ops.to_numpy(model.params[weight_key(model.params, _module(k))])
               for k in adapter if k.endswith(LORA_A)}
    for name, w in merged_weights(weights, adapter, -cfg.scale).items():
        model.params[name] = ops.from_numpy(w, model.dtype)
    attach(model, cfg, adapter)


def _module(leaf: str) -> str:
    """`m.lora_A.weight` -> `m`."""
    return leaf.rsplit(".lora_", 1)[0]


BUFFERS = (".layer_scalar",)  # checkpoint tensors that are buffers, not parameters (Gemma 4)


def count_params(params: dict, logical_shapes: dict | None = None) -> tuple[int, int]:
    """(trainable, all) parameter counts, adapter leaves being the trainable ones. Packed
    quantized weights count as the weights they stand for (from logical_shapes); stored
    buffers (BUFFERS) are not parameters, as PyTorch and PEFT count them."""
    total = trainable = 0
    for k, v in params.items():
        if k.endswith(SHARDED_LAYER):  # --shard, cut at load: the layer's whole arrays
            layer = k[:-len(SHARDED_LAYER)]
            total += sum(int(np.prod(shape)) for n, shape in (logical_shapes or {}).items()
                         if n.startswith(layer) and not n.endswith(BUFFERS))
            continue
        if not hasattr(v, "shape") or k.endswith((".scales", ".biases") + BUFFERS):
            continue  # quantization metadata or buffers, not parameters
        shape = (logical_shapes or {}).get(k, v.shape)
        n = int(np.prod(shape))
        total += n
        if ".lora_" in k:
            trainable += n
    return trainable, total


def summary(params: dict, logical_shapes: dict | None = None) -> str:
    """PEFT's print_trainable_parameters line."""
    trainable, total = count_params(params, logical_shapes)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")
