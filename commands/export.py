"""`lorafit export` and `lorafit convert`: an adapter to mlx-lm's layout (or back), a merged
Hugging Face folder, and GGUF files for llama.cpp / Ollama.

Every export is written into a temporary folder beside the target and renamed into place,
so an interrupted export never leaves a half-written folder under the target's name.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from lorafit.core import adapter_io, lora, model_card, rundir
from lorafit.core.config import DTYPES
from lorafit.core.errors import LorafitError

SHARD_BYTES = 4 * 2**30


def _check_out(out: str | Path) -> Path:
    """Refuse an output that holds something: an export never replaces earlier work."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LorafitError(f"{out} exists and is not empty; choose a new output folder")
    return out


@contextmanager
def _export_folder(out: Path):
    """with _export_folder(out) as tmp: write the export into tmp. It becomes `out` only when
    the block ends cleanly; on any failure (Ctrl-C included) tmp is removed and `out` is left
    as it was."""
    with rundir.atomic_folder(_check_out(out)) as tmp:
        yield tmp


def _base_model(adapter_dir: str | Path, model: str | None) -> str | None:
    if model:
        return model
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    try:
        c = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    return c.get("base_model_name_or_path") or c.get("model")


def _num_layers(base: str | None, adapter: dict) -> int:
    if base:
        try:
            from lorafit.models.loader import load_args
            return load_args(base)[0].num_hidden_layers
        except LorafitError:
            pass
    layers = adapter_io._layers_of(adapter_io._modules(adapter))
    return max(layers) + 1 if layers else 0


def export_adapter(src: str | Path, out: str | Path, fmt: str, model: str | None) -> Path:
    """Rewrite an adapter folder (PEFT or mlx-lm) as `fmt` ("mlx-lm" or "peft")."""
    cfg, adapter = adapter_io.load_any(src)
    base = _base_model(src, model)
    if fmt not in ("mlx-lm", "peft"):
        raise LorafitError(f"unknown adapter format {fmt!r}: mlx-lm or peft")
    with _export_folder(out) as tmp:
        if fmt == "mlx-lm":
            adapter_io.save_mlx_lm(tmp, adapter, cfg, _num_layers(base, adapter), base)
        else:
            adapter_io.save_peft(tmp, adapter, cfg, base, _num_layers(base, adapter))
        model_card.write_card(tmp, base, "adapter", model_card.run_dir_of(src))
    return Path(out)


def export_merged(adapter_dir: str | Path, out: str | Path, model: str | None = None,
                  backend: str = "auto", dtype: str | None = None,
                  quantize: str | None = None) -> Path:
    """Base + adapter folded into plain weights, as a Hugging Face folder (safetensors).
    For an adapter trained on a quantized base, pass the same `quantize`: the base is
    quantized the same way, dequantized, and merged, so the result is what was trained."""
    from lorafit.commands.common import load_model_with_adapter
    from lorafit.models.families import published_config
    from lorafit.models.loader import read_config, resolve_model_path

    base = _base_model(adapter_dir, model)
    if not base:
        raise LorafitError(f"{adapter_dir}: the adapter does not name its base model; pass "
                           "--model")
    _check_out(out)  # before the weights load
    m = load_model_with_adapter(base, adapter_dir, backend,
                                "cpu" if backend == "auto" else None, "float32", quantize)
    ops = m.backend
    lora.merge(m)
    folder = resolve_model_path(base)
    config = read_config(folder)
    target = dtype or config.get("torch_dtype") or config.get("dtype") or "float32"
    if target not in DTYPES:
        target = "float32"
    config["torch_dtype"] = target
    if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        config.pop("quantization_config")  # experts were dequantized while loading
    config.pop("auto_map", None)
    config = published_config(config)  # e.g. the keys mlx-lm reads beside transformers'
    with _export_folder(out) as tmp:
        _write_weights(ops, {k: ops.cast(v, target) for k, v in m.params.items()}, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in ("generation_config.json",):
            if (folder / name).exists():
                shutil.copy(folder / name, tmp / name)
        m.tokenizer.save_pretrained(str(tmp))
        model_card.write_card(tmp, base, "merged", model_card.run_dir_of(adapter_dir))
    return Path(out)


def _write_weights(ops, params: dict, folder: Path) -> None:
    """model.safetensors, or shards plus model.safetensors.index.json past SHARD_BYTES."""
    shards, current, size = [], {}, 0
    for name in sorted(params):
        nbytes = ops.nbytes(params[name])
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = params[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        ops.save_safetensors(folder / "model.safetensors", shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        ops.save_safetensors(folder / fname, shard)
        weight_map.update({k: fname for k in shard})
        total += sum(ops.nbytes(v) for v in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def main(adapter: str, out: str, fmt: str = "mlx-lm", merge: bool = False,
         model: str | None = None, backend: str = "auto", dtype: str | None = None,
         quantize: str | None = None, outtype: str = "f16") -> int:
    """`lorafit export`: print the folder written."""
    if fmt == "gguf":
        print(export_gguf(adapter, out, merge, model, outtype, backend, quantize))
        return 0
    if merge:
        path = export_merged(adapter, out, model, backend, dtype, quantize)
        if quantize:
            print(f"note: merged onto the dequantized {quantize} base; the merged model "
                  "is dense, no longer quantized", file=sys.stderr)
    else:
        path = export_adapter(adapter, out, fmt, model)
    print(path)
    return 0


def convert(src: str, out: str, to: str = "peft") -> int:
    """`lorafit convert`: rewrite an adapter in the other layout; print the folder written."""
    print(export_adapter(src, out, to, None))
    return 0


# -- GGUF (llama.cpp, Ollama) ----------------------------------------------------------------

def _numpy_weights(m) -> dict:
    ops = m.backend
    return {k: ops.to_numpy(ops.cast(v, "float32")) for k, v in m.params.items()
            if not k.endswith("inv_freq")}


def _chat_render(tokenizer):
    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render if getattr(tokenizer, "chat_template", None) else None


def _stop_texts(tokenizer, folder: Path) -> list[str]:
    ids = set()
    gen = folder / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return [tokenizer.convert_ids_to_tokens(int(i)) for i in sorted(ids)]


def write_modelfile(folder: Path, model_file: str, adapter_file: str | None, tokenizer,
                    base_folder: Path) -> bool:
    """The Modelfile beside the GGUF files; True when it carries a TEMPLATE."""
    from lorafit.core import modelfile

    render = _chat_render(tokenizer)
    template = modelfile.template_for(render) if render else None
    text = modelfile.modelfile(f"./{model_file}", adapter_file and f"./{adapter_file}",
                               template, _stop_texts(tokenizer, base_folder))
    (folder / "Modelfile").write_text(text)
    return template is not None


def export_gguf(adapter_dir: str | Path, out: str | Path, merge: bool, model: str | None = None,
                outtype: str = "f16", backend: str = "auto", quantize: str | None = None) -> Path:
    """GGUF files and an Ollama Modelfile: with `merge`, model-<type>.gguf (base + adapter
    folded); without, base-<type>.gguf plus adapter-<type>.gguf (llama.cpp's --lora)."""
    from lorafit.commands.common import load_model_with_adapter
    from lorafit.core import gguf_export
    from lorafit.models.loader import read_config, resolve_model_path

    if outtype not in gguf_export.OUTTYPES:
        raise LorafitError(f"unknown GGUF type {outtype!r}: {', '.join(gguf_export.OUTTYPES)}")
    base = _base_model(adapter_dir, model)
    if not base:
        raise LorafitError(f"{adapter_dir}: the adapter does not name its base model; pass "
                           "--model")
    folder = resolve_model_path(base)
    config = read_config(folder)
    gguf_export.family(config)  # an unsupported family stops before any weight loads
    _check_out(out)
    cfg, adapter = adapter_io.load_any(adapter_dir)
    if not merge and cfg.dora:
        raise LorafitError("llama.cpp has no DoRA: export with --merge")
    for note in gguf_export.unsupported_features(config):
        print(f"warning: {note}; outputs of the GGUF will differ", file=sys.stderr)
    dev = "cpu" if backend == "auto" else None
    with _export_folder(out) as tmp:
        if merge:
            m = load_model_with_adapter(base, adapter_dir, backend, dev, "float32", quantize)
            lora.merge(m)
            model_file, adapter_file = f"model-{outtype}.gguf", None
        else:  # the adapter first: what llama.cpp cannot apply stops before weights load
            model_file, adapter_file = f"base-{outtype}.gguf", f"adapter-{outtype}.gguf"
            gguf_export.write_lora(tmp / adapter_file, config, adapter, cfg.r, cfg.alpha,
                                   cfg.rslora, outtype)
            m = load_model_with_adapter(base, None, backend, dev, "float32", quantize)
        gguf_export.write_model(tmp / model_file, config, _numpy_weights(m), folder, outtype,
                                name=Path(str(base)).name)
        if not write_modelfile(tmp, model_file, adapter_file, m.tokenizer, folder):
            print("note: the chat template is not plain per-role text; the Modelfile has no "
                  "TEMPLATE (Ollama uses the GGUF's own)", file=sys.stderr)
        model_card.write_card(tmp, base, "gguf", model_card.run_dir_of(adapter_dir))
    return Path(out)
