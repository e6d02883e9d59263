"""Preference tuning (--method dpo|orpo): the losses, rewards and gradients equal TRL's on
the same tiny model, adapter and batch (torch and MLX); DPO starts at ln 2; training raises
the held-out margin as transformers + PEFT measure it; both backends follow one curve."""

from __future__ import annotations

import copy
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import WORDS, build_hf_model, train_recording as train
from lorafit.core import events as ev
from lorafit.core.adapter_io import save_peft
from lorafit.core.config import TrainConfig
from lorafit.core.lora import attach
from lorafit.core.preference_data import _batch, load_preferences
from lorafit.core.preference_train import PreferenceTrainer
from lorafit.models.loader import load_model

GOOD, BAD = "hello world tiny", "lazy dog over"  # the preferred and the dispreferred reply


def write_pairs(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 5))) + " ->"
            tail = " ".join(rng.choice(WORDS, rng.integers(0, 2)))
            f.write(json.dumps({"prompt": prompt, "chosen": f" {GOOD} {tail}".rstrip(),
                                "rejected": f" {BAD} {tail}".rstrip()}) + "\n")
    return path


def write_labelled(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(WORDS, rng.integers(2, 5))) + " ->"
            f.write(json.dumps({"prompt": prompt, "completion": f" {(GOOD, BAD)[i % 3 == 1]}"
                                f" {rng.choice(WORDS)}", "label": i % 3 != 1}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pref")
    folder, base = build_hf_model(root / "model", "llama", tokenizer, num_hidden_layers=2,
                                  hidden_size=32, intermediate_size=64, rope_scaling=None)
    return SimpleNamespace(root=root, folder=folder, base=base, tokenizer=tokenizer,
                           train=write_pairs(root / "train.jsonl", 24),
                           labelled=write_labelled(root / "labelled.jsonl", 8),
                           held=write_pairs(root / "held.jsonl", 8, seed=1))


def make_cfg(s, out, **kw):
    base = dict(model=str(s.folder), data=str(s.train), output=str(s.root / out),
                backend="torch", rank=4, alpha=8, targets="q_proj,v_proj", batch_size=2,
                lr=5e-3, max_steps=4, seq_len=32, seed=0, schedule="constant",
                method="dpo", beta=0.1)
    base.update(kw)
    return TrainConfig(**base)


def random_adapter(trainer, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32)
            for k, v in trainer.adapter_numpy().items()}


def lorafit_step(s, backend, method, adapter=None, data=None, **kw):
    """(loss, chosen rewards, rejected rewards, {adapter key: grad}) for pairs 0 and 1."""
    data = str(data or s.train)
    cfg = make_cfg(s, f"unused-{backend}", backend=backend, method=method, data=data, **kw)
    from lorafit.backends import get_backend

    ops = get_backend(backend, "cpu")
    model = load_model(str(s.folder), ops, "float32")
    attach(model, cfg.lora_config(), seed=0)
    pset, _ = load_preferences(data, s.tokenizer, cfg.seq_len, method)
    trainer = PreferenceTrainer(model, cfg, pset)
    if adapter is not None:
        trainer.trainable = {k: ops.from_numpy(adapter[k]) for k in trainer.trainable}
    b = _batch(pset, [0, 1, 2] if method == "kto" else [0, 1])
    pairs, tokens = trainer._counts(b)
    bb, ref, counts = trainer._prepare(b)
    denoms = ops.from_numpy(np.asarray([pairs, tokens], np.float32))
    (loss, (_, rc, rr)), grads = ops.value_and_grad(trainer._loss)(
        trainer.trainable, bb, ref, counts, denoms)
    return (ops.to_float(loss), ops.to_numpy(rc), ops.to_numpy(rr),
            {k: ops.to_numpy(g) for k, g in grads.items()}, trainer, pset)


def trl_inputs(pset, ks):
    """TRL's padded batch for pairs ks: chosen rows, then rejected rows."""
    return trl_rows([pset.examples[2 * k] for k in ks] + [pset.examples[2 * k + 1] for k in ks])


def peft_model(s, trainer, adapter, tmp):
    from peft import PeftModel

    save_peft(tmp, adapter, trainer.model.lora, str(s.folder),
              num_layers=trainer.model.args.num_hidden_layers)
    pm = PeftModel.from_pretrained(copy.deepcopy(s.base), str(tmp), is_trainable=True)
    return pm.float()


def peft_grads(pm) -> dict:
    return {n.replace("base_model.model.", "").replace(".default", ""): p.grad.numpy()
            for n, p in pm.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def trl_dpo(setup, tmp_path_factory):
    """TRL's DPOTrainer._compute_loss on the PEFT model with the same random adapter."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from peft import LoraConfig

    s = setup
    *_, trainer, pset = lorafit_step(s, "torch", "dpo")
    adapter = random_adapter(trainer)
    ds = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    args = DPOConfig(output_dir=str(s.root / "trl"), report_to=[], use_cpu=True, beta=0.1,
                     per_device_train_batch_size=2, gradient_checkpointing=False)
    # a new adapter (TRL's reference is then the base with it disabled), given our values
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trl = DPOTrainer(model=copy.deepcopy(s.base), args=args, train_dataset=ds,
                     processing_class=s.tokenizer, peft_config=peft)
    with torch.no_grad():
        for n, p in trl.model.named_parameters():
            key = n.replace("base_model.model.", "").replace(".default", "")
            if key in adapter:
                p.copy_(torch.from_numpy(adapter[key]))
    assert sum(p.requires_grad for p in trl.model.parameters()) == len(adapter)
    trl.model.train()
    loss = trl._compute_loss(trl.model, trl_inputs(pset, [0, 1]), False)
    loss.backward()
    m = trl._metrics["train"]
    return SimpleNamespace(adapter=adapter, loss=loss.item(), grads=peft_grads(trl.model),
                           chosen=m["rewards/chosen"][-1], rejected=m["rewards/rejected"][-1])


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dpo_starts_at_ln2_and_matches_trl(setup, trl_dpo, backend):
    loss0, rc0, rr0, *_ = lorafit_step(setup, backend, "dpo")  # B = 0: the base itself
    assert abs(loss0 - math.log(2)) < 1e-6
    assert np.all(rc0 == 0) and np.all(rr0 == 0)
    loss, rc, rr, grads, *_ = lorafit_step(setup, backend, "dpo", trl_dpo.adapter)
    assert abs(loss - math.log(2)) > 1e-3  # the random adapter moved it
    assert abs(loss - trl_dpo.loss) < 1e-5
    assert abs(rc.mean() - trl_dpo.chosen) < 1e-5 and abs(rr.mean() - trl_dpo.rejected) < 1e-5
    assert set(grads) == set(trl_dpo.grads)
    for k, g in grads.items():
        np.testing.assert_allclose(g, trl_dpo.grads[k], atol=1e-5, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_orpo_matches_trls_odds_ratio(setup, tmp_path, backend):
    """ORPO = NLL of the chosen completion tokens - mean(TRL's odds_ratio_loss), the
    latter from TRL's own function on PEFT's mean completion log-probs."""
    from trl.experimental.orpo import ORPOTrainer

    s, lam = setup, 0.25
    *_, trainer, pset = lorafit_step(s, backend, "orpo", orpo_lambda=lam)
    adapter = random_adapter(trainer, seed=1)
    loss, rc, rr, grads, *_ = lorafit_step(s, backend, "orpo", adapter, orpo_lambda=lam)
    pm = peft_model(s, trainer, adapter, tmp_path / "peft").train()
    inputs = trl_inputs(pset, [0, 1])
    logits = pm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    c, r = mean_logps.chunk(2)
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    losses, trc, trr, _, _ = ORPOTrainer.odds_ratio_loss(fake, c, r)
    nll = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, logits.shape[-1]),
                                            labels[:2, 1:].reshape(-1))
    ref = nll - losses.mean()
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5
    np.testing.assert_allclose(rc, trc.numpy(), atol=1e-5)
    np.testing.assert_allclose(rr, trr.numpy(), atol=1e-5)
    tg = peft_grads(pm)
    for k, g in grads.items():
        np.testing.assert_allclose(g, tg[k], atol=1e-5, rtol=1e-4, err_msg=k)


@pytest.fixture(scope="module")
def trl_kto(setup, tmp_path_factory):
    """TRL's KTOTrainer._compute_loss on a new PEFT adapter given our random values, for
    completions 0, 1 and 2 (one undesirable) and their mismatched KL rows."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    s = setup
    *_, trainer, pset = lorafit_step(s, "torch", "kto", data=s.labelled, batch_size=3)
    adapter = random_adapter(trainer, seed=2)
    ds = Dataset.from_list([{"prompt": "a", "completion": " b", "label": True},
                            {"prompt": "a", "completion": " c", "label": False}] * 2)
    args = KTOConfig(output_dir=str(s.root / "trl-kto"), report_to=[], use_cpu=True,
                     beta=0.2, per_device_train_batch_size=2, gradient_checkpointing=False,
                     desirable_weight=1.5, undesirable_weight=0.7)
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trl = KTOTrainer(model=copy.deepcopy(s.base), args=args, train_dataset=ds,
                     processing_class=s.tokenizer, peft_config=peft)
    with torch.no_grad():
        for n, p in trl.model.named_parameters():
            key = n.replace("base_model.model.", "").replace(".default", "")
            if key in adapter:
                p.copy_(torch.from_numpy(adapter[key]))
    trl.model.train()
    b = _batch(pset, [0, 1, 2])
    inputs = labelled_inputs(pset, b)
    loss = trl._compute_loss(trl.model, inputs, False)
    loss.backward()
    m = trl._metrics["train"]
    return SimpleNamespace(adapter=adapter, loss=loss.item(), grads=peft_grads(trl.model),
                           chosen=m["rewards/chosen"][-1], rejected=m["rewards/rejected"][-1],
                           kl=m["kl"][-1])


def labelled_inputs(pset, b):
    """TRL's KTO batch from one of our LabelledBatch (rows rebuilt with their lengths)."""
    from lorafit.core.preference_data import _mismatched

    ks = [0, 1, 2]
    main = trl_rows([pset.examples[k] for k in ks])
    kl = trl_rows(list(_mismatched(pset.examples, ks)))
    return {**main, **{f"KL_{k}": v for k, v in kl.items()},
            "label": torch.tensor(np.asarray(b.labels, bool))}


def trl_rows(rows):
    """TRL's padded batch of these rows: ids, attention and completion masks."""
    width = max(len(e.input_ids) for e in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, e in enumerate(rows):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids.astype(np.int64))
        att[i, :n] = 1
        comp[i, :n] = torch.tensor(e.loss_mask.astype(np.int64))
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_kto_matches_trl(setup, trl_kto, backend):
    from lorafit.core.preference_data import _batch as batch_of

    kw = dict(data=setup.labelled, batch_size=3, beta=0.2, kto_desirable_weight=1.5,
              kto_undesirable_weight=0.7)
    loss, rc, _, grads, trainer, pset = lorafit_step(setup, backend, "kto", trl_kto.adapter,
                                                     **kw)
    b = batch_of(pset, [0, 1, 2])
    assert list(b.labels) == [True, False, True]
    stats = trainer._reward_fields(trainer._stats(b, rc, rc))
    assert abs(loss - trl_kto.loss) < 1e-5
    assert abs(stats["reward_chosen"] - trl_kto.chosen) < 1e-5
    assert abs(stats["reward_rejected"] - trl_kto.rejected) < 1e-5
    assert trl_kto.kl > 0  # the clamp did not hide the term
    assert set(grads) == set(trl_kto.grads)
    for k, g in grads.items():
        np.testing.assert_allclose(g, trl_kto.grads[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_torch_and_mlx_follow_the_same_dpo_curve(setup):
    rt = train(make_cfg(setup, "curve-torch", backend="torch"))[1]
    _, rm = train(make_cfg(setup, "curve-mlx", backend="mlx"))
    lt, lm = ([r.loss for r in rec.reports()] for rec in (rt, rm))
    assert len(lt) == len(lm) == 4 and abs(lt[0] - math.log(2)) < 1e-6
    np.testing.assert_allclose(lm, lt, rtol=1e-3)
    for r in rt.reports():
        assert r.reward_margin == pytest.approx(r.reward_chosen - r.reward_rejected)
        assert 0 <= r.reward_accuracy <= 1
    lines = [json.loads(x) for x in (setup.root / "curve-torch" / "metrics.jsonl").open()]
    assert any("reward_margin" in x and x["reward_margin"] is not None for x in lines)
    start = next(e for e in rt.events if isinstance(e, ev.RunStarted))
    assert (start.examples, start.unit) == (24, "pairs")  # 24 pairs, 48 rows
    out = io.StringIO()
    ev.ConsoleSink(out)(start)
    assert ": 24 pairs, 0 validation" in out.getvalue()


def held_out_margin(s, model, tmp_adapter=None):
    """Mean over held-out pairs of log p(chosen) - log p(rejected) (completion tokens), by
    transformers (+ PEFT loading the saved adapter)."""
    if tmp_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_adapter))
    model.eval()
    pset, _ = load_preferences(s.held, s.tokenizer, 32, "dpo")
    inputs = trl_inputs(pset, list(range(len(pset))))
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"],
                       attention_mask=inputs["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(
        2, inputs["input_ids"][:, 1:, None])[..., 0]
    seq = (logp * inputs["completion_mask"][:, 1:]).sum(1)
    c, r = seq.chunk(2)
    return float((c - r).mean())


@pytest.mark.slow
def test_dpo_training_raises_the_held_out_margin(setup):
    s = setup
    trainer, rec = train(make_cfg(s, "margin", backend="mlx", max_steps=6, lr=1e-2,
                                      targets="all-linear"))
    before = held_out_margin(s, s.base)
    after = held_out_margin(s, s.base, s.root / "margin" / "adapter")
    assert after > before + 1.0, (before, after)
    reps = rec.reports()
    assert reps[-1].reward_margin > reps[0].reward_margin


def test_bad_preference_record_is_one_line_before_loading(setup, tmp_path, capsys):
    from lorafit.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n" +
                   json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    code = main(["train", "--model", str(setup.folder), "--data", str(bad), "--method", "dpo",
                 "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: missing field(s) rejected" in err
    assert "Traceback" not in err
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().splitlines()[0] + "\n")
    code = main(["train", "--model", str(setup.folder), "--data", str(good), "--method", "dpo",
                 "--pack", "--batch-size", "1", "--output", str(tmp_path / "run2")])
    assert code == 2 and "not packed" in capsys.readouterr().err


def test_estimate_counts_both_rows_of_a_pair(setup):
    from lorafit.core.estimate import settings_from_config

    assert settings_from_config(make_cfg(setup, "x", batch_size=3)).batch_size == 6
    assert settings_from_config(make_cfg(setup, "x", method="orpo")).batch_size == 4
    assert settings_from_config(make_cfg(setup, "x", method="kto")).batch_size == 2
    assert settings_from_config(make_cfg(setup, "x", method="sft")).batch_size == 2


def test_estimated_dpo_peak_is_within_the_bound_of_the_measured_one(tmp_path):
    """The estimator's DPO step (two trained rows a pair; the reference pass, without a
    graph, ends before the policy's) against the measured peak of a real DPO step on torch,
    with the estimator's usual 10 % bound (tests/core/test_estimate.py)."""
    from lorafit.core.estimate import estimate, settings_from_config
    from lorafit.models import memory_shape
    from memory_harness import Case, measure
    from test_estimate import TOLERANCE

    case = Case("dpo", seq=64)
    cfg = TrainConfig(model="m", data="d", backend="torch", method="dpo", rank=case.rank,
                      targets=case.targets, batch_size=case.batch, seq_len=case.seq)
    predicted = estimate(memory_shape(case.config()), settings_from_config(cfg))["total"]
    measured = measure(case, "torch", tmp_path, method="dpo")
    assert abs(predicted - measured) <= TOLERANCE * measured, \
        f"estimated {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


@pytest.mark.slow
def test_dpo_resume_is_exact(setup):
    """Stopped after step 2 and resumed: steps 3 and 4 repeat the straight run's."""
    straight = [r.loss for r in train(make_cfg(setup, "straight", backend="mlx"))[1].reports()]
    cfg = make_cfg(setup, "resumed", backend="mlx")
    first = train(cfg, stop_at=2)[1].reports()
    assert [r.step for r in first] == [1, 2]
    rest = train(cfg, resume=True)[1].reports()
    assert [r.step for r in rest] == [3, 4]
    np.testing.assert_allclose([r.loss for r in first + rest], straight, rtol=1e-6)


def test_message_lists_render_with_the_template_and_mask_only_the_completion(tmp_path):
    import string

    from tokenizers import AddedToken

    from lorafit.models.tiny import char_tokenizer

    tok = char_tokenizer(string.printable)
    tok.add_tokens([AddedToken(s, special=True, normalized=False)
                    for s in ("<|im_start|>", "<|im_end|>")])
    tok.chat_template = ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "<|im_end|>\n{%- endfor %}")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({
        "prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello there"}],
        "rejected": "go away"}) + "\n")
    pset, problems = load_preferences(path, tok, 128, "dpo")
    assert not problems and len(pset) == 1
    chosen, rejected = pset.examples[0], pset.examples[1]
    for e, text in ((chosen, "hello there"), (rejected, "go away")):
        rendered = tok.decode(e.input_ids.tolist())
        assert "be kind" in rendered and "hi" in rendered
        learned = tok.decode(e.input_ids[e.loss_mask].tolist())
        assert learned.startswith(text) and "hi" not in learned


def test_dpo_accumulation_equals_one_big_batch(setup):
    """A step's loss is a mean over all its pairs: 2 micro-batches of 2 = 1 batch of 4."""
    big = train(make_cfg(setup, "acc-big", backend="mlx", batch_size=4, max_steps=2))[1]
    acc = train(make_cfg(setup, "acc-small", backend="mlx", batch_size=2, grad_accum=2,
                         max_steps=2))[1]
    for a, b in zip(big.reports(), acc.reports(), strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.reward_margin == pytest.approx(b.reward_margin, rel=1e-4, abs=1e-7)


def test_dataset_check_knows_the_method(setup, tmp_path):
    """The form's data check (core/data.py) validates preference records for a preference
    method; SFT data under dpo is one line, not a problem per record."""
    from lorafit.core.data import check_dataset_file
    from lorafit.core.errors import LorafitError

    stats = check_dataset_file(setup.train, "fail", "dpo")
    assert (stats.format, stats.records, stats.problems) == ("pairs", 24, [])
    assert check_dataset_file(setup.labelled, "fail", "kto").records == 8
    with pytest.raises(LorafitError, match="needs prompt, completion, label"):
        check_dataset_file(setup.train, "skip", "kto")  # pairs under kto: every record bad
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    with pytest.raises(LorafitError) as e:
        check_dataset_file(sft, "skip", "dpo")
    assert str(e.value) == (f"{sft}: no pairs records: --method dpo needs prompt, chosen, "
                            "rejected fields (SFT data trains with --method sft)")
    assert check_dataset_file(sft, "fail").records == 1  # sft, as before


def test_columns_rename_preference_fields(setup, tmp_path):
    """--columns renames a set's columns for dpo/orpo/kto as for sft: the check before the
    model and the tokenized pairs see the renamed fields."""
    from lorafit.commands.train import load_preference_examples, peek_data
    from lorafit.core.errors import LorafitError

    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(
        json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n"
        for r in map(json.loads, setup.train.read_text().splitlines())))
    cfg = make_cfg(setup, "cols", data=str(renamed),
                   columns="prompt=question,chosen=good,rejected=bad")
    peek_data(cfg)
    got, val, _ = load_preference_examples(cfg, setup.tokenizer)
    want, _ = load_preferences(setup.train, setup.tokenizer, cfg.seq_len, "dpo")
    assert val is None and len(got) == len(want) == 24
    for i in range(len(want.examples)):
        np.testing.assert_array_equal(got.examples[i].input_ids, want.examples[i].input_ids)
        np.testing.assert_array_equal(got.examples[i].loss_mask, want.examples[i].loss_mask)
    with pytest.raises(LorafitError, match="no pairs records"):  # without the mapping
        peek_data(make_cfg(setup, "cols", data=str(renamed), columns="prompt=question"))


def test_folder_valid_split_is_the_preference_validation_set(setup, tmp_path):
    """A data folder's valid.jsonl is the validation set of a preference run (as for sft),
    its records checked before the model loads, `valid.jsonl:N: reason`."""
    from lorafit.commands.train import load_preference_examples, peek_data
    from lorafit.core.errors import LorafitError

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "train.jsonl").write_text(setup.train.read_text())
    (folder / "valid.jsonl").write_text(setup.held.read_text())
    cfg = make_cfg(setup, "folder", data=str(folder))
    peek_data(cfg)
    train_set, val, notes = load_preference_examples(cfg, setup.tokenizer)
    held, _ = load_preferences(setup.held, setup.tokenizer, cfg.seq_len, "dpo")
    assert (len(train_set), len(val)) == (24, 8)
    np.testing.assert_array_equal(val.examples[1].input_ids, held.examples[1].input_ids)
    assert f"validation: 8 pairs from {folder / 'valid.jsonl'}" in notes
    (folder / "valid.jsonl").write_text(setup.held.read_text().splitlines()[0] + "\n" +
                                        json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    with pytest.raises(LorafitError, match=r"valid\.jsonl:2: missing field\(s\) rejected"):
        peek_data(cfg)


@pytest.mark.slow
def test_dpo_in_two_sharded_processes_equals_one_with_the_same_global_batch(setup):
    """`train --method dpo --nproc 2 --shard` (torch, gloo): each rank takes every other
    micro-batch, its loss sums are divided by the pairs of the whole step and all-reduced
    with the gradients and reward sums, so the adapter, the losses, the rewards and the
    validation loss equal one process with grad-accum 2 — with each rank holding half of
    the base's layers (read as slices at load; gathered per layer for the reference, the
    policy and its recomputed backward) and FSDP2 half of the optimizer state."""
    from lorafit.core import rundir
    from test_distributed import assert_same_adapter, cli, flags, one_process

    kw = dict(method="dpo", beta=0.1, schedule="constant", val_data=str(setup.held),
              eval_every=2)
    ref, two = setup.root / "dpo-one", setup.root / "dpo-two"
    assert one_process(setup.folder, setup.train, ref, "torch", grad_accum=2,
                       **kw) == "completed"
    proc = cli(*flags(setup.folder, setup.train, two, "torch", **kw), "--nproc", "2",
               "--shard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rundir.read_status(two)["world_size"] == 2
    start = [next(r for r in rundir.read_metrics(run) if r.get("kind") == "start")
             for run in (ref, two)]
    assert start[1]["optimizer_shards"] == 2
    from safetensors.numpy import load_file

    weights = load_file(str(setup.folder / "model.safetensors"))
    layers = sum(v.size * 4 for k, v in weights.items() if k.startswith("model.layers."))
    assert start[0]["base_bytes"] == [sum(v.size * 4 for v in weights.values())]
    for held in start[1]["base_bytes"]:  # the layers in halves (+ padding), the rest whole
        assert 0 <= held - (start[0]["base_bytes"][0] - layers / 2) <= 4 * 2
    assert_same_adapter(rundir.adapter_path(ref), rundir.adapter_path(two))

    def rows(run, kind):
        return [r for r in rundir.read_metrics(run) if r.get("kind") == kind]

    one, both = rows(ref, "train"), rows(two, "train")
    assert len(one) == len(both) == 4 and one[0]["loss"] == pytest.approx(math.log(2))
    for a, b in zip(one, both):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["reward_accuracy"] == a["reward_accuracy"]
        # a reward is beta x the difference of two float32 log-prob sums of size ~50: its
        # float32 floor is about beta x 1e-5, whatever the order of the sums
        for f in ("reward_chosen", "reward_rejected", "reward_margin"):
            assert b[f] == pytest.approx(a[f], abs=1e-6), (a["step"], f)
    evals = [(rows(run, "eval")) for run in (ref, two)]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
