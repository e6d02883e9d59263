"""Every supported family, proven the same way: a table of tiny random models (each
family's quirks switched on: windows shorter than the test sequence, soft-capping, partial
rotary, experts, ...) and one runner of checks against transformers, PEFT and mlx-lm.

Adding a family = adding a row to CASES (and its implementation); every check below runs
on it. Ids are random, so nothing here was tuned to a particular input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from conftest import build_hf_model, random_ids
from lorafit.core import adapter_io, lora
from lorafit.core.lora import LoraConfig
from lorafit.models.loader import load_model


@dataclass
class Case:
    model_type: str
    config: dict = field(default_factory=dict)  # overrides of conftest.hf_config's base
    targets: list | str = "all-linear"  # LoRA targets (PEFT names)
    mlx_lm: bool = True  # mlx-lm has this family and reads its config as transformers does
    seq: int = 24  # test sequence length: longer than the windows in `config`
    id: str = ""

    def __post_init__(self):
        self.id = self.id or self.model_type


CASES = [
    Case("llama", dict(rope_scaling=None, attention_bias=True)),
    Case("mistral", dict(sliding_window=7), mlx_lm=False),  # mlx-lm ignores the window
    Case("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                       tie_word_embeddings=True), mlx_lm=False),
    Case("qwen3", dict(head_dim=32)),
    # Gated DeltaNet and gated full-attention layers, partial rotary, (1 + w) norms; 70
    # tokens cross the delta rule's 64-step chunks. mlx-lm has no qwen3_5_text model (only
    # the VL wrapper qwen3_5, which nests it under language_model and takes the layer
    # types from full_attention_interval).
    Case("qwen3_5_text", dict(num_hidden_layers=3, head_dim=32,
                              layer_types=["linear_attention", "full_attention",
                                           "linear_attention"],
                              linear_num_key_heads=2, linear_num_value_heads=4,
                              linear_key_head_dim=16, linear_value_head_dim=8),
         mlx_lm=False, seq=70),
    # The same hybrid with qwen3_next's fused DeltaNet projections; dense MLPs only (its
    # experts wait for the MoE block), so num_experts=0. PEFT maps qwen3_next's gate/up/
    # down_proj targets onto expert parameters (its transformers-v5 MoE conversion), which
    # a dense MLP lacks, so the targets here are every other projection. mlx-lm's
    # qwen3_next wants rope_theta and partial_rotary_factor at the top level, where
    # transformers 5 no longer writes them (they are in rope_parameters).
    Case("qwen3_next", dict(num_hidden_layers=4, head_dim=32, num_experts=0,
                            linear_num_key_heads=2, linear_num_value_heads=4,
                            linear_key_head_dim=16, linear_value_head_dim=8), seq=70,
         targets=["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba",
                  "out_proj"], mlx_lm=False),
]
IDS = [c.id for c in CASES]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    cache = {}

    def get(case: Case):
        if case.id not in cache:
            folder = tmp_path_factory.mktemp(f"family-{case.id}")
            cache[case.id] = build_hf_model(folder, case.model_type, tokenizer, **case.config)
        return cache[case.id]
    return get


def logits_of(model, ops, ids):
    return ops.to_numpy(model.logits(ops.from_numpy(ids)))


def hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.float().numpy()


def close(got, want, rel=1e-4):
    """Max abs difference within rel of the logit scale."""
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert got.shape == want.shape and err <= rel * scale, f"max abs diff {err:.2e}"


def peft_config(case: Case, r=4, alpha=8, **kw):
    from peft import LoraConfig as PeftConfig
    return PeftConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=case.targets,
                      **kw)


def lorafit_config(case: Case, r=4, alpha=8, **kw):
    return LoraConfig(r=r, alpha=alpha, targets=case.targets, **kw)


def random_peft(ref, case: Case, seed=0):
    """A PEFT model over a copy of ref with random (non-zero) A and B."""
    from peft import get_peft_model

    pm = get_peft_model(copy.deepcopy(ref), peft_config(case))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pm.eval()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logits_equal_transformers(built, backend, case):
    folder, ref = built(case)
    ids = random_ids(ref.config.vocab_size, (2, case.seq), seed=11)
    close(logits_of(load_model(str(folder), backend), backend, ids), hf_logits(ref, ids))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_greedy_generation_with_the_cache_equals_transformers(built, backend, case):
    from lorafit.core.generate import generate_ids

    folder, ref = built(case)
    prompt = random_ids(ref.config.vocab_size, (1, case.seq), seed=5)
    with torch.no_grad():
        out = ref.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0, min_new_tokens=12)
    model = load_model(str(folder), backend)
    got = list(generate_ids(model, prompt[0].tolist(), max_new_tokens=12))
    assert got == out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_adapter_gives_peft_logits(built, backend, case, tmp_path):
    folder, ref = built(case)
    pm = random_peft(ref, case)
    pm.save_pretrained(str(tmp_path))
    ids = random_ids(ref.config.vocab_size, (2, case.seq), seed=2)
    cfg, adapter = adapter_io.load_peft(tmp_path)
    model = load_model(str(folder), backend)
    lora.attach(model, cfg, adapter)
    want = hf_logits(pm, ids)
    close(logits_of(model, backend, ids), want)
    assert np.abs(want - hf_logits(ref, ids)).max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lorafit_adapter_loads_in_peft_mlx_lm_and_merged_transformers(built, torch_backend,
                                                                        case, tmp_path):
    import transformers
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file

    from lorafit.export import export_adapter, export_merged

    folder, ref = built(case)
    ops = torch_backend
    model = load_model(str(folder), ops)
    cfg = lorafit_config(case)
    names = lora.attach(model, cfg, seed=1)
    rng = np.random.default_rng(2)
    adapter = {k: rng.normal(0, 0.2, model.params[k].shape).astype(np.float32) for k in names}
    lora.detach(model)
    lora.attach(model, cfg, adapter)
    out = adapter_io.save_peft(tmp_path / "peft", adapter, cfg, str(folder),
                               num_layers=model.args.num_hidden_layers)
    ids = random_ids(ref.config.vocab_size, (2, case.seq), seed=4)
    ours = logits_of(model, ops, ids)

    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(out)).eval()
    assert set(load_file(str(out / "adapter_model.safetensors"))) == \
        set(get_peft_model_state_dict(pm))  # no missing, no unexpected keys
    close(ours, hf_logits(pm, ids))

    if case.mlx_lm:
        import mlx.core as mx
        from mlx_lm.tuner.utils import load_adapters
        from mlx_lm.utils import load_model as mlx_load_model

        mlx_dir = export_adapter(out, tmp_path / "mlx", "mlx-lm", None)
        mm, _ = mlx_load_model(folder)
        mm = load_adapters(mm, str(mlx_dir))
        close(np.array(mm(mx.array(ids)).astype(mx.float32)), ours)

    merged = export_merged(out, tmp_path / "merged", str(folder), "torch")
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    close(hf_logits(tm, ids), ours)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_loss_curve_on_torch_and_mlx(built, case, torch_backend, mlx_backend):
    from lorafit.core import events as ev
    from lorafit.core.config import TrainConfig
    from lorafit.core.data import Example
    from lorafit.core.train import Trainer

    folder, ref = built(case)
    rng = np.random.default_rng(7)
    examples = [Example(rng.integers(3, ref.config.vocab_size, n).astype(np.int32),
                        np.ones(n, bool), f"x:{i}")
                for i, n in enumerate(rng.integers(case.seq // 2, case.seq + 1, 16))]
    curves = []
    for ops in (torch_backend, mlx_backend):
        model = load_model(str(folder), ops)
        cfg = TrainConfig(model=str(folder), data="-", rank=4, alpha=8,
                          targets=case.targets if isinstance(case.targets, str)
                          else ",".join(case.targets),
                          batch_size=4, lr=5e-3, max_steps=6, seq_len=case.seq, seed=3,
                          warmup_steps=1)
        lora.attach(model, cfg.lora_config(), seed=cfg.seed)
        losses = []
        trainer = Trainer(model, cfg, examples,
                          sinks=[lambda e: losses.append(e.loss)
                                 if isinstance(e, ev.StepReport) else None])
        trainer.run()
        curves.append(losses)
    assert len(curves[0]) == 6 and curves[0][-1] < curves[0][0]
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trainable_count_equals_peft_and_the_estimator(built, torch_backend, case):
    from peft import get_peft_model

    from lorafit.core.estimate import Settings, adapter_params
    from lorafit.models import memory_shape

    folder, ref = built(case)
    model = load_model(str(folder), torch_backend)
    lora.attach(model, lorafit_config(case))
    trainable, total = get_peft_model(copy.deepcopy(ref),
                                      peft_config(case)).get_nb_trainable_parameters()
    assert lora.count_params(model.params, model.parameter_shapes()) == (trainable, total)
    targets = case.targets if isinstance(case.targets, str) else ",".join(case.targets)
    shape = memory_shape(ref.config.to_dict())
    assert adapter_params(shape, Settings(rank=4, targets=targets)) == trainable
