"""GRPO (--method grpo): the loss and gradients on a fixed batch of sampled completions
equal TRL's GRPOTrainer._compute_loss (torch and MLX); with beta > 0 the first step's KL is
0 and its gradient the pure advantage term; a reward that favours a letter is learned; the
CLI's mistakes are one line."""

from __future__ import annotations

import copy
import json
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import WORDS, build_hf_model, train_recording as train
from lorafit.core import grpo_loss as gl
from lorafit.core.config import TrainConfig
from lorafit.core.grpo_data import load_prompts
from lorafit.core.grpo_train import GRPOTrainer
from lorafit.core.lora import attach
from lorafit.models.loader import load_model

G = 4  # completions per prompt


def count_o(prompts, completions, **kw):
    """A reward for the fixed-batch tests (never called there)."""
    return [float(c.count("o")) for c in completions]


def write_prompts(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choice(WORDS, 3)) + " ->"}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("grpo")
    folder, base = build_hf_model(root / "model", "llama", tokenizer, num_hidden_layers=2,
                                  hidden_size=32, intermediate_size=64, rope_scaling=None)
    rewards = root / "rewards.py"
    rewards.write_text("def count_o(prompts, completions, **kw):\n"
                       "    return [float(c.count('o')) for c in completions]\n"
                       "def letters(prompts, completions, **kw):\n"
                       "    return [float(sum(ch.isascii() and ch.isalpha() for ch in c))\n"
                       "            for c in completions]\n"
                       "NOT_A_FUNCTION = 3\n")
    return SimpleNamespace(root=root, folder=folder, base=base, tokenizer=tokenizer,
                           data=write_prompts(root / "prompts.jsonl", 8), rewards=rewards)


def make_cfg(s, out, **kw):
    base = dict(model=str(s.folder), data=str(s.data), output=str(s.root / out),
                backend="torch", rank=4, alpha=8, targets="q_proj,v_proj", batch_size=2,
                lr=5e-3, max_steps=3, seq_len=32, seed=0, schedule="constant",
                method="grpo", reward=f"{s.rewards}:count_o", num_generations=G,
                max_new_tokens=6)
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(s, backend, adapter=None, **kw):
    from lorafit.backends import get_backend

    cfg = make_cfg(s, f"unused-{backend}", backend=backend, **kw)
    ops = get_backend(backend, "cpu")
    model = load_model(str(s.folder), ops, "float32")
    attach(model, cfg.lora_config(), seed=0)
    prompts, _ = load_prompts(s.data, s.tokenizer, cfg.seq_len, cfg.max_new_tokens)
    trainer = GRPOTrainer(model, cfg, prompts, tokenizer=s.tokenizer, reward=count_o)
    if adapter is not None:
        trainer.trainable = {k: ops.from_numpy(adapter[k]) for k in trainer.trainable}
    return trainer


# one fixed "sampled" batch: 2 prompts of 3 tokens, G completions each of 2 to 5 tokens
RNG = np.random.default_rng(7)
PROMPTS = [[1] + RNG.integers(3, 300, 2).tolist() for _ in range(2)]
COMPLETIONS = [RNG.integers(3, 300, int(n)).tolist() for n in RNG.integers(2, 6, 2 * G)]
REWARDS = np.asarray([1.0, 0.0, 2.0, 0.5, 3.0, 3.0, 1.0, 0.0])


def lorafit_loss(trainer):
    """(loss, KL sum, {adapter key: grad}) of the fixed batch."""
    ops = trainer.ops
    prompt_rows = [PROMPTS[i // G] for i in range(2 * G)]
    s = trainer.sampled_batch(prompt_rows, COMPLETIONS, REWARDS)
    bb = trainer._on_backend(s.batch)
    ref = trainer._reference(bb)
    denom = ops.from_numpy(np.asarray(s.batch.n_tokens, np.float32))
    (loss, (_, kl)), grads = ops.value_and_grad(trainer._loss)(
        trainer.trainable, bb, ref, ops.from_numpy(s.advantages), denom)
    return ops.to_float(loss), ops.to_float(kl), {k: ops.to_numpy(g) for k, g in grads.items()}


def random_adapter(trainer, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32)
            for k, v in trainer.adapter_numpy().items()}


@pytest.fixture(scope="module")
def trl_grpo(setup):
    """TRL 1.16's GRPOTrainer (its defaults: loss_type dapo, bias-corrected KL) on the PEFT
    model with the same random adapter; the reference log-probs by TRL's own method with
    the adapter disabled."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer as TRLGRPO
    from trl.trainer.utils import nanstd

    s = setup
    adapter = random_adapter(make_trainer(s, "torch"))
    # bf16=False: GRPOConfig's default autocasts the log-probs to bfloat16, even on the CPU
    args = GRPOConfig(output_dir=str(s.root / "trl"), report_to=[], use_cpu=True, bf16=False,
                      beta=0.04, num_generations=G, per_device_train_batch_size=G,
                      max_completion_length=6)
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trl = TRLGRPO(model=copy.deepcopy(s.base), reward_funcs=count_o, args=args,
                  train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"]}),
                  processing_class=s.tokenizer, peft_config=peft)
    with torch.no_grad():
        for n, p in trl.model.named_parameters():
            key = n.replace("base_model.model.", "").replace(".default", "")
            if key in adapter:
                p.copy_(torch.from_numpy(adapter[key]))
    assert sum(p.requires_grad for p in trl.model.parameters()) == len(adapter)
    width = max(map(len, COMPLETIONS))
    comp = torch.zeros((2 * G, width), dtype=torch.long)
    mask = torch.zeros_like(comp)
    for i, c in enumerate(COMPLETIONS):
        comp[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), 1
    prompt = torch.tensor([PROMPTS[i // G] for i in range(2 * G)])
    # TRL's advantages: (r - group mean) / (group nanstd + 1e-4)
    r = torch.tensor(REWARDS, dtype=torch.float32).view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (nanstd(r, dim=1)[:, None] + 1e-4)).view(-1)
    ids = torch.cat([prompt, comp], 1)
    att = torch.cat([torch.ones_like(prompt), mask], 1)
    with torch.no_grad(), trl.model.disable_adapter():
        ref, _, _ = trl._get_per_token_logps_and_entropies(trl.model, ids, att, width)
    inputs = dict(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), completion_ids=comp,
                  completion_mask=mask, advantages=adv, num_items_in_batch=mask.sum(),
                  ref_per_token_logps=ref)
    trl.model.train()
    trl.current_gradient_accumulation_steps = 1
    loss = trl._compute_loss(trl.model, inputs)
    loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.numpy()
             for n, p in trl.model.named_parameters() if p.grad is not None}
    return SimpleNamespace(adapter=adapter, loss=loss.item(), grads=grads, adv=adv.numpy(),
                           kl=trl._metrics["train"]["kl"][-1], args=args)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_grpo_loss_and_gradients_match_trl(setup, trl_grpo, backend):
    t = trl_grpo
    assert t.args.loss_type == "dapo" and t.args.use_bias_correction_kl  # 1.16's defaults
    trl_beta = next(f.default for f in fields(type(t.args)) if f.name == "beta")
    ours = TrainConfig(**{**make_cfg(setup, "x").to_dict(), "beta": None}).beta
    assert ours == trl_beta == 0.0  # no KL term (no reference pass) unless asked, as TRL
    np.testing.assert_allclose(gl.advantages(REWARDS, G), t.adv, rtol=1e-6, atol=1e-6)
    trainer = make_trainer(setup, backend, t.adapter, beta=0.04)
    loss, kl, grads = lorafit_loss(trainer)
    tokens = sum(map(len, COMPLETIONS))
    assert abs(loss - t.loss) < 1e-5
    assert abs(kl / tokens - t.kl) < 1e-6 and t.kl > 1e-3  # the adapter moved it off base
    assert set(grads) == set(t.grads)
    for k, g in grads.items():
        np.testing.assert_allclose(g, t.grads[k], atol=1e-5, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_first_step_kl_is_zero_and_the_gradient_is_the_advantage_term(setup, backend):
    """B = 0 at step one: the policy is the base, so the KL and its gradient vanish."""
    trainer = make_trainer(setup, backend, beta=0.5)
    loss, kl, grads = lorafit_loss(trainer)
    plain = make_trainer(setup, backend, beta=0.0)
    loss0, _, grads0 = lorafit_loss(plain)
    assert kl == 0.0 and loss == pytest.approx(loss0, abs=1e-7)
    assert any(np.abs(g).max() > 1e-6 for g in grads0.values())
    for k in grads:
        np.testing.assert_allclose(grads[k], grads0[k], atol=1e-7, rtol=1e-5, err_msg=k)


def test_a_reward_for_letters_is_learned(setup):
    """The tiny model's byte-level vocabulary is mostly not letters: a reward counting the
    ASCII letters of 2-token completions rises within a few steps."""
    cfg = make_cfg(setup, "learn", backend="mlx", max_steps=6, lr=0.05, targets="all-linear",
                   num_generations=8, batch_size=4, beta=0.01, max_new_tokens=2,
                   reward=f"{setup.rewards}:letters")
    _, rec = train(cfg)
    means = [r.reward_mean for r in rec.reports()]
    assert len(means) == 6 and np.mean(means[-3:]) > means[0] + 0.3, means
    lines = [json.loads(x) for x in (setup.root / "learn" / "metrics.jsonl").open()]
    rows = [x for x in lines if x.get("reward_mean") is not None]
    assert [x["reward_mean"] for x in rows] == pytest.approx(means)
    assert all(0 < x["completion_length"] <= 2 and x["kl"] >= 0 and x["reward_std"] >= 0
               for x in rows)


def test_resume_samples_and_trains_as_the_straight_run(setup):
    """Completions come from seeds of (run seed, step, prompt, index): stopped after step 1
    and resumed, steps 2 and 3 repeat the straight run's rewards and losses. LoRA dropout
    trains but stays out of the sampling."""
    kw = dict(backend="mlx", max_new_tokens=2, dropout=0.1, lr=0.05)
    trainer, rec = train(make_cfg(setup, "straight", **kw))
    straight = rec.reports()
    assert trainer.model.lora.dropout == 0.1 and trainer._engine.model.lora.dropout == 0
    cfg = make_cfg(setup, "resumed", **kw)
    first = train(cfg, stop_at=1)[1].reports()
    rest = train(cfg, resume=True)[1].reports()
    assert [r.step for r in first + rest] == [1, 2, 3]
    for a, b in zip(first + rest, straight, strict=True):
        assert a.reward_mean == b.reward_mean and a.completion_length == b.completion_length
        assert a.loss == pytest.approx(b.loss, abs=1e-6)


def test_cli_mistakes_are_one_line(setup, tmp_path, capsys):
    from lorafit.cli import main

    def run(*extra, data=setup.data, reward=f"{setup.rewards}:count_o"):
        code = main(["train", "--model", str(setup.folder), "--data", str(data), "--method",
                     "grpo", "--output", str(tmp_path / "run"), *extra] +
                    (["--reward", reward] if reward else []))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "needs --reward" in run(reward=None)
    assert "no file" in run(reward=str(tmp_path / "missing.py:fn"))
    assert "has no nothing" in run(reward=f"{setup.rewards}:nothing")
    assert "not callable" in run(reward=f"{setup.rewards}:NOT_A_FUNCTION")
    assert "expected file.py:function" in run(reward=str(setup.rewards))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a b"}) + "\n" + json.dumps({"question": "a"}) + "\n")
    assert f"{bad}:2: missing field prompt" in run(data=bad)
    assert "num-generations" in run("--num-generations", "1")
    assert "no validation pass" in run("--val-fraction", "0.2")
    # --columns renames the prompt field, as for the other methods
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"question": json.loads(x)["prompt"]}) + "\n"
                               for x in setup.data.read_text().splitlines()))
    assert "missing field prompt" in run(data=renamed)
    from lorafit.commands.train import load_grpo_prompts, peek_data

    cfg = make_cfg(setup, "cols", data=str(renamed), columns="prompt=question")
    peek_data(cfg)
    assert len(load_grpo_prompts(cfg, setup.tokenizer)[0]) == 8


def test_dataset_check_knows_grpo_prompts(setup, tmp_path):
    """check_dataset_file (the TUI's and the CLI's data check) checks GRPO prompts as the
    trainer reads them (it raised a KeyError for grpo)."""
    from lorafit.core.data import check_dataset_file
    from lorafit.core.errors import LorafitError

    stats = check_dataset_file(setup.data, "fail", method="grpo")
    assert stats.format == "prompts" and stats.records == len(
        setup.data.read_text().splitlines())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(setup.data.read_text() + '{"completion": "x"}\n')
    with pytest.raises(LorafitError, match=r"bad\.jsonl:"):
        check_dataset_file(bad, "fail", method="grpo")
    assert check_dataset_file(bad, "skip", method="grpo").records == stats.records


def test_prompts_render_with_the_generation_prompt_and_must_leave_room(tmp_path):
    import string

    from tokenizers import AddedToken

    from lorafit.models.tiny import char_tokenizer

    tok = char_tokenizer(string.printable)
    tok.add_tokens([AddedToken(s, special=True, normalized=False)
                    for s in ("<|im_start|>", "<|im_end|>")])
    tok.chat_template = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}"
                         "<|im_start|>assistant\n{%- endif %}")
    path = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"prompt": msgs}) + "\n" + json.dumps({"prompt": "ab"}) + "\n" +
                    json.dumps({"prompt": "x" * 40}) + "\n")
    pset, problems = load_prompts(path, tok, 32, 8, on_bad_record="skip")
    assert len(pset) == 2 and pset.prompts == [msgs, "ab"]
    rendered = tok.decode(pset.examples[0].input_ids.tolist())
    assert rendered.endswith("hi<|im_end|><|im_start|>assistant")
    assert pset.examples[1].input_ids.tolist()[-2:] == tok("ab", add_special_tokens=False)[
        "input_ids"]
    assert problems == [f"{path}:3: the prompt has 41 tokens: with --max-new-tokens 8 it "
                        f"does not fit --seq-len 32"]
