"""The `lorafit` command line: parse flags and dispatch to lorafit.commands. User mistakes
end as a one-line `error: ...` on stderr with exit status 2, never a traceback.

The train/estimate flags are generated from TrainConfig (core/config.py): one flag per
field, its type, choices and help text from the field's annotation, FIELD_CHOICES and
docstring. They default to None (= not given) so that a TOML file's values stand; the help
shows TrainConfig's default.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing

from lorafit.core.config import BACKENDS, DTYPES, QUANTIZE
from lorafit.core.errors import LorafitError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def show_default(value) -> str:
    """A TrainConfig default as the help text shows it."""
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def config_flags() -> list[tuple[str, str, dict]]:
    """(flag, TrainConfig field, argparse kwargs) for every TrainConfig field."""
    from dataclasses import MISSING, fields

    from lorafit.core.config import FIELD_CHOICES, TrainConfig, field_docs

    hints = typing.get_type_hints(TrainConfig)
    docs = field_docs()
    flags = []
    for f in fields(TrainConfig):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default if f.default is not MISSING else f.default_factory()
        text = docs.get(f.name, "").replace("%", "%%")
        kw: dict = dict(dest=f.name, default=None,
                        help=f"{text} (default: {show_default(default)})".strip())
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw["type"] = {int: int, float: float}.get(kind, str)
            if typing.get_origin(kind) is list:
                kw.update(type=_int_list, metavar="N,N,...")
            if f.name in FIELD_CHOICES:  # checked by TrainConfig: a one-line error
                kw["metavar"] = "{" + ",".join(FIELD_CHOICES[f.name]) + "}"
        flags.append(("--" + f.name.replace("_", "-"), f.name, kw))
    return flags


def add_config_flags(p) -> None:
    """The flags shared by `train` and `estimate`."""
    p.add_argument("config", nargs="?", help="TOML config (flags override it)")
    for flag, _, kw in config_flags():
        p.add_argument(flag, **kw)


def config_overrides(args) -> dict:
    """{field: value} of the TrainConfig flags; None = not given."""
    return {dest: getattr(args, dest) for _, dest, _ in config_flags()}


def cmd_env(args) -> int:
    from lorafit.commands import env

    return env.main()


def cmd_generate(args) -> int:
    from lorafit.commands import generate

    return generate.main(args.model, args.prompt, args.adapter, args.max_new_tokens,
                         args.temperature, args.seed, args.chat, args.backend, args.device,
                         args.dtype, args.quantize)


def cmd_serve(args) -> int:
    from lorafit.commands import serve

    return serve.main(args.model, args.adapter, args.adapter_dir, args.host, args.port,
                      api_key=args.api_key, max_adapters=args.max_adapters,
                      backend=args.backend, device=args.device, dtype=args.dtype,
                      quantize=args.quantize, max_batch=args.max_batch, max_len=args.max_len,
                      max_tokens=args.max_tokens, log_every=args.log_every,
                      max_adapter_mb=args.max_adapter_mb)


def cmd_train(args) -> int:
    from lorafit.commands import train

    from lorafit.core.checkpoint import parse_allow_changed

    allowed = parse_allow_changed(args.allow_changed)
    cfg = train.resolve_config(args.config, config_overrides(args), args.resume)
    return train.main(cfg, resume=bool(args.resume), allow_changed=allowed, nproc=args.nproc,
                      argv=args.argv)


def cmd_estimate(args) -> int:
    from lorafit.commands import estimate
    from lorafit.core.config import resolve

    cfg = resolve(args.config, config_overrides(args))
    return estimate.main(cfg, args.budget, args.fit, args.json, nproc=args.nproc)


def cmd_export(args) -> int:
    from lorafit.commands import export

    return export.main(args.adapter, args.out, args.format, args.merge, args.model,
                       args.backend, args.dtype, args.quantize, args.outtype)


def cmd_convert(args) -> int:
    from lorafit.commands import export

    return export.convert(args.src, args.out, args.to)


def cmd_push(args) -> int:
    from lorafit.commands import push

    return push.main(args.folder, args.repo_id, args.dry_run, args.private, args.revision,
                     args.message)


def cmd_demo(args) -> int:
    from lorafit.commands import demo

    return demo.main(backend=args.backend, output=args.output, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    from lorafit.core.estimate import FIT_VARIABLES

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
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--quantize", default=None, metavar="{" + ",".join(QUANTIZE) + "}",
                   help="quantize the frozen weights: 4bit (torch with bitsandbytes, or "
                        "MLX) or 8bit (MLX only)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None, help="cpu, cuda, mps or metal (default: best)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model and its adapters over an "
                                     "OpenAI-compatible HTTP API")
    p.add_argument("--model", required=True, help="model folder or Hugging Face hub id")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="an adapter (PEFT, mlx-lm or a lorafit run folder) served as NAME; "
                        "repeatable")
    p.add_argument("--adapter-dir", metavar="DIR",
                   help="every adapter folder in DIR, by folder name, loaded on first use")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-adapters", type=int, default=8,
                   help="adapters held in memory at once (least recently used goes first)")
    p.add_argument("--max-adapter-mb", type=float, default=None, metavar="MB",
                   help="also bound the memory the held adapters take (default: no bound)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-len", type=int, default=2048,
                   help="tokens per sequence, prompt included (the KV cache's length)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens accepted")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between log lines")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--quantize", default=None, metavar="{" + ",".join(QUANTIZE) + "}",
                   help="quantize the frozen weights (as for generate)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None, help="cpu, cuda, mps or metal (default: best)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="fine-tune a LoRA adapter")
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (default: start a new run)")
    p.add_argument("--allow-changed", metavar="NAME,...",
                   help="with --resume: settings that may differ from the checkpoint's "
                        "(lr, schedule, warmup-steps, min-lr-ratio, max-steps, epochs, "
                        "eval-every, save-every, early-stopping-patience, weight-decay)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel in N processes on this machine, started with "
                        "the backend's launcher (torchrun, mlx.launch); the global batch is "
                        "batch-size x N x grad-accum (docs/distributed.md)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export an adapter to mlx-lm, or merge it into the model")
    p.add_argument("out", help="output folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. RUN/adapter)")
    p.add_argument("--format", default="mlx-lm", choices=["mlx-lm", "peft", "gguf"],
                   help="gguf: llama.cpp/Ollama files (base + LoRA adapter, or merged "
                        "with --merge) and a Modelfile")
    p.add_argument("--merge", action="store_true",
                   help="write a merged Hugging Face model folder instead (with --format "
                        "gguf: one merged GGUF)")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="with --format gguf: the tensor type of the GGUF files")
    p.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the merged weights (default: the base model's)")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="with --merge: the adapter was trained on this quantized base")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="convert an adapter between mlx-lm and PEFT layouts")
    p.add_argument("src", help="adapter folder (mlx-lm or PEFT)")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", default="peft", choices=["peft", "mlx-lm"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("push", help="upload an adapter, merged or GGUF folder to the "
                                    "Hugging Face Hub")
    p.add_argument("folder", help="folder to upload (e.g. RUN/adapter)")
    p.add_argument("repo_id", help="Hub repository, org/name (created if missing)")
    p.add_argument("--dry-run", action="store_true", help="list what would be sent; send "
                                                          "nothing")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (default: main)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("demo", help="fine-tune a tiny bundled model on a small task, "
                                    "and show it learned")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--output", default=None, help="run directory (default: a temp folder)")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("estimate", help="predict peak memory of a run before loading anything")
    add_config_flags(p)
    p.add_argument("--budget", help="memory to fit in, e.g. 24GiB (default: the device's)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--fit", choices=tuple(FIT_VARIABLES),
                   help="the largest value of this setting that fits")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="per device of N training processes (with --shard: sharded)")
    p.set_defaults(func=cmd_estimate)

    from lorafit.tui.cli import add_parsers as add_tui

    add_tui(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_console and argv and argv[0] != "env" and os.environ.get("LORAFIT_NO_REEXEC") != "1":
        from lorafit.core.blas import reexec_with_openblas, runs_mlx

        if runs_mlx(argv):  # a process that is already running cannot preload
            reexec_with_openblas(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # `train --nproc` hands the same command line to its workers
    try:
        code = int(args.func(args) or 0)
    except LorafitError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if from_console and _is_launched_worker():
        _exit_worker(code)
    return code


def _is_launched_worker() -> bool:
    from lorafit.core.launch import detect

    try:
        return detect().world_size > 1
    except LorafitError:
        return False


def _exit_worker(code: int) -> None:
    """A worker of a multi-process run ends here, its work saved and its output flushed:
    Python's exit handlers run (they leave the process group), then the process exits
    without the C++ teardown that follows them. That teardown destroyed a profiler or
    collective thread still joinable on a loaded machine ("terminate called without an
    active exception", SIGABRT) after the run had completed, and the launcher then
    reported the whole run as failed."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
