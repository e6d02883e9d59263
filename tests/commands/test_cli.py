"""The command line: generation output, `env`, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lorafit.cli import main
from lorafit.core import adapter_io, lora
from lorafit.core.lora import LoraConfig
from lorafit.models.loader import load_model


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if not l.startswith("backend:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_prints_only_the_generated_text(capsys, tiny_models, tokenizer):
    folder, ref = tiny_models["llama"]
    prompt = "hello world"
    code, out, err = run_cli(capsys, "generate", "--model", str(folder), "--prompt", prompt,
                             "--max-new-tokens", "8", "--backend", "torch")
    assert code == 0
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref_ids = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    new = [t for t in ref_ids[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]
    assert out == tokenizer.decode(new, skip_special_tokens=True) + "\n"


def test_generate_with_chat_template_and_adapter(capsys, tmp_path, tiny_models):
    folder, _ = tiny_models["qwen2"]
    code, out, _ = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "hi",
                           "--chat", "--max-new-tokens", "4", "--backend", "mlx")
    assert code == 0
    # an adapter with non-zero B changes the output distribution; generation still works
    model = load_model(str(folder), __import__("lorafit.backends", fromlist=["x"])
                       .get_backend("torch"))
    cfg = LoraConfig(r=2, targets="all-linear")
    names = lora.attach(model, cfg)
    rng = np.random.default_rng(0)
    adapter = {k: rng.normal(0, 0.5, model.params[k].shape).astype(np.float32) for k in names}
    adapter_io.save_peft(tmp_path / "ad", adapter, cfg, str(folder))
    code, out2, _ = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "hi",
                            "--chat", "--max-new-tokens", "4", "--adapter",
                            str(tmp_path / "ad"), "--temperature", "0.8", "--seed", "1")
    assert code == 0 and out2.endswith("\n")


def test_env_lists_backends_and_auto_choice(capsys):
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert "torch" in out and "mlx" in out and "auto:" in out and "RAM" in out


def test_missing_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "x", "--backend", "torch")
    assert_one_line_error(code, err, "no such folder")


def test_missing_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "x",
                           "--backend", "torch")
    assert_one_line_error(code, err, "no config.json")


def test_unknown_model_type_lists_supported(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "x",
                           "--backend", "torch")
    assert_one_line_error(code, err, "gpt2", "llama", "mistral", "qwen2", "qwen3")


def test_pickle_only_folder_is_refused(capsys, tmp_path, tiny_models):
    folder, _ = tiny_models["llama"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "--prompt", "x",
                           "--backend", "torch")
    assert_one_line_error(code, err, "pytorch_model.bin", "never unpickles")


def test_remote_code_is_never_run(capsys, tmp_path, tiny_models):
    folder, _ = tiny_models["llama"]
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    code, _, _ = run_cli(capsys, "generate", "--model", str(tmp_path / "m"), "--prompt", "x",
                         "--max-new-tokens", "2", "--backend", "torch")
    assert code == 0
    assert not (tmp_path / "ran").exists()


def test_adapter_shape_mismatch_names_key_and_shapes(capsys, tmp_path, tiny_models):
    folder, _ = tiny_models["llama"]
    adapter = {"model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 99), np.float32),
               "model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, 4), np.float32)}
    adapter_io.save_peft(tmp_path / "bad", adapter, LoraConfig(r=4), str(folder))
    code, _, err = run_cli(capsys, "generate", "--model", str(folder), "--prompt", "x",
                           "--adapter", str(tmp_path / "bad"), "--backend", "torch")
    assert_one_line_error(code, err, "model.layers.0.self_attn.q_proj.lora_A.weight",
                          "(4, 99)", "(r, 64)")


def test_mlx_lm_export_of_a_module_outside_the_layers_is_a_one_line_error(capsys, tmp_path):
    # Gemma 4's per_layer_model_projection (all-linear adapts it) sits outside the decoder
    # layers, where mlx-lm's adapters cannot go: no folder mlx-lm would reject is written
    r = 2
    adapter = {"model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((r, 8), np.float32),
               "model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((8, r), np.float32),
               "model.per_layer_model_projection.lora_A.weight": np.ones((r, 8), np.float32),
               "model.per_layer_model_projection.lora_B.weight": np.ones((16, r), np.float32)}
    adapter_io.save_peft(tmp_path / "peft", adapter, LoraConfig(r=r), None, num_layers=1)
    code, _, err = run_cli(capsys, "export", str(tmp_path / "mlx"), "--adapter",
                           str(tmp_path / "peft"), "--format", "mlx-lm")
    assert_one_line_error(code, err, "model.per_layer_model_projection", "--targets",
                          "--merge")
    assert not (tmp_path / "mlx").exists()
    adapter = {k: v for k, v in adapter.items() if k.startswith("model.layers.")}
    adapter_io.save_peft(tmp_path / "peft", adapter, LoraConfig(r=r), None, num_layers=1)
    assert run_cli(capsys, "export", str(tmp_path / "mlx"), "--adapter",
                   str(tmp_path / "peft"), "--format", "mlx-lm")[0] == 0
    assert (tmp_path / "mlx" / "adapters.safetensors").exists()


def test_unknown_backend_choice_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "x", "--prompt", "y", "--backend", "jax"])


def test_train_help_shows_every_config_flag_with_its_default(capsys, monkeypatch):
    """The train/estimate flags are generated from TrainConfig: every field is a flag whose
    help line has a description and TrainConfig's default."""
    from dataclasses import fields

    from lorafit.core.config import TrainConfig

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: one block per flag
    for command in ("train", "estimate"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        blocks, current = {}, None
        for line in out.split("options:")[1].splitlines():
            if line.startswith("  -"):
                current = line.split()[0]
                blocks[current] = line
            elif current:
                blocks[current] += line
        for f in fields(TrainConfig):
            flag = "--" + f.name.replace("_", "-")
            assert flag in blocks, f"{flag} missing from `lorafit {command} --help`"
            default = f.default
            shown = ("none" if default in (None, "") else
                     ("on" if default else "off") if isinstance(default, bool) else
                     str(default))
            text = " ".join(blocks[flag].split())
            assert text.endswith(f"(default: {shown})"), text
            assert len(text) > len(flag) + len(f"(default: {shown})") + 10, text  # described
    for flag in ("--model", "--data", "--val-data", "--val-fraction", "--output", "--rank",
                 "--alpha", "--dropout", "--targets", "--layers", "--batch-size",
                 "--grad-accum", "--lr", "--schedule", "--warmup-steps", "--weight-decay",
                 "--max-grad-norm", "--epochs", "--max-steps", "--seq-len", "--dtype",
                 "--quantize", "--seed", "--eval-every", "--early-stopping-patience",
                 "--save-every", "--keep-checkpoints", "--log-every", "--on-bad-record",
                 "--pack", "--grad-checkpoint", "--rslora", "--dora", "--train-on-prompt",
                 "--force", "--backend", "--device"):
        assert flag in blocks


def test_config_flags_default_to_not_given(tmp_path):
    """A flag left out does not override the TOML file; one given does."""
    from lorafit.cli import build_parser, config_overrides
    from lorafit.core.config import resolve

    (tmp_path / "c.toml").write_text('rank = 4\nschedule = "linear"\npack = true\n'
                                     'layers = [0, 2]\n')
    args = build_parser().parse_args(["train", str(tmp_path / "c.toml"), "--lr", "0.5"])
    assert all(v is None for k, v in config_overrides(args).items() if k != "lr")
    cfg = resolve(args.config, config_overrides(args))
    assert (cfg.rank, cfg.schedule, cfg.pack, cfg.layers, cfg.lr) == (4, "linear", True,
                                                                      [0, 2], 0.5)
    args = build_parser().parse_args(["train", str(tmp_path / "c.toml"), "--rank", "2",
                                      "--layers", "1,3", "--dtype", "bf16"])
    cfg = resolve(args.config, config_overrides(args))
    assert (cfg.rank, cfg.layers, cfg.dtype) == (2, [1, 3], "bfloat16")


def test_bad_choice_in_a_config_flag_is_a_one_line_error(capsys):
    code, _, err = run_cli(capsys, "estimate", "--model", "qwen3-0.6b", "--schedule", "step")
    assert_one_line_error(code, err, "schedule 'step'", "cosine")
