"""Adapter folders on disk: PEFT's layout (the one lorafit keeps) and mlx-lm's (an export).

PEFT:   adapter_config.json + adapter_model.safetensors,
        keys `base_model.model.<module>.lora_A.weight` (r, in) / `lora_B.weight` (out, r).
mlx-lm: adapter_config.json + adapters.safetensors,
        keys `<module>.lora_a` (in, r) = A^T and `lora_b` (r, out) = B^T, with a raw `scale`,
        applied to the last `num_layers` layers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lorafit.backends.base import LAYERS
from lorafit.core.errors import LorafitError
from lorafit.core.fileio import atomic_save_safetensors, atomic_write_json, load_safetensors_numpy
from lorafit.core.lora import LORA_A, LORA_B, MAGNITUDE, LoraConfig

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"


# Adapters on MoE experts and routers (transformers v5 + PEFT): PEFT targets the stacked
# 3D expert parameters and the router weight through `target_parameters`, and nests the
# two expert wrappers on one `experts` module: with both targeted, gate_up_proj's adapter is
# saved under `experts.base_layer.` and down_proj's under `experts.`; with one, under
# `experts.`. lorafit names them after the parameter (`experts.gate_up_proj.lora_A...`).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
ROUTER_MODULES = ("gate",)


def _is_parameter_target(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return (".experts." in module + "." and leaf in EXPERT_PARAMS) or \
        (leaf in ROUTER_MODULES and ".mlp." in module + ".")


def _to_peft_name(name: str, expert_params: set) -> str:
    for p in EXPERT_PARAMS:
        tag = f".experts.{p}."
        if tag in name:
            nested = p == "gate_up_proj" and len(expert_params) == 2
            return name.replace(tag, ".experts.base_layer." if nested else ".experts.")
    return name


def _from_peft_name(name: str, expert_params: list) -> str:
    if ".experts.base_layer.lora_" in name:
        return name.replace(".experts.base_layer.", ".experts.gate_up_proj.")
    if ".experts.lora_" in name:
        outer = "down_proj" if "down_proj" in expert_params else expert_params[0]
        return name.replace(".experts.", f".experts.{outer}.")
    return name


# Vision-language checkpoints whose text tower lorafit trains: PEFT on the wrapper
# (Mistral3ForConditionalGeneration, Qwen3_5ForConditionalGeneration...) reaches the text
# model's layers under `model.language_model.`, and all-linear names would also match the
# vision tower's q_proj..., so the adapter's target_modules is a regex over the text layers.
TEXT_TOWER_PREFIX = "model.language_model."
VISION_LANGUAGE = ("mistral3", "qwen3_5", "qwen3_5_moe")
# what a text tower's tensors may be called in an adapter -> lorafit's causal-LM names
_TOWER_NAMES = ((TEXT_TOWER_PREFIX, "model."), ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."))


def _base_model_type(base_model: str | None) -> str | None:
    """The base's model_type from a local folder's config.json (None if not at hand)."""
    try:
        return json.loads((Path(base_model) / "config.json").read_text()).get("model_type")
    except (OSError, TypeError, ValueError):
        return None


def _to_tower_name(name: str) -> str:
    return TEXT_TOWER_PREFIX + name[len("model."):] if name.startswith("model.") else name


def _from_tower_name(name: str) -> str:
    for old, new in _TOWER_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _modules(adapter: dict) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in adapter})


def _layers_of(modules: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for x in modules
                   if (m := re.match(r"model\.layers\.(\d+)\.", x))})


def save_peft(folder: str | Path, adapter: dict, cfg: LoraConfig, base_model: str | None,
              num_layers: int | None = None) -> Path:
    """Write a PEFT adapter folder (weights first, config last: the config marks it whole)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = _modules(adapter)
    names = sorted({m.rsplit(".", 1)[-1] for m in modules if not _is_parameter_target(m)})
    params = sorted({m.rsplit(".", 1)[-1] for m in modules if _is_parameter_target(m)})
    layers = _layers_of(modules)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": names,
        "layers_to_transform": layers if num_layers is not None and len(layers) != num_layers
        else None,
        "layers_pattern": None,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    experts = {p for p in params if p in EXPERT_PARAMS}
    if params:
        config["target_parameters"] = [p + ".weight" if p in ROUTER_MODULES else p
                                       for p in params]
    if "gate_up_proj" in experts:  # PEFT's fused gate+up: twice the rank and alpha
        config["rank_pattern"] = {r".*\.gate_up_proj": 2 * cfg.r}
        config["alpha_pattern"] = {r".*\.gate_up_proj": 2 * cfg.alpha}
    tower = _base_model_type(base_model) in VISION_LANGUAGE
    if tower:  # the text layers only, by a regex PEFT full-matches against module names
        which = "|".join(map(str, layers)) if config["layers_to_transform"] else r"\d+"
        config["target_modules"] = (re.escape(TEXT_TOWER_PREFIX) + rf"layers\.({which})\..*\."
                                    f"({'|'.join(names)})")
        config["layers_to_transform"] = None
    rename = _to_tower_name if tower else (lambda n: n)
    tensors = {PEFT_PREFIX + rename(_to_peft_name(k, experts)): np.asarray(v, dtype=np.float32)
               for k, v in adapter.items()}
    atomic_save_safetensors(folder / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_json(folder / PEFT_CONFIG, config)
    return folder


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LorafitError(f"{path.parent}: no {path.name} (not an adapter folder)") from None
    except json.JSONDecodeError as e:
        raise LorafitError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_peft(folder: str | Path) -> tuple[LoraConfig, dict]:
    """(config, {module.lora_A.weight: array}) from a PEFT adapter folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafitError(f"{folder}: no such adapter folder")
    if (folder / MLX_WEIGHTS).exists() and not (folder / PEFT_WEIGHTS).exists():
        raise LorafitError(f"{folder}: this is an mlx-lm adapter; convert it first with "
                           f"`lorafit convert {folder} OUT`")
    c = read_json(folder / PEFT_CONFIG)
    if c.get("peft_type", "LORA") != "LORA":
        raise LorafitError(f"{folder}: peft_type {c.get('peft_type')!r} is not supported "
                           "(only LORA)")
    tparams = [t.removesuffix(".weight") for t in c.get("target_parameters") or []]
    expert_params = [t for t in EXPERT_PARAMS if t in tparams]
    fused = {r".*\.gate_up_proj": 2 * c.get("r", 8)}, \
        {r".*\.gate_up_proj": 2 * c.get("lora_alpha", c.get("r", 8))}
    if "gate_up_proj" in expert_params and \
            (c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}) == fused:
        pass  # PEFT's own pattern for fused experts (see EXPERT_PARAMS)
    elif c.get("rank_pattern") or c.get("alpha_pattern"):
        raise LorafitError(f"{folder}: per-module rank_pattern / alpha_pattern is not supported")
    if c.get("fan_in_fan_out"):
        raise LorafitError(f"{folder}: fan_in_fan_out adapters (GPT-2 Conv1D) do not apply to "
                           "Llama-family models")
    weights_path = folder / PEFT_WEIGHTS
    if not weights_path.exists():
        if any((folder / n).exists() for n in ("adapter_model.bin", "adapter_model.pt")):
            raise LorafitError(f"{folder}: only a pickle adapter (adapter_model.bin); lorafit "
                               "never unpickles files. Re-save it with safe_serialization=True")
        raise LorafitError(f"{folder}: no {PEFT_WEIGHTS}")
    raw = load_safetensors_numpy(weights_path)
    adapter = {}
    for k, v in raw.items():
        name = _from_tower_name(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k)
        if expert_params:
            name = _from_peft_name(name, expert_params)
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        name = name.replace(f"{MAGNITUDE}.default.weight", MAGNITUDE)
        if not (name.endswith(LORA_A) or name.endswith(LORA_B) or name.endswith(MAGNITUDE)):
            raise LorafitError(f"{folder}: unsupported adapter tensor {k} (only LoRA A/B; "
                               "modules_to_save and bias training are not supported)")
        adapter[name] = v.astype(np.float32)
    if not adapter:
        raise LorafitError(f"{folder}: the adapter holds no tensors")
    ranks = {v.shape[0] for k, v in adapter.items()
             if k.endswith(LORA_A) and ".experts." not in k}  # experts: E*r rows
    r = int(c.get("r", next(iter(ranks))))
    if ranks != {r}:
        raise LorafitError(f"{folder}: config says r={r} but lora_A ranks are {sorted(ranks)}")
    cfg = LoraConfig(r=r, alpha=float(c.get("lora_alpha", r)),
                     dropout=float(c.get("lora_dropout", 0.0)),
                     targets=sorted({m.rsplit(".", 1)[-1] for m in _modules(adapter)}),
                     layers=_layers_of(_modules(adapter)) or None,
                     rslora=bool(c.get("use_rslora", False)), dora=bool(c.get("use_dora")))
    if cfg.dora != any(k.endswith(MAGNITUDE) for k in adapter):
        raise LorafitError(f"{folder}: use_dora={cfg.dora} but the weights "
                           f"{'lack' if cfg.dora else 'hold'} lora_magnitude_vector tensors")
    return cfg, adapter


def save_mlx_lm(folder: str | Path, adapter: dict, cfg: LoraConfig, num_layers: int,
                base_model: str | None = None) -> Path:
    """mlx-lm's layout. mlx-lm adapts the *last* num_layers layers; earlier layers of ours
    that carry no adapter simply get none there (their B stays zero)."""
    modules = _modules(adapter)
    outside = sorted(m for m in modules if not m.startswith(LAYERS))
    if outside:  # mlx-lm's `keys` name modules inside its layers; it would reject these
        raise LorafitError(
            f"mlx-lm adapters hold only modules inside the decoder layers, and this adapter "
            f"adapts {', '.join(outside)}: train without it (list the layer modules in "
            f"--targets instead of all-linear) or export merged (lorafit export --merge)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = _layers_of(modules)
    rank = cfg.r
    if any(_is_parameter_target(m) for m in modules):
        tensors, rank = _mlx_lm_moe_tensors(adapter, cfg, _mlx_moe_prefix(base_model))
        modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    else:
        tensors = {}
        for m in modules:
            tensors[f"{m}.lora_a"] = np.ascontiguousarray(adapter[f"{m}.{LORA_A}"].T)
            tensors[f"{m}.lora_b"] = np.ascontiguousarray(adapter[f"{m}.{LORA_B}"].T)
            if cfg.dora:  # mlx-lm's DoRALinear keeps the magnitude as `m`
                tensors[f"{m}.m"] = np.ascontiguousarray(adapter[f"{m}.{MAGNITUDE}"])
    keys = sorted({m.split(".", 3)[3] for m in modules if m.startswith(LAYERS)})
    atomic_save_safetensors(folder / MLX_WEIGHTS, tensors)
    atomic_write_json(folder / PEFT_CONFIG, {
        "fine_tune_type": "dora" if cfg.dora else "lora",
        "model": base_model,
        "num_layers": num_layers - min(layers) if layers else num_layers,
        "lora_parameters": {"rank": rank, "scale": cfg.scale, "dropout": cfg.dropout,
                            "keys": keys},
    })
    return folder


def _mlx_moe_prefix(base_model: str | None) -> str:
    """mlx-lm's name of the MoE block: `block_sparse_moe` for mixtral, `mlp` otherwise."""
    try:
        cfg = json.loads((Path(base_model) / "config.json").read_text())
    except (OSError, TypeError, ValueError):
        return "mlp"
    return "block_sparse_moe" if cfg.get("model_type") == "mixtral" else "mlp"


def _mlx_lm_moe_tensors(adapter: dict, cfg: LoraConfig, moe: str) -> tuple[dict, int]:
    """mlx-lm's layout for an adapter with MoE parts: its SwitchLinear adapters hold
    lora_a (E, r, in) and lora_b (E, out, r) per `switch_mlp.{gate,up,down}_proj`, and one
    rank serves every module. PEFT's fused gate_up adapter (rank 2r) becomes the same
    rank-2r A on gate_proj and on up_proj with B's gate and up rows, and every other adapter
    is padded with zero rank to 2r, which leaves each update B A unchanged."""
    fused = any(k.endswith(f"experts.gate_up_proj.{LORA_A}") for k in adapter)
    rank = 2 * cfg.r if fused else cfg.r
    out = {}

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, rank - x.shape[axis])
        return np.ascontiguousarray(np.pad(x.astype(np.float32), widths))

    for m in _modules(adapter):
        a, b = adapter[f"{m}.{LORA_A}"], adapter[f"{m}.{LORA_B}"]
        leaf = m.rsplit(".", 1)[-1]
        if ".experts." in m + "." and leaf in EXPERT_PARAMS:
            r = cfg.r * (2 if leaf == "gate_up_proj" else 1)
            n = a.shape[0] // r
            a3 = a.reshape(n, r, a.shape[-1])
            b3 = b.reshape(b.shape[0], r, n).transpose(2, 0, 1)  # (E, out, r)
            base = m.replace(".mlp.experts." + leaf, f".{moe}.switch_mlp.")
            if leaf == "gate_up_proj":
                f = b3.shape[1] // 2
                for name, rows in (("gate_proj", b3[:, :f]), ("up_proj", b3[:, f:])):
                    out[f"{base}{name}.lora_a"] = pad(a3, 1)
                    out[f"{base}{name}.lora_b"] = pad(rows, 2)
            else:
                out[f"{base}down_proj.lora_a"] = pad(a3, 1)
                out[f"{base}down_proj.lora_b"] = pad(b3, 2)
            continue
        if leaf in ROUTER_MODULES:
            m = m.replace(".mlp.", f".{moe}.")
        out[f"{m}.lora_a"] = pad(a.T, 1)
        out[f"{m}.lora_b"] = pad(b.T, 0)
    return out, rank


def load_mlx_lm(folder: str | Path) -> tuple[LoraConfig, dict]:
    """Read an mlx-lm adapter back into PEFT orientation. mlx-lm stores only `scale`, so
    alpha is written as scale * r (the same update)."""
    folder = Path(folder)
    c = read_json(folder / PEFT_CONFIG)
    if c.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise LorafitError(f"{folder}: fine_tune_type {c.get('fine_tune_type')!r} is not "
                           "supported (only lora and dora)")
    if not (folder / MLX_WEIGHTS).exists():
        raise LorafitError(f"{folder}: no {MLX_WEIGHTS} (not an mlx-lm adapter)")
    raw = load_safetensors_numpy(folder / MLX_WEIGHTS)
    if any(".switch_mlp." in k for k in raw):
        raise LorafitError(f"{folder}: an mlx-lm adapter on MoE experts (switch_mlp) cannot be "
                           "read back yet; use the PEFT adapter it was exported from")
    adapter = {}
    for k, v in raw.items():
        if k.endswith(".lora_a"):
            adapter[k[: -len(".lora_a")] + "." + LORA_A] = np.ascontiguousarray(v.T)
        elif k.endswith(".lora_b"):
            adapter[k[: -len(".lora_b")] + "." + LORA_B] = np.ascontiguousarray(v.T)
        elif k.endswith(".m"):
            adapter[k[: -len(".m")] + "." + MAGNITUDE] = np.ascontiguousarray(v)
        else:
            raise LorafitError(f"{folder}: unsupported adapter tensor {k}")
    lp = c.get("lora_parameters", {})
    r = int(lp.get("rank", next(v.shape[0] for k, v in adapter.items() if k.endswith(LORA_A))))
    cfg = LoraConfig(r=r, alpha=float(lp.get("scale", 20.0)) * r,
                     dropout=float(lp.get("dropout", 0.0)),
                     targets=sorted({m.rsplit(".", 1)[-1] for m in _modules(adapter)}),
                     layers=_layers_of(_modules(adapter)) or None,
                     dora=c.get("fine_tune_type") == "dora")
    if cfg.dora != any(k.endswith(MAGNITUDE) for k in adapter):
        raise LorafitError(f"{folder}: fine_tune_type {c.get('fine_tune_type', 'lora')!r} but "
                           f"the weights {'lack' if cfg.dora else 'hold'} DoRA magnitudes (m)")
    return cfg, adapter


def load_any(folder: str | Path) -> tuple[LoraConfig, dict]:
    folder = Path(folder)
    if (folder / MLX_WEIGHTS).exists() and not (folder / PEFT_WEIGHTS).exists():
        return load_mlx_lm(folder)
    return load_peft(folder)
