"""Read a Hugging Face model folder: config.json, safetensors shards, tokenizer.

Safe by default: only safetensors are read (pickle files are refused, never unpickled), and
`auto_map` / remote code is ignored. Shards are read one at a time, tensor by tensor, and
cast to the target dtype on the way in, so no second full copy of the model is ever held:
the peak is the weights in their target dtype plus the shard being read (whose file pages
are mapped while it is open).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorafit.backends.base import LAYERS, SHARDED_LAYER
from lorafit.core.config import DTYPES, QUANTIZE_BITS
from lorafit.core.errors import LorafitError
from lorafit.models import Model, decoder, model_args
from lorafit.models.families import family

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_model_path(path_or_id: str) -> Path:
    """A local folder, or a hub id resolved through the Hugging Face cache (online only
    when the cache lacks it, and only for config, tokenizer and safetensors files)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise LorafitError(f"{path_or_id}: not a folder (expected a Hugging Face model "
                               "folder with config.json and *.safetensors)")
        return p
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise LorafitError(f"{path_or_id}: no such folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LorafitError(f"{path_or_id}: not in the Hugging Face cache and HF_HUB_OFFLINE=1")
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=patterns))
    except Exception as e:  # network errors, missing repo, gated model
        raise LorafitError(f"{path_or_id}: not a local folder, not in the Hugging Face cache, "
                           f"and could not be downloaded ({type(e).__name__}); check the id "
                           "and your connection") from None


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise LorafitError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LorafitError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None


UNSUPPORTED_QUANT = "lorafit trains on float weights (fp32/bf16/fp16), quantizing them " \
                    "itself with --quantize 4bit or 8bit, and reads mlx-lm's quantized folders"


def check_stored_quantization(raw: dict, folder) -> None:
    """Weights stored quantized by other tools (FP8, int8, GPTQ, AWQ, bitsandbytes) would be
    cast without their scales: refused. mlx-lm's affine format (its "quantization" key, which
    it also copies into quantization_config) is read by load_model."""
    q = raw.get("quantization_config") or (raw.get("text_config") or {}).get(
        "quantization_config")
    if not q or raw.get("quantization"):
        return
    method = (q.get("quant_method") or q.get("quant_type") or "quantized") \
        if isinstance(q, dict) else "quantized"
    raise LorafitError(f"{folder}: weights stored {method} (quantization_config) are not "
                       f"supported; {UNSUPPORTED_QUANT}")


def load_args(path_or_id: str):
    folder = resolve_model_path(path_or_id)
    cfg = read_config(folder)
    check_stored_quantization(cfg, folder)
    return model_args(cfg), folder


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wmap = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in wmap.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise LorafitError(f"{folder}: shard(s) listed in the index are missing: "
                               f"{', '.join(missing[:3])}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter")]
    if files:
        return files
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LorafitError(f"{folder}: only pickle weights ({', '.join(pickles[:3])}); lorafit "
                           "never unpickles files. Convert them to safetensors first, e.g. "
                           "with transformers: model.save_pretrained(out, safe_serialization=True)")
    raise LorafitError(f"{folder}: no *.safetensors weights found")


def default_dtype(backend, args) -> str:
    """float32 on CPUs (no fast bf16 there), the checkpoint's own dtype on accelerators."""
    if backend.device == "cpu":
        return "float32"
    stored = args.torch_dtype if args.torch_dtype in DTYPES else "bfloat16"
    return "bfloat16" if stored == "float32" and backend.device == "cuda" else stored


def training_dtype(backend, args) -> str:
    """The base weights' dtype for training without --dtype: default_dtype, except that a
    float16 checkpoint trains in bfloat16 where the device has it (same memory, float32's
    range: no gradient underflow, no loss scaling); elsewhere float16 stays and the trainer
    scales the loss (core/loss_scale.py)."""
    dtype = default_dtype(backend, args)
    return "bfloat16" if dtype == "float16" and backend.bf16_native else dtype


GROUP_SIZE = 64


def parse_quantize(quantize: str | None) -> int | None:
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANTIZE_BITS:
        raise LorafitError(f"--quantize {quantize}: choose 4bit or 8bit (or leave it out)")
    return QUANTIZE_BITS[quantize]


def load_model(path_or_id: str, backend, dtype: str | None = None,
               quantize: str | None = None, shard: bool = False) -> Model:
    """Load a model folder onto a backend. With quantize ("4bit"/"8bit") each projection
    weight is quantized as soon as it is read (group-wise affine, group 64), so the full-
    precision model never sits in memory; embeddings and the head stay in `dtype`, and so
    does a projection whose input size is not a multiple of 64 (as mlx-lm does).
    A folder already quantized by mlx-lm loads as it is. With shard (--shard, several
    processes) each decoder layer is read straight into this process's 1/N slice
    (Backend.read_layer_slice) where its arrays are stored as the model uses them or as
    per-expert tensors the family stacks; see plan_layer_slices."""
    args, folder = load_args(path_or_id)
    if dtype is not None and dtype not in DTYPES:
        raise LorafitError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    bits = parse_quantize(quantize)
    stored_q = args.quantization
    for b in [x for x in (bits, (stored_q or {}).get("bits")) if x]:
        if b not in backend.quantization:
            raise LorafitError(f"{b}-bit base weights are not available on the {backend.name} "
                               f"backend here; {backend.quantization_hint(b)}, or drop "
                               "--quantize")
    if stored_q and backend.quantized_format != "affine":
        raise LorafitError(f"{folder} holds mlx-lm (affine) quantized weights, which the "
                           f"{backend.name} backend cannot use; load it with --backend mlx")
    if bits and stored_q:
        raise LorafitError(f"{folder} is already quantized ({stored_q.get('bits')}-bit); "
                           "drop --quantize")
    dtype = dtype or default_dtype(backend, args)
    fam = family(args.model_type)
    expected = decoder.parameter_shapes(args)
    projections = decoder.projection_weights(args)
    params = {}
    files = weight_files(folder)
    sliced = plan_layer_slices(files, fam, expected) \
        if shard and backend.world_size > 1 and not bits and not stored_q else {}
    skip: dict = {}
    for srcs in sliced.values():
        for _, _, pieces in srcs:
            for path, key, _ in pieces:
                skip.setdefault(str(path), set()).add(key)
    for i, srcs in sliced.items():  # one layer at a time: only this process's slice
        params[f"{LAYERS}{i}.{SHARDED_LAYER}"] = backend.read_layer_slice(srcs, dtype)
    done = {f"{LAYERS}{i}.{src[0]}" for i, srcs in sliced.items() for src in srcs}
    for f in files:
        for name, array in backend.read_safetensors(f, dtype, frozenset(skip.get(str(f), ()))):
            name = fam.rename(name)
            module = name.rsplit(".", 1)[0]
            if name.endswith((".scales", ".biases")) and module + ".weight" in expected:
                params[name] = array
            elif fam.checkpoint_key is not None and fam.checkpoint_key.match(name):
                params[name] = array  # converted below (fam.convert)
            elif name in expected or name == "lm_head.weight":
                if bits and name in projections and array.shape[-1] % GROUP_SIZE == 0:
                    q, sc, bi = backend.quantize(array, bits, GROUP_SIZE)
                    params.update({name: q, module + ".scales": sc})
                    if bi is not None:
                        params[module + ".biases"] = bi
                    backend.materialize(q, sc, bi)
                    del array
                else:
                    params[name] = array
    params = fam.sanitize(params, args)
    if fam.convert is not None:
        params = fam.convert(backend, params, args)
    if stored_q:
        _dequantize_non_projections(backend, params, stored_q, projections, dtype)
    missing = [k for k in expected if k not in params and k not in done]
    if missing:
        raise LorafitError(f"{folder}: weights lack {missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for k, shape in expected.items():
        if k.rsplit(".", 1)[0] + ".scales" in params or k in done:
            continue  # packed: its shape is the quantizer's; sliced: checked when planned
        if tuple(params[k].shape) != tuple(shape):
            raise LorafitError(f"{folder}: {k} has shape {tuple(params[k].shape)}, config.json "
                               f"implies {tuple(shape)}")
    if bits:
        args.quantization = {"bits": bits, "group_size": GROUP_SIZE}
    backend.synchronize()
    return Model(args=args, params=params, backend=backend, path=str(folder), dtype=dtype)


FLOATS = ("F16", "BF16", "F32", "F64")  # safetensors' floating-point dtypes


def safetensors_header(path: Path) -> dict:
    """{key: {"dtype", "shape"}} of one safetensors file (dtype as safetensors names it:
    "BF16", "F32", ...), from its header alone: safetensors' own reader, through numpy, so
    no tensor is read and no framework is imported."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="numpy") as fh:
        for key in fh.keys():
            sl = fh.get_slice(key)
            out[key] = {"dtype": sl.get_dtype(), "shape": sl.get_shape()}
    return out


def plan_layer_slices(files: list, fam, expected: dict) -> dict:
    """{layer index: [(name within the layer, shape, [(file, checkpoint key, shape)])]} for
    the decoder layers whose frozen arrays can all be read straight into slices, in the
    order of `expected`: each array stored as the model uses it (the family's rename only;
    same shape; floating point), or stacked from whole checkpoint tensors laid end to end
    (the per-expert MoE tensors the family's convert stacks: fam.stacked names them). A
    layer with a tensor the family converts otherwise (gpt-oss's MXFP4 blocks), or stores
    otherwise, is left out: it loads whole and is cut afterwards (Backend.shard_frozen)."""
    stored, converted = {}, {}
    for f in files:
        for key, meta in safetensors_header(f).items():
            name = fam.rename(key)
            entry = (f, key, tuple(meta["shape"]), meta.get("dtype") in FLOATS)
            if fam.checkpoint_key is not None and fam.checkpoint_key.match(name):
                if name.startswith(LAYERS):
                    converted.setdefault(_layer_of(name), set()).add(name)
                stored[name] = entry
            elif name in expected:
                stored[name] = entry
    layers: dict = {}
    for name in expected:
        if name.startswith(LAYERS):
            layers.setdefault(_layer_of(name), []).append(name)
    out = {}
    for i, names in layers.items():
        plan, used = [], set()
        for n in names:
            pieces = [(n, expected[n])] if n in stored and n not in converted.get(i, ()) \
                else (fam.stacked(n, expected[n]) if fam.stacked is not None else None)
            if not pieces or not all(p in stored and stored[p][3]
                                     and stored[p][2] == tuple(s) for p, s in pieces):
                break
            plan.append((n[len(f"{LAYERS}{i}."):], tuple(expected[n]),
                         [stored[p][:3] for p, _ in pieces]))
            used.update(p for p, _ in pieces)
        else:
            if converted.get(i, set()) <= used:  # nothing left for convert to do here
                out[int(i)] = plan
    return out


def _layer_of(name: str) -> str:
    return name[len(LAYERS):].split(".", 1)[0]


def _dequantize_non_projections(ops, params, q, projections, dtype):
    """mlx-lm also quantizes embeddings and the head; lorafit keeps those dense."""
    for scales in [k for k in params if k.endswith(".scales")]:
        module = scales[: -len(".scales")]
        if module + ".weight" in projections:
            continue
        w = ops.dequantize(params[module + ".weight"], params.pop(scales),
                           params.pop(module + ".biases"), q["bits"], q["group_size"])
        params[module + ".weight"] = ops.cast(w, dtype)


def load_tokenizer(path):
    """The folder's tokenizer through transformers; remote code is never run."""
    if path is None:
        raise LorafitError("this model has no folder, so no tokenizer")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:
        raise LorafitError(f"{path}: could not load a tokenizer ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
