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
    model = load_model(args.model, B, args.dtype)
    if args.adapter:
        cfg, adapter = adapter_io.load_any(args.adapter)
        lora.attach(model, cfg, adapter, dtype=model.dtype)
    text = generate_text(model, args.prompt, args.max_new_tokens, args.temperature,
                         args.seed, chat=args.chat)
    print(text)
    return 0


def _add_backend_flags(p):
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"])
    p.add_argument("--device", default=None, help="cpu, cuda, mps or metal (default: best)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description=__doc__.splitlines()[0])
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
    _add_backend_flags(p)
    p.set_defaults(func=cmd_generate)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from lorafit.core.blas import reexec_with_openblas

    if argv and argv[0] not in ("env",) and os.environ.get("LORAFIT_NO_REEXEC") != "1":
        reexec_with_openblas(argv)
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
