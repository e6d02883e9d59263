"""The run configuration: one dataclass, one source of defaults, read from TOML and flags.

A TOML file holds the same keys as the fields below (flat, or grouped under any table
names, e.g. [lora] rank = 16); CLI flags override it; the resolved config is saved in the
run directory as `config.toml`, so any run can be repeated headless.
"""

from __future__ import annotations

import ast
import inspect
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

from lorafit.core.errors import LorafitError

SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
BACKENDS = ("auto", "torch", "mlx")
QUANTIZE_BITS = {"4bit": 4, "8bit": 8}  # --quantize choices and the bits they mean
QUANTIZE = tuple(QUANTIZE_BITS)
ON_BAD_RECORD = ("fail", "skip")
CHAT_LOSS = ("all", "last")
METHODS = ("sft", "dpo", "orpo", "kto", "grpo")  # --method: core/preference_train.py, grpo_train.py
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


@dataclass
class TrainConfig:
    model: str = ""
    """Model folder or Hugging Face hub id."""
    data: str = ""
    """Training data: a JSONL/JSON, Parquet, CSV or Arrow file, a folder (train.*/valid.*/test.*
    or datasets.save_to_disk), or a Hub dataset id; text, prompt/completion, messages or alpaca
    records."""
    val_data: str | None = None
    """Validation data (any kind --data takes); otherwise a data folder's valid split, else
    `val_fraction` of the training data is held out."""
    val_fraction: float = 0.0
    """Fraction of the training examples held out for validation when no val_data is given."""
    output: str = "runs/latest"
    """Run directory: config, metrics.jsonl, status, checkpoints/, adapter/."""
    backend: str = "auto"
    """auto, torch or mlx."""
    device: str | None = None
    """cpu, cuda, mps or metal; none: the best the backend has."""
    dtype: str | None = None
    """Base weight dtype; none: float32 on CPU, the checkpoint's on GPUs."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    targets: str = "q_proj,v_proj"
    """Comma-separated module names, or all-linear."""
    layers: list[int] | None = None
    """Layer indices to adapt; none: all."""
    rslora: bool = False
    """Use alpha / sqrt(r) scaling."""
    dora: bool = False
    """DoRA: learn a magnitude per output row beside the low-rank direction (PEFT's use_dora)."""
    batch_size: int = 4
    """Micro-batch size (examples per forward pass)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate."""
    schedule: str = "cosine"
    """constant, linear or cosine decay after warmup."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of lr (linear and cosine)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    router_aux_loss_coef: float = 0.0
    """MoE models: add this times the router load-balancing loss to the loss (always reported)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    seq_len: int = 512
    """Maximum tokens per example; longer examples are truncated."""
    pack: bool = False
    """Pack short examples into rows of seq_len tokens (attention stays within each example)."""
    quantize: str | None = None
    """Frozen projection weights: 4bit (QLoRA; NF4 via bitsandbytes on torch) or 8bit (MLX only)."""
    grad_checkpoint: bool = False
    """Recompute each layer's activations in the backward pass to save memory."""
    compile: bool = False
    """torch: compile the decoder layer (forward and backward) with torch.compile, once for
    all layers and lengths; needs a C++ compiler on the CPU. MLX compiles every step already."""
    shard: bool = False
    """torch, several processes: shard the frozen base (each layer gathered when it runs,
    which implies recomputing layers) and the adapter's optimizer state (FSDP2) over the
    processes (docs/distributed.md); MLX: not supported."""
    seed: int = 0
    """Seed for adapter init, shuffling and dropout."""
    eval_every: int | None = None
    """Evaluate validation loss every N steps (and at the end)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a better validation loss."""
    save_every: int | None = None
    """Write a checkpoint every N steps (one is always written at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 1
    """Report training metrics every N steps."""
    report_to: str = ""
    """Also log to these trackers (comma-separated): tensorboard, wandb, mlflow, trackio."""
    on_bad_record: str = "fail"
    """What a bad data record does: fail (stop before loading) or skip (report and drop)."""
    train_on_prompt: bool = False
    """Also put loss on prompt / user tokens."""
    data_split: str | None = None
    """Split to train on (Hub dataset, saved dataset or data folder); none: train."""
    data_config: str | None = None
    """Configuration (subset) name of a Hub dataset."""
    data_revision: str | None = None
    """Revision (branch, tag or commit) of a Hub dataset."""
    columns: str | None = None
    """Field names for a set whose columns are named otherwise, e.g.
    prompt=question,completion=answer."""
    chat_loss: str = "all"
    """Messages data: loss on every assistant turn (all) or on the last one only (last)."""
    train_on_reasoning: bool = False
    """Messages data: also put loss on assistant reasoning_content where the chat template
    renders it."""
    max_nonfinite: int = 5
    """Stop after this many non-finite steps in a row."""
    force: bool = False
    """Train even when the memory estimate says it will not fit."""
    method: str = "sft"
    """sft, or preference tuning on chosen/rejected pairs: dpo, orpo, or kto on labelled
    completions (README: Preference tuning)."""
    beta: float | None = None
    """DPO and KTO: how far the adapter may move from the base (the reference), default
    0.1; GRPO: the weight of the KL to the base, default 0 (TRL's: no reference pass)."""
    dpo_loss: str = "sigmoid"
    """DPO's loss: sigmoid (the paper's), ipo or hinge (as TRL's loss_type)."""
    orpo_lambda: float = 0.1
    """ORPO: weight of the odds-ratio term beside the NLL of the chosen completion."""
    kto_desirable_weight: float = 1.0
    """KTO: weight of the losses of desirable (label true) completions."""
    kto_undesirable_weight: float = 1.0
    """KTO: weight of the losses of undesirable (label false) completions."""
    reward: str | None = None
    """GRPO: the reward function, file.py:function (fn(prompts, completions, **kw) ->
    list of floats)."""
    num_generations: int = 4
    """GRPO: completions sampled per prompt (the group)."""
    max_new_tokens: int = 64
    """GRPO: the longest completion sampled."""
    temperature: float = 1.0
    """GRPO: the sampling temperature of the completions."""

    def __post_init__(self):
        if self.dtype is not None:
            if self.dtype not in DTYPE_ALIASES:
                raise LorafitError(f"dtype {self.dtype!r}: choose bf16, fp16 or fp32")
            self.dtype = DTYPE_ALIASES[self.dtype]
        if isinstance(self.targets, list):
            self.targets = ",".join(self.targets)
        for name in ("rank", "batch_size", "grad_accum", "seq_len", "keep_checkpoints",
                     "log_every", "max_nonfinite"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise LorafitError(f"{name.replace('_', '-')} must be a positive integer, "
                                   f"got {v!r}")
        for name in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise LorafitError(f"{name.replace('_', '-')} must be a positive integer, "
                                   f"got {v!r}")
        self._check_numbers()
        if self.schedule not in SCHEDULES:
            raise LorafitError(f"schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        if self.chat_loss not in CHAT_LOSS:
            raise LorafitError(f"chat-loss {self.chat_loss!r}: choose {' or '.join(CHAT_LOSS)}")
        if self.columns is not None:
            from lorafit.core.sources import parse_columns

            parse_columns(self.columns)
        if self.on_bad_record not in ON_BAD_RECORD:
            raise LorafitError(f"on-bad-record must be {' or '.join(ON_BAD_RECORD)}")
        if not 0 <= self.val_fraction < 1:
            raise LorafitError(f"val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.dropout < 1:
            raise LorafitError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise LorafitError(f"--quantize {self.quantize}: choose {' or '.join(QUANTIZE)}")
        if self.shard and self.quantize:  # the sharded base is cut as plain float arrays
            from lorafit.core.estimate import SHARD_QUANTIZED
            raise LorafitError(SHARD_QUANTIZED)
        from lorafit.core.trackers import parse as parse_trackers

        self.report_to = ",".join(parse_trackers(self.report_to))
        if self.backend not in BACKENDS:
            raise LorafitError(f"backend {self.backend!r}: choose {', '.join(BACKENDS)}")
        if self.method not in METHODS:
            raise LorafitError(f"method {self.method!r}: choose {', '.join(METHODS)}")
        if self.dpo_loss not in DPO_LOSSES:
            raise LorafitError(f"dpo-loss {self.dpo_loss!r}: choose {', '.join(DPO_LOSSES)}")
        if self.beta is None:
            self.beta = 0.0 if self.method == "grpo" else 0.1
        self._check_grpo()
        for name in (("orpo_lambda",) if self.method == "grpo" else ("beta", "orpo_lambda")) + \
                ("kto_desirable_weight", "kto_undesirable_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                    or not math.isfinite(v):
                raise LorafitError(f"{name.replace('_', '-')} must be a positive number, "
                                   f"got {v!r}")

    def _check_grpo(self) -> None:
        """GRPO's settings (core/grpo_train.py): the reward named, sizes that sample."""
        if self.method != "grpo":
            return
        if not self.reward:
            raise LorafitError("--method grpo needs --reward file.py:function")
        for name in ("num_generations", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name[0] == "n" else 1):
                raise LorafitError(f"{name.replace('_', '-')} must be an integer of at least "
                                   f"{2 if name[0] == 'n' else 1}, got {v!r}")
        for name, floor in (("beta", "non-negative"), ("temperature", "positive")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (floor == "positive" and v == 0):
                raise LorafitError(f"{name} must be a {floor} number, got {v!r}")
        if self.max_new_tokens >= self.seq_len:
            raise LorafitError(f"max-new-tokens {self.max_new_tokens} leaves no room for a "
                               f"prompt in seq-len {self.seq_len}")

    def _check_numbers(self) -> None:
        """Hyper-parameters that would train wrongly or not at all, refused up front."""
        def number(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise LorafitError(f"{name.replace('_', '-')} must be a finite number, "
                                   f"got {v!r}")
            return v

        if number("lr") <= 0:
            raise LorafitError(f"lr must be positive, got {self.lr}")
        if number("epochs") <= 0:
            raise LorafitError(f"epochs must be positive, got {self.epochs}")
        if number("alpha") <= 0:
            raise LorafitError(f"alpha must be positive, got {self.alpha}")
        if number("weight_decay") < 0:
            raise LorafitError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= number("min_lr_ratio") <= 1:
            raise LorafitError(f"min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is None:  # "no clipping", said the way config.toml keeps it
            self.max_grad_norm = 0.0
        if number("max_grad_norm") < 0:
            raise LorafitError(f"max-grad-norm must be >= 0 (0 disables clipping), got "
                               f"{self.max_grad_norm}")
        if number("router_aux_loss_coef") < 0:
            raise LorafitError(f"router-aux-loss-coef must be >= 0, got "
                               f"{self.router_aux_loss_coef}")
        for name in ("seed", "warmup_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise LorafitError(f"{name.replace('_', '-')} must be an integer >= 0, "
                                   f"got {v!r}")
        if self.layers is not None:
            if not isinstance(self.layers, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise LorafitError(f"layers must be a list of integers, got {self.layers!r}")
            if any(i < 0 for i in self.layers):
                raise LorafitError(f"layers must be >= 0, got {self.layers}")
        for name in ("model", "data", "val_data", "output", "data_split", "data_config",
                     "data_revision", "columns"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise LorafitError(f"{name.replace('_', '-')} must be a string, got {v!r}")
            if v and any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
                raise LorafitError(f"{name.replace('_', '-')} {v!r}: control characters "
                                   "(such as a newline) are not allowed in a path")

    def lora_config(self):
        from lorafit.core.lora import LoraConfig

        targets = self.targets if self.targets == "all-linear" else self.targets.split(",")
        return LoraConfig(r=self.rank, alpha=self.alpha, dropout=self.dropout,
                          targets=targets, layers=self.layers, rslora=self.rslora,
                          dora=self.dora)

    def to_dict(self) -> dict:
        return asdict(self)


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
FIELD_CHOICES = {"schedule": SCHEDULES, "dtype": tuple(DTYPE_ALIASES), "backend": BACKENDS,
                 "quantize": QUANTIZE, "on_bad_record": ON_BAD_RECORD,
                 "chat_loss": CHAT_LOSS, "method": METHODS, "dpo_loss": DPO_LOSSES}
"""The allowed values of the fields that take one of a few words (the CLI's choices)."""


def field_docs(cls=TrainConfig) -> dict[str, str]:
    """{field: its docstring} for a dataclass whose fields carry a string literal below them
    (read from the class source, so the docstrings stay where a reader of the class sees
    them)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def read_toml(path: str | Path) -> dict:
    """Flatten a TOML file into TrainConfig keys; unknown keys are an error."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorafitError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise LorafitError(f"{path}: not UTF-8 text (byte {e.start}); a config file is "
                           "TOML") from None
    except OSError as e:
        raise LorafitError(f"{path}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise LorafitError(f"{path}: invalid TOML ({' '.join(str(e).split())})") from None
    flat, where = {}, {}
    for k, v in raw.items():
        items = v.items() if isinstance(v, dict) else [(k, v)]
        table = f"[{k}]" if isinstance(v, dict) else "the top level"
        for key, value in items:
            key = key.replace("-", "_")
            if key in flat:
                raise LorafitError(f"{path}: {key} is set twice ({where[key]} and {table})")
            flat[key], where[key] = value, table
    unknown = sorted(set(flat) - set(FIELD_NAMES))
    if unknown:
        raise LorafitError(f"{path}: unknown key(s) {', '.join(unknown)}")
    return flat


def resolve(toml_path: str | None, overrides: dict) -> TrainConfig:
    """TOML values, then CLI overrides (None means 'not given')."""
    values = read_toml(toml_path) if toml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise LorafitError(f"bad config: {e}") from None


def to_toml(cfg: TrainConfig) -> str:
    """The config as TOML, written by tomli-w (None values are left out: they mean
    'default'). Paths cannot hold control characters (TrainConfig refuses them), so every
    value reads back exactly."""
    import tomli_w

    values = {k: v for k, v in cfg.to_dict().items() if v is not None}
    return "# lorafit run configuration: `lorafit train THIS_FILE` repeats the run\n" + \
        tomli_w.dumps(values)
