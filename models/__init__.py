"""Models: one decoder (decoder.py) driven by a family description (spec.py, families/),
the loader of Hugging Face folders (loader.py), and the loaded-model record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorafit.backends.base import LAYERS
from lorafit.core.errors import LorafitError
from lorafit.models import decoder
from lorafit.models.families import model_args
from lorafit.models.spec import GELU_TANH


def check_token_ids(id_arrays, vocab_size: int, what: str = "data") -> None:
    """Token ids the embedding has no row for (a tokenizer that does not match the model):
    an IndexError on a CPU, a device assert on CUDA and silent garbage on MLX otherwise."""
    top, low = -1, 0
    for ids in id_arrays:
        ids = np.asarray(ids)
        if ids.size:
            top, low = max(top, int(ids.max())), min(low, int(ids.min()))
    if top >= vocab_size or low < 0:
        raise LorafitError(f"{what}: token id {top if top >= vocab_size else low} is outside "
                           f"the model's vocabulary (0-{vocab_size - 1}); the tokenizer does "
                           "not match the model")


@dataclass
class Model:
    """A model held on a backend: its description, its parameters (flat dict of HF names)
    and where it came from. Adapter leaves, when attached, live in the same dict."""

    args: Any  # models.spec.ModelArgs
    params: dict
    backend: Any  # the ops object (backends.base.Backend)
    path: str | None = None
    dtype: str = "float32"
    lora: Any = None  # core.lora.LoraConfig once an adapter is attached
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lorafit.models.loader import load_tokenizer
            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def check_ids(self, ids, what: str = "the prompt") -> None:
        """Refuse token ids the embedding has no row for (see check_token_ids)."""
        check_token_ids([ids], self.args.vocab_size, what)

    def parameter_shapes(self) -> dict:
        """Logical shape of every frozen parameter (packed quantized weights included)."""
        return {k: tuple(v) for k, v in decoder.parameter_shapes(self.args).items()}

    def linear_modules(self) -> tuple:
        return decoder.linear_modules(self.args)

    def output_weight(self, params: dict | None = None):
        return decoder.output_weight(self.params if params is None else params)

    def hidden(self, input_ids, positions, params: dict | None = None, **kw):
        """Final hidden states (B, T, C); params default to the model's own."""
        return decoder.hidden_states(self.backend, self.args,
                                     self.params if params is None else params, input_ids,
                                     positions, lora=self.lora, **kw)

    def logits(self, input_ids, positions=None, **kw):
        """Full logits (B, T, V) for backend int arrays; positions default to 0..T-1."""
        if positions is None:
            positions = default_positions(self.backend, input_ids.shape)
        h = self.hidden(input_ids, positions, **kw)
        return self.head(h)

    def head(self, h):
        """Logits of final hidden states (soft-capped where the family says so)."""
        return decoder.head(self.backend, self.args, h, self.output_weight())


def parameter_shapes(config: dict) -> dict:
    """Name and shape of every weight a model with this config.json dict has (for tools
    that write model folders: the demo, tests)."""
    return decoder.parameter_shapes(model_args(config))


def memory_shape(config: dict):
    """The estimator's description (core.estimate.Shape) of a config.json dict; an
    unsupported model_type is a one-line error, never a guess."""
    from lorafit.core.estimate import Shape

    a = model_args(config)
    shapes = decoder.parameter_shapes(a)
    linears = {}
    moe = None
    if a.num_local_experts:  # sparse MoE: experts counted by the estimator's MoE terms
        from lorafit.models.blocks import moe as moe_block
        moe = moe_block.memory_shape(a)
    absent = []
    for name in decoder.linear_modules(a):
        if moe and name in moe["all_linear"]:
            continue
        key = next((k for k in shapes if k.endswith(f".{name}.weight")), None)
        if key is None:  # in no layer of this config (Gemma 4: k_eq_v, only full layers)
            absent.append(name)
            continue
        out_dim, in_dim = shapes[key]
        linears[name] = (in_dim, out_dim)
    layer_linears, model_linears = _linears_by_place(a, shapes)
    # layers may differ in MoE models too (dense layers, hybrid attention): their 2D
    # projections are then counted per layer and the experts by the estimator's MoE terms
    varied = bool(model_linears or any(d != layer_linears[0] for d in layer_linears))
    # Gemma 4's MoE layers: norms, scales and scalar counted from the shapes (extra_params)
    varied = varied or a.experts_beside_mlp
    layer0 = [k for k in shapes if k.startswith(f"{LAYERS}0.")]
    vectors = sum(int(np.prod(shapes[k])) for k in layer0
                  if k.rsplit(".", 2)[-2] not in linears or not k.endswith(".weight"))
    sh = Shape(hidden=a.hidden_size,
               # an MoE token passes through k experts: its activations are k * F' wide
               # (Gemma 4: plus its dense MLP's F beside the experts)
               intermediate=moe["top_k"] * moe["expert_size"]
               + (a.intermediate_size if a.experts_beside_mlp else 0) if moe
               else a.intermediate_size,
               layers=a.num_hidden_layers, heads=a.num_attention_heads,
               kv_heads=a.num_key_value_heads, head_dim=a.head_dim, vocab=a.vocab_size,
               tied=a.tie_word_embeddings, linears=linears, absent_linears=tuple(absent),
               attention_bias=a.attention_bias, qk_norm=a.qk_norm or a.qk_norm_whole,
               moe=moe,
               # MoE layers are counted by the MoE terms (experts, router, dense layers);
               # layers that differ by what extra_params leaves over
               layer_vectors=None if moe else 0 if varied else vectors,
               final_norm=sum(int(np.prod(v)) for k, v in shapes.items()
                              if k.startswith("model.norm.")),
               attn_softcap=bool(a.attn_logit_softcapping),
               attn_sinks=a.attention_sinks,
               final_softcap=bool(a.final_logit_softcapping),
               per_layer_inputs=a.num_hidden_layers * a.per_layer_input_size,
               attention_output_gate=a.attention_output_gate,
               linear_attention=_linear_attention(a),
               output_norms=sum(n is not None for n in decoder.sublayer_norms(a)[1::2]),
               input_norms=sum(n is not None for n in decoder.sublayer_norms(a)[0::2]))
    per_layer = [0] * a.num_hidden_layers  # frozen elements in each layer (--shard)
    for k, v in shapes.items():
        if k.startswith(LAYERS):
            per_layer[int(k.split(".")[2])] += int(np.prod(v))
    sh.outside_layers = sum(int(np.prod(v)) for v in shapes.values()) - sum(per_layer)
    sh.largest_layer = max(per_layer)
    sh.layer_attention = _layer_attention(a)
    sh.sliding_layers = tuple(i for i in range(a.num_hidden_layers) if a.window(i) is not None)
    sh.output_norm = decoder.sublayer_norms(a)[3] is not None
    sh.v_norm, sh.kv_shared = bool(a.v_norm), bool(a.kv_shared_layers)
    sh.gelu_tanh = a.hidden_act in GELU_TANH
    if varied:  # each layer's projections, those outside the layers, the rest as a count
        from lorafit.core.estimate import Settings, base_weights
        sh.layer_linears, sh.model_linears = layer_linears, model_linears
        total = sum(int(np.prod(v)) for v in shapes.values())
        sh.extra_params = total - base_weights(sh, Settings(dtype="float32")) // 4
    return sh


def _layer_attention(a) -> list | None:
    """Per layer (Hq*D, own Hk*D, read Hk*D, D) where layers differ from heads * head_dim
    (Gemma 4's wider full layers, its kv-sharing layers); None where none does."""
    Hq, out = a.num_attention_heads, []
    for i in range(a.num_hidden_layers):
        D, src = a.head_dim_of(i), a.kv_source(i)
        kv = a.kv_heads_of(i if src is None else src) * a.head_dim_of(i if src is None else src)
        out.append((Hq * D, 0 if src is not None else kv, kv, D))
    plain = (Hq * a.head_dim, a.num_key_value_heads * a.head_dim,
             a.num_key_value_heads * a.head_dim, a.head_dim)
    return None if all(x == plain for x in out) else out


def _linear_attention(a) -> dict | None:
    """The Gated DeltaNet layers and dims of a hybrid model, None without them."""
    layers = [i for i, t in enumerate(a.layer_types) if t == "linear_attention"]
    if not layers:
        return None
    return dict(layers=layers, key_heads=a.linear_num_key_heads,
                value_heads=a.linear_num_value_heads, key_dim=a.linear_key_head_dim,
                value_dim=a.linear_value_head_dim)


def _linears_by_place(a, shapes: dict) -> tuple:
    """([per layer {projection: (in, out)}], {projection outside the layers: (in, out)})."""
    layer_linears = [{} for _ in range(a.num_hidden_layers)]
    model_linears = {}
    names = decoder.linear_modules(a)
    for k, shape in shapes.items():
        module = k[: -len(".weight")]
        name = module.rsplit(".", 1)[-1]
        if not k.endswith(".weight") or name not in names:
            continue
        out_dim, in_dim = shape
        if module.startswith(LAYERS):
            layer_linears[int(module.split(".")[2])][name] = (in_dim, out_dim)
        else:
            model_linears[name] = (in_dim, out_dim)
    return layer_linears, model_linears


def default_positions(ops, shape):
    b, t = shape
    return ops.from_numpy(np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy())
