"""The `lorafit` command line. Each subcommand is a small function; user mistakes end as a
one-line `error: ...` on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from lorafit.core.errors import LorafitError


def cmd_env(args) -> int:
    from lorafit.backends.envinfo import describe

    print(describe())
    return 0


def cmd_generate(args) -> int:
    from lorafit.backends import get_backend
    from lorafit.core import adapter_io, lora
    from lorafit.core.generate import generate_text
    from lorafit.models.loader import load_model

    B = get_backend(args.backend, args.device, verbose=True)
    B.seed(args.seed)
    model = load_model(args.model, B, args.dtype, args.quantize)
    if args.adapter:
        cfg, adapter = adapter_io.load_any(args.adapter)
        lora.attach(model, cfg, adapter, dtype=model.dtype)
    text = generate_text(model, args.prompt, args.max_new_tokens, args.temperature,
                         args.seed, chat=args.chat)
    print(text)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


TRAIN_FLAGS = [  # (flag, config field, argparse kwargs)
    ("--model", "model", dict(help="model folder or Hugging Face hub id")),
    ("--data", "data", dict(help="training data (.jsonl or .json)")),
    ("--val-data", "val_data", dict(help="validation data file")),
    ("--val-fraction", "val_fraction", dict(type=float, help="hold out this fraction")),
    ("--output", "output", dict(help="run directory")),
    ("--rank", "rank", dict(type=int)),
    ("--alpha", "alpha", dict(type=float)),
    ("--dropout", "dropout", dict(type=float)),
    ("--targets", "targets", dict(help="comma-separated module names or all-linear")),
    ("--layers", "layers", dict(type=_int_list, help="layer indices, e.g. 0,1,2")),
    ("--batch-size", "batch_size", dict(type=int)),
    ("--grad-accum", "grad_accum", dict(type=int)),
    ("--lr", "lr", dict(type=float)),
    ("--schedule", "schedule", dict(choices=["constant", "linear", "cosine"])),
    ("--warmup-steps", "warmup_steps", dict(type=int)),
    ("--weight-decay", "weight_decay", dict(type=float)),
    ("--max-grad-norm", "max_grad_norm", dict(type=float)),
    ("--epochs", "epochs", dict(type=float)),
    ("--max-steps", "max_steps", dict(type=int)),
    ("--seq-len", "seq_len", dict(type=int)),
    ("--dtype", "dtype", dict(choices=["bf16", "fp16", "fp32", "bfloat16", "float16",
                                       "float32"])),
    ("--quantize", "quantize", dict(help="4bit or 8bit frozen weights (MLX backend)")),
    ("--seed", "seed", dict(type=int)),
    ("--eval-every", "eval_every", dict(type=int)),
    ("--early-stopping-patience", "early_stopping_patience", dict(type=int)),
    ("--save-every", "save_every", dict(type=int)),
    ("--keep-checkpoints", "keep_checkpoints", dict(type=int)),
    ("--log-every", "log_every", dict(type=int)),
    ("--on-bad-record", "on_bad_record", dict(choices=["skip", "fail"])),
]
TRAIN_SWITCHES = [("--pack", "pack"), ("--grad-checkpoint", "grad_checkpoint"),
                  ("--rslora", "rslora"), ("--dora", "dora"),
                  ("--train-on-prompt", "train_on_prompt"),
                  ("--force", "force")]


def add_train_flags(p) -> None:
    """The flags shared by `train` and `estimate`; all default to None = 'not given'."""
    p.add_argument("config", nargs="?", help="TOML config (flags override it)")
    for flag, dest, kw in TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, default=None, **kw)
    for flag, dest in TRAIN_SWITCHES:
        p.add_argument(flag, dest=dest, action="store_true", default=None)
    p.add_argument("--backend", default=None, choices=["auto", "torch", "mlx"])
    p.add_argument("--device", default=None, help="cpu, cuda, mps or metal")


def config_from_args(args):
    from lorafit.core.config import resolve

    overrides = {dest: getattr(args, dest) for _, dest, _ in TRAIN_FLAGS}
    overrides.update({dest: getattr(args, dest) for _, dest in TRAIN_SWITCHES})
    overrides.update(backend=args.backend, device=args.device)
    toml = args.config
    if getattr(args, "resume", None):
        from lorafit.core import rundir
        saved = rundir.config_path(args.resume)
        if not saved.exists():
            raise LorafitError(f"{args.resume}: no {saved.name} (not a lorafit run directory)")
        toml = toml or str(saved)
        overrides["output"] = args.resume
    return resolve(toml, overrides)


def cmd_train(args) -> int:
    from lorafit.runner import run_training

    cfg = config_from_args(args)
    if not cfg.model or not cfg.data:
        raise LorafitError("train needs --model and --data (or a config file that sets them)")
    status = run_training(cfg, resume=bool(args.resume))
    return 0 if status in ("completed", "early_stopped", "stopped") else 1


def cmd_export(args) -> int:
    from lorafit import export

    if args.merge:
        path = export.export_merged(args.adapter, args.out, args.model, args.backend,
                                    args.dtype, args.quantize)
        if args.quantize:
            print(f"note: merged onto the dequantized {args.quantize} base; the merged model "
                  "is dense, no longer quantized", file=sys.stderr)
    else:
        path = export.export_adapter(args.adapter, args.out, args.format, args.model)
    print(path)
    return 0


def cmd_convert(args) -> int:
    from lorafit import export

    print(export.export_adapter(args.src, args.out, args.to, None))
    return 0


def cmd_demo(args) -> int:
    from lorafit.demo import run_demo

    return run_demo(backend=args.backend, output=args.output, steps=args.steps)


def _add_backend_flags(p):
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.add_argument("--device", default=None, help="cpu, cuda, mps or metal (default: best)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="LoRA fine-tuning on PyTorch and MLX, with a memory estimator and a terminal UI.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="what this machine offers: backends, devices, memory")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("generate", help="generate text from a model (and adapter)")
    p.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    p.add_argument("--adapter", help="PEFT (or mlx-lm) adapter folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--quantize", default=None, help="4bit or 8bit frozen weights (MLX)")
    _add_backend_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="fine-tune a LoRA adapter")
    add_train_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export an adapter to mlx-lm, or merge it into the model")
    p.add_argument("out", help="output folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. RUN/adapter)")
    p.add_argument("--format", default="mlx-lm", choices=["mlx-lm", "peft"])
    p.add_argument("--merge", action="store_true",
                   help="write a merged Hugging Face model folder instead")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights (default: the base model's)")
    p.add_argument("--quantize", choices=["4bit", "8bit"],
                   help="with --merge: the adapter was trained on this quantized base")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="convert an adapter between mlx-lm and PEFT layouts")
    p.add_argument("src", help="adapter folder (mlx-lm or PEFT)")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", default="peft", choices=["peft", "mlx-lm"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="fine-tune a tiny bundled model on a small task, "
                                    "and show it learned")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.add_argument("--output", default=None, help="run directory (default: a temp folder)")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    p.set_defaults(func=cmd_demo)

    from lorafit.estimating import add_parser as add_estimate

    add_estimate(sub, add_train_flags, config_from_args)
    from lorafit.tui.cli import add_parsers as add_tui

    add_tui(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_console and argv and argv[0] != "env" and os.environ.get("LORAFIT_NO_REEXEC") != "1":
        from lorafit.core.blas import reexec_with_openblas

        reexec_with_openblas(argv)  # a process that is already running cannot preload
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LorafitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
