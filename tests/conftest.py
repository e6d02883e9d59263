"""Shared fixtures: tiny random models built by transformers, a local tokenizer, backends.

Nothing here reaches the network. Models are built from a transformers config with random
weights and saved with `save_pretrained`, the way a user's folder looks.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import numpy as np
import pytest

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "user: what is two plus two? assistant: four",
    "lorafit trains adapters on torch and mlx alike",
] * 8

# model_type -> extra config: each family's distinguishing features switched on
FAMILIES = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 16}),
    "mistral": dict(sliding_window=16),  # shorter than the test sequences (24, 20+20)
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                  max_window_layers=1),
    "qwen3": dict(head_dim=32, rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="session")
def tokenizer():
    from lorafit.models.tiny import bpe_tokenizer

    return bpe_tokenizer(CORPUS, vocab_size=320)


def hf_config(model_type: str, vocab_size: int, **overrides):
    import transformers

    cls = transformers.AutoConfig.for_model(model_type).__class__
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=112,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    base.update(FAMILIES.get(model_type, {}))
    base.update(overrides)
    return cls(**base)


def build_hf_model(folder, model_type, tokenizer, seed=0, **overrides):
    """A random transformers model saved as a Hugging Face folder; returns (folder, model)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(model_type, len(tokenizer), **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # norms start at 1: randomise them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("sinks", "_bias", "router.bias")):  # gpt-oss: tiny or zero
                p.add_(torch.randn_like(p) * 0.5)
            elif name.endswith(("router.scale", "per_expert_scale")):  # Gemma 4: ones
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder, model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """{model_type: (folder, transformers model)} for every supported family."""
    out = {}
    for mt in FAMILIES:
        folder = tmp_path_factory.mktemp(f"tiny-{mt}")
        out[mt] = build_hf_model(folder, mt, tokenizer)
    return out


@pytest.fixture(scope="session")
def small_llama(tmp_path_factory, tokenizer):
    """(model folder, training JSONL): a 2-layer, hidden-32 Llama and 32 prompt/completion
    records, shared by the tests that train it end to end (runs go in their own folders)."""
    root = tmp_path_factory.mktemp("small-llama")
    folder, _ = build_hf_model(root / "model", "llama", tokenizer, num_hidden_layers=2,
                               hidden_size=32, intermediate_size=64, rope_scaling=None)
    return folder, write_prompt_completion_data(root / "train.jsonl", 32)


@pytest.fixture(scope="session", params=["torch", "mlx"])
def backend(request):
    from lorafit.backends import get_backend

    return get_backend(request.param, "cpu")


@pytest.fixture(scope="session")
def torch_backend():
    from lorafit.backends import get_backend

    return get_backend("torch", "cpu")


@pytest.fixture(scope="session")
def mlx_backend():
    from lorafit.backends import get_backend

    return get_backend("mlx", "cpu")


def random_ids(vocab: int, shape=(2, 12), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, shape)


WORDS = "the quick brown fox jumps over lazy dog hello world tiny corpus tokenizer".split()


def write_prompt_completion_data(path, n: int, seed: int = 0):
    """A JSONL file of n short prompt/completion records drawn from WORDS."""
    import json

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 6)))
            answer = " ".join(rng.choice(WORDS, rng.integers(1, 4)))
            f.write(json.dumps({"prompt": prompt + " ->", "completion": " " + answer}) + "\n")
    return path


def peft_logits_checking_keys(base, adapter_dir, ids):
    """Load adapter_dir in PEFT over a copy of `base`, check that the saved keys are exactly
    PEFT's (no missing, no unexpected), and return PEFT's logits for ids."""
    import copy

    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()
    saved = set(load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    assert saved == set(get_peft_model_state_dict(pm))
    with torch.no_grad():
        return pm(torch.tensor(ids)).logits.float().numpy()


def mlx_lm_logits(folder, mlx_adapter_dir, ids):
    """Logits of mlx-lm's own loader and LoRA layers for a model folder and an mlx-lm
    adapter folder, as float32 numpy."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model as mlx_load_model

    mm, _ = mlx_load_model(Path(folder))
    if mlx_adapter_dir is not None:  # None: the folder alone (a merged export)
        mm = load_adapters(mm, str(mlx_adapter_dir))
    return np.array(mm(mx.array(ids)).astype(mx.float32))


def randomize_lora(pm, seed=0):
    """Fill every LoRA leaf of a PEFT model with random, non-zero values (B too, so the
    adapter changes the logits); returns the model in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


def _has_accelerator() -> bool:
    try:
        import torch
        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        import mlx.core as mx
        return mx.metal.is_available()
    except ImportError:
        return False


def _started_as_pytest() -> bool:
    import sys

    first = Path(sys.argv[0])
    return first.name in ("pytest", "py.test") or first.parts[-2:] == ("pytest", "__main__.py")


def pytest_configure(config):
    """MLX tests run on OpenBLAS, as `lorafit` runs for a user (core/blas.py: the CLI
    re-executes itself with it preloaded; a running process cannot load it). The reference
    BLAS that mlx[cpu] links on Linux made the MLX tests ~7x slower. So the test run starts
    again, once, with OpenBLAS preloaded, when it is installed; LORAFIT_NO_REEXEC=1 keeps
    this process as it is."""
    import sys

    from lorafit.core.blas import REEXEC_FLAG, optimised_blas

    lib = optimised_blas()
    if (not sys.platform.startswith("linux") or lib is None or not _started_as_pytest()
            or os.environ.get("LORAFIT_NO_REEXEC") == "1" or os.environ.get(REEXEC_FLAG)
            or "openblas" in os.environ.get("LD_PRELOAD", "")):
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:  # the real stdout/stderr back before the new process takes them
        capture.stop_global_capturing()
    env = dict(os.environ, LD_PRELOAD=f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip())
    env[REEXEC_FLAG] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where a CUDA or Metal device exists and are skipped (with the
    reason shown) elsewhere; `slow` tests always run, `-m "not slow"` leaves them out."""
    if _has_accelerator():
        return
    skip = pytest.mark.skip(reason="needs a CUDA or Metal device (tests/gpu/run.sh)")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not the tests/gpu folder name
            item.add_marker(skip)


def write_peft_adapter(folder, base, seed=0, r=4, targets=("q_proj", "v_proj"), dora=False):
    """A PEFT LoRA (or DoRA) adapter with random non-zero leaves over a copy of the
    transformers model `base`, saved to folder (PEFT's own layout); returns folder."""
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), use_dora=dora)
    randomize_lora(get_peft_model(copy.deepcopy(base), cfg), seed).save_pretrained(str(folder))
    return folder


def train_recording(cfg, stop_at=None, resume=False):
    """Run `cfg` in this process as `lorafit train` would (build_trainer), recording its
    events; stop_at=N stops it after step N's report, as a stop request would (the resume
    tests of SFT-like trainers: DPO, GRPO). Returns (trainer, recorder); recorder.reports()
    are the StepReports."""
    from lorafit.commands.train import build_trainer
    from lorafit.core import events as ev

    class Recorder(ev.Sink):
        def __init__(self):
            self.events = []

        def __call__(self, e):
            self.events.append(e)
            if stop_at and isinstance(e, ev.StepReport) and e.step == stop_at:
                trainer.control.stop()

        def reports(self):
            return [e for e in self.events if isinstance(e, ev.StepReport)]

    rec = Recorder()
    trainer = build_trainer(cfg, [rec], resume=resume, report=lambda t: None)
    try:
        trainer.run()
    finally:
        for sink in trainer.sinks:
            sink.close()
    return trainer, rec


@pytest.fixture(autouse=True)
def fixed_tui_usage(request):
    """TUI tests see fixed CPU/GPU utilisation, so screens (and snapshots) repeat; a test
    marked real_usage samples the machine."""
    if "tui" not in request.node.path.parts or request.node.get_closest_marker("real_usage"):
        yield
        return
    from lorafit.tui import sysinfo

    fixed = sysinfo.Usage(cpu=37.0, trainer_cpu=180.0, trainer_rss=1536 * 2**20, gpus=[])
    mp = pytest.MonkeyPatch()
    mp.setattr(sysinfo.UsageSampler, "sample", lambda self, pid: fixed)
    yield
    mp.undo()
