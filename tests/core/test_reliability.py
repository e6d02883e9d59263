"""Issue 12: every fault and bad input found in the reliability audit, reproduced."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorafit.core import events as ev
from lorafit.core import rundir
from lorafit.core.config import TrainConfig
from lorafit.core.errors import LorafitError



# -- 1. fused AdamW resume ---------------------------------------------------------------
def _adamw(device, fused):
    import torch

    from lorafit.backends.torch.optim import TorchAdamW

    params = {"a": torch.nn.Parameter(torch.zeros(3, 2, device=device)),
              "b": torch.nn.Parameter(torch.zeros(4, device=device))}
    return TorchAdamW(params, fused=fused), params


def _saved_state():
    return {"step": np.asarray(7, dtype=np.int64),
            "exp_avg.a": np.full((3, 2), 0.5, np.float32),
            "exp_avg_sq.a": np.full((3, 2), 0.25, np.float32),
            "exp_avg.b": np.ones(4, np.float32), "exp_avg_sq.b": np.ones(4, np.float32)}


def test_1_fused_adamw_restores_step_on_the_parameter_device():
    """Fused AdamW needs `step` on the parameter's device (pytorch#104767); 'meta' stands in
    for a GPU on a CPU-only machine: the restored state must follow the parameters."""
    import torch

    opt, params = _adamw("meta", fused=True)
    opt.load_state_numpy(_saved_state())
    for p in params.values():
        st = opt.opt.state[p]
        assert st["step"].device == p.device, "step must live where the parameter lives"
        assert st["step"].dtype == torch.float32
        assert st["exp_avg"].device == p.device and st["exp_avg_sq"].device == p.device
    assert opt.step_count == 7


def test_1_restore_goes_through_optimizer_load_state_dict_and_resumes_exactly():
    import torch

    calls = []
    ref, ref_params = _adamw("cpu", fused=False)
    for _ in range(3):
        ref.step(ref_params, {k: torch.ones_like(v) for k, v in ref_params.items()}, 1e-2)
    saved = ref.state_to_numpy()
    for fused in (False, True):
        opt, params = _adamw("cpu", fused=fused)
        opt.opt.register_load_state_dict_post_hook(lambda o: calls.append(o))
        with torch.no_grad():
            for k in params:
                params[k].copy_(ref_params[k])
        opt.load_state_numpy(saved)
        st = opt.opt.state[params["a"]]
        assert st["step"].item() == 3 and st["step"].dtype == torch.float32
        opt.step(params, {k: torch.ones_like(v) for k, v in params.items()}, 1e-2)
        r2, r2p = _adamw("cpu", fused=False)
        with torch.no_grad():
            for k in r2p:
                r2p[k].copy_(ref_params[k])
        r2.load_state_numpy(saved)
        r2.step(r2p, {k: torch.ones_like(v) for k, v in r2p.items()}, 1e-2)
        for k in params:
            torch.testing.assert_close(params[k].detach(), r2p[k].detach())
    assert len(calls) == 2


# -- a tiny run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_llama):
    return (tmp_path_factory.mktemp("rel"), *small_llama)


def cfg_of(tiny, out, **kw):
    root, folder, data = tiny
    base = dict(model=str(folder), data=str(data), output=str(root / out), backend="torch",
                rank=4, alpha=8, targets="q_proj,v_proj", batch_size=4, lr=3e-3,
                max_steps=4, seq_len=32, seed=0, warmup_steps=0)
    base.update(kw)
    return TrainConfig(**base)


class Recorder(ev.Sink):
    def __init__(self):
        self.events = []

    def __call__(self, e):
        self.events.append(e)


def run(cfg, resume=False, control=None, allow_changed=(), reports=None):
    from lorafit.commands.train import build_trainer

    rec = Recorder()
    trainer = build_trainer(cfg, [rec], control=control, resume=resume,
                            report=(reports.append if reports is not None else lambda t: None),
                            allow_changed=allow_changed)
    try:
        status = trainer.run()
    finally:
        for s in trainer.sinks:
            s.close()
    return trainer, rec, status


# -- 2. a corrupt newest checkpoint -------------------------------------------------------
def test_2_resume_skips_an_unreadable_newest_checkpoint(tiny):
    cfg = cfg_of(tiny, "corrupt", max_steps=4, save_every=2)
    run(cfg)
    newest = rundir.checkpoint_path(cfg.output, 4)
    assert rundir.is_complete(newest)
    (newest / rundir.OPTIMIZER).write_bytes(b"\x00garbage, not safetensors")
    reports = []
    trainer, _, status = run(cfg_of(tiny, "corrupt", max_steps=6, save_every=2),
                             resume=True, reports=reports, allow_changed=("max_steps",))
    assert any("skipping unreadable checkpoint" in r and "step-4" in r for r in reports)
    assert all("\n" not in r for r in reports)
    assert any("resuming from" in r and "step-2" in r for r in reports)
    assert status == "completed" and trainer.pos.step == 6


# -- 3. resume with changed settings ------------------------------------------------------
def test_3_resume_refuses_changed_settings_and_allows_the_safe_ones(tiny, tmp_path):
    cfg = cfg_of(tiny, "changed", max_steps=2)
    run(cfg)
    with pytest.raises(LorafitError, match=r"--rank 4 -> 8") as e:
        run(cfg_of(tiny, "changed", max_steps=2, rank=8), resume=True)
    assert "\n" not in str(e.value)
    with pytest.raises(LorafitError, match="--allow-changed lr"):
        run(cfg_of(tiny, "changed", max_steps=2, lr=1e-3), resume=True)
    from lorafit.core.checkpoint import parse_allow_changed

    with pytest.raises(LorafitError, match="only"):
        parse_allow_changed("rank")
    assert parse_allow_changed("lr,max-steps") == ("lr", "max_steps")
    _, _, status = run(cfg_of(tiny, "changed", max_steps=3, lr=1e-3), resume=True,
                       allow_changed=("lr", "max_steps"))
    assert status == "completed"
    changed = tmp_path / "other.jsonl"
    changed.write_text(Path(tiny[2]).read_text().replace("fox", "cat"))
    with pytest.raises(LorafitError, match="--data"):
        run(cfg_of(tiny, "changed", max_steps=3, lr=1e-3, data=str(changed)), resume=True,
            allow_changed=("lr", "max_steps"))
    saved = rundir.read_trainer_state(rundir.checkpoint_path(cfg.output, 3))
    assert saved["fingerprint"]["rank"] == 4


# -- 4. one trainer per run folder --------------------------------------------------------
def test_4_a_second_trainer_is_refused_with_the_holders_pid(tiny):
    cfg = cfg_of(tiny, "locked")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lorafit.core import rundir; "
        f"rundir.RunLock({cfg.output!r}).acquire(); print('held', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert rundir.is_locked(cfg.output)
        with pytest.raises(LorafitError, match=f"in use by another trainer \\(pid {holder.pid}\\)"):
            run(cfg)
        assert not rundir.metrics_path(cfg.output).exists()  # nothing loaded, nothing written
    finally:
        holder.kill()
        holder.wait()
    assert not rundir.is_locked(cfg.output)  # the kernel drops a dead holder's lock
    _, _, status = run(cfg)
    assert status == "completed" and not rundir.is_locked(cfg.output)


# -- 5. a crash is recorded, not left "running" --------------------------------------------
def test_5_an_unexpected_error_marks_the_run_failed_and_prints_one_line(tiny, monkeypatch,
                                                                       capsys):
    from lorafit.commands import train as train_cmd
    from lorafit.core.train import Trainer

    def boom(self, micro, lr):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", boom)
    cfg = cfg_of(tiny, "crash")
    monkeypatch.setattr(train_cmd.ev, "ConsoleSink", lambda: Recorder())
    assert train_cmd.main(cfg) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: RuntimeError: CUDA out of memory.")
    assert str(rundir.error_log_path(cfg.output)) in err[0]
    assert "Traceback" in rundir.error_log_path(cfg.output).read_text()
    status = rundir.read_status(cfg.output)
    assert status["state"] == "failed" and "out of memory" in status["error"]
    assert "\n" not in status["error"]
    assert not rundir.is_locked(cfg.output)


def test_5_a_dead_trainer_reads_as_died(tmp_path):
    from lorafit.tui.runfiles import RunFollower

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    status = dict(rundir.new_status(dead.pid), state="running")
    rundir.write_status(tmp_path, status)
    assert rundir.effective_state(tmp_path) == "died"
    follower = RunFollower(tmp_path)
    follower.poll()
    assert not follower.state.active and follower.state.state == "died"
    rundir.write_status(tmp_path, dict(status, pid=os.getpid()))
    assert rundir.effective_state(tmp_path) == "running"


# -- 6. the final adapter is never lost ---------------------------------------------------
def test_6_a_kill_between_aside_and_promote_keeps_the_old_adapter(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    with rundir.atomic_folder(target) as tmp:
        (tmp / "w").write_text("old")
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old one is aside, the new one not yet in place
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with rundir.atomic_folder(target) as tmp:
            (tmp / "w").write_text("new")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists() and (tmp_path / ".adapter.old" / "w").read_text() == "old"
    with rundir.atomic_folder(target) as tmp:  # the next write puts the old one back first
        assert (target / "w").read_text() == "old"
        (tmp / "w").write_text("new")
    assert (target / "w").read_text() == "new" and not (tmp_path / ".adapter.old").exists()


# -- 7. Ctrl-C before the first step ------------------------------------------------------
def test_7_ctrl_c_during_model_load_writes_nothing(tiny):
    from lorafit.commands.train import Interrupted
    from lorafit.core.control import Control

    cfg = cfg_of(tiny, "early-ctrl-c")
    control = Control(None)
    control.stop()  # what the signal handler does when Ctrl-C arrives during loading
    with pytest.raises(Interrupted, match="nothing was written"):
        run(cfg, control=control)
    assert not Path(cfg.output).exists()
    # a stop that arrives after loading but before step 1: no checkpoint, no adapter
    from lorafit.commands.train import build_trainer

    trainer = build_trainer(cfg, [], control=Control(cfg.output), report=lambda t: None)
    trainer.control.stop()
    assert trainer.run() == "stopped"
    for s in trainer.sinks:
        s.close()
    assert not rundir.holds_checkpoints(cfg.output)
    assert not rundir.adapter_path(cfg.output).exists()
    _, _, status = run(cfg)  # the folder is not refused
    assert status == "completed"


# -- 8. control.json ----------------------------------------------------------------------
@pytest.mark.parametrize("text", ['{"seq": "x", "command": "stop"}', '[1, 2]', '"stop"',
                                  '{"seq": 1e999, "command": "stop"}', '{"seq": [1]}',
                                  '{"command": ["stop"]}', 'not json', '', 'null',
                                  '{"seq": NaN, "command": "pause"}'])
def test_8_a_malformed_control_file_never_crashes(tmp_path, text):
    from lorafit.core.control import Control, send_command

    control = Control(tmp_path)
    rundir.control_path(tmp_path).write_text(text)
    os.utime(rundir.control_path(tmp_path), ns=(1, 1))
    control.poll()
    send_command(tmp_path, "stop")  # and a good request after it still works
    assert control.poll() == "stop" and control.stop_requested


def test_8_a_deleted_control_file_does_not_hide_the_next_request(tmp_path):
    from lorafit.core.control import Control, send_command

    control = Control(tmp_path)
    for _ in range(3):
        send_command(tmp_path, "save")
        assert control.poll() == "save"
    rundir.control_path(tmp_path).unlink()
    assert control.poll() is None
    send_command(tmp_path, "stop")  # seq restarts at 1
    assert control.poll() == "stop" and control.stop_requested


def test_8_a_request_is_acknowledged_in_status(tiny):
    from lorafit.core.control import Control, send_command

    cfg = cfg_of(tiny, "ack", max_steps=3)
    Path(cfg.output).mkdir(parents=True)
    control = Control(cfg.output)
    send_command(cfg.output, "save")
    trainer, rec, status = run(cfg, control=control)
    ack = rundir.read_status(cfg.output)["acknowledged"]
    assert ack["command"] == "save" and ack["step"] == 0 and ack["seq"] == 1
    assert any(isinstance(e, ev.ControlApplied) for e in rec.events)


# -- 9. early stopping keeps the best adapter ---------------------------------------------
def test_9_early_stopping_writes_the_best_adapter(tiny):
    from lorafit.core.adapter_io import load_peft

    cfg = cfg_of(tiny, "best", max_steps=40, lr=0.3, val_fraction=0.25, eval_every=1,
                 early_stopping_patience=1, keep_checkpoints=1, save_every=1)
    trainer, rec, status = run(cfg)
    assert status == "early_stopped"
    end = [e for e in rec.events if isinstance(e, ev.RunFinished)][0]
    assert end.adapter_step == trainer.best_step < trainer.pos.step
    evals = {e.step: e.val_loss for e in rec.events if isinstance(e, ev.EvalReport)}
    assert evals[trainer.best_step] == min(evals.values())
    _, written = load_peft(rundir.adapter_path(cfg.output))
    _, best = load_peft(rundir.best_adapter_path(cfg.output))
    last = trainer.adapter_numpy()
    for k in written:
        np.testing.assert_array_equal(written[k], best[k])
    assert any(not np.array_equal(written[k], last[k]) for k in written)
    assert any(f"step {trainer.best_step}" in getattr(e, "text", "") for e in rec.events)


# -- 10. hyper-parameters -----------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(lr=math.nan), dict(lr=math.inf), dict(epochs=math.inf),
                                 dict(max_grad_norm=-1.0), dict(min_lr_ratio=-0.5),
                                 dict(min_lr_ratio=2.0), dict(weight_decay=-0.1),
                                 dict(warmup_steps=-3), dict(alpha=0.0), dict(alpha=math.nan),
                                 dict(seed=1.5), dict(seed="x"), dict(layers=[-1]),
                                 dict(weight_decay=math.nan)])
def test_10_bad_hyper_parameters_are_one_line_errors(bad):
    with pytest.raises(LorafitError) as e:
        TrainConfig(model="m", data="d", **bad)
    assert "\n" not in str(e.value)


def test_10_layers_out_of_range_stop_before_anything_loads(tiny, monkeypatch):
    import lorafit.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(LorafitError, match=r"layers 2,7 out of range: the model has 2 layers"):
        run(cfg_of(tiny, "layers", layers=[0, 2, 7]))


def test_10_cli_seed_and_lr(tiny, capsys):
    from lorafit.cli import main

    root, folder, data = tiny
    rc = main(["train", "--model", str(folder), "--data", str(data), "--output",
               str(root / "cli-nan"), "--lr", "nan"])
    assert rc == 2 and capsys.readouterr().err.startswith("error: lr must be a finite")


# -- 11. token ids and stored-quantized weights -------------------------------------------
def test_11_token_ids_outside_the_vocabulary_are_refused():
    from lorafit.commands.train import check_token_ids
    from lorafit.core.examples import Example

    ok = Example(np.array([1, 5, 9], np.int32), np.ones(3, bool), "a:1")
    bad = Example(np.array([1, 500], np.int32), np.ones(2, bool), "a:2")
    check_token_ids([ok], 10)
    with pytest.raises(LorafitError, match="token id 500 is outside the model's vocabulary"):
        check_token_ids([ok, bad], 320)


def test_11_a_folder_of_stored_quantized_weights_is_refused(tiny, tmp_path):
    import shutil

    folder = tmp_path / "fp8"
    shutil.copytree(tiny[1], folder)
    c = json.loads((folder / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(c))
    with pytest.raises(LorafitError, match="weights stored fp8 .* not supported"):
        run(cfg_of(tiny, "fp8", model=str(folder)))


def _copy_with_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(changes)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_11_generate_and_export_refuse_stored_quantized_folders_in_one_line(tiny, tmp_path,
                                                                            capsys):
    from lorafit.cli import main

    fp8 = _copy_with_config(tiny[1], tmp_path / "fp8", quantization_config={
        "quant_method": "fp8", "weight_block_size": [128, 128]})
    trained, _, _ = run(cfg_of(tiny, "q-src", max_steps=1))
    for argv in (["generate", "--model", str(fp8), "--prompt", "hello", "--backend", "torch"],
                 ["export", "--adapter", str(trained.run_dir / "adapter"), str(tmp_path / "merged"),
                  "--merge", "--model", str(fp8)]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "weights stored fp8" in err and "\n" not in err
        assert "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_11_an_mlx_lm_quantized_config_is_not_mistaken_for_a_foreign_one(tmp_path):
    from lorafit.models.loader import check_stored_quantization

    q = {"group_size": 64, "bits": 4}  # mlx-lm writes both keys
    check_stored_quantization({"quantization": q, "quantization_config": q}, tmp_path)
    with pytest.raises(LorafitError, match="weights stored gptq"):
        check_stored_quantization({"text_config": {"quantization_config": {
            "quant_method": "gptq"}}}, tmp_path)


def test_11_generate_refuses_prompt_ids_outside_the_vocabulary(tiny, tmp_path, capsys):
    """A model whose embedding is smaller than its tokenizer (a mismatched tokenizer)."""
    from safetensors.numpy import load_file, save_file

    from lorafit.cli import main

    small = _copy_with_config(tiny[1], tmp_path / "small", vocab_size=8)
    weights = load_file(small / "model.safetensors")
    weights = {k: (v[:8] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
               for k, v in weights.items()}
    save_file(weights, small / "model.safetensors", metadata={"format": "pt"})
    for backend in ("torch", "mlx"):
        capsys.readouterr()
        rc = main(["generate", "--model", str(small), "--prompt", "the quick brown fox",
                   "--backend", backend, "--max-new-tokens", "2"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "is outside the model's vocabulary (0-7)" in err
        assert "\n" not in err.split("error: ", 1)[1]


# -- 13. config files ---------------------------------------------------------------------
def test_13_config_file_mistakes_are_one_line_errors(tmp_path):
    from lorafit.core.config import read_toml

    with pytest.raises(LorafitError, match="is a folder"):
        read_toml(tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'model = "caf\xe9"\n')
    with pytest.raises(LorafitError, match="not UTF-8"):
        read_toml(latin)
    twice = tmp_path / "twice.toml"
    twice.write_text("[lora]\nrank = 8\n[train]\nrank = 16\n")
    with pytest.raises(LorafitError, match=r"rank is set twice \(\[lora\] and \[train\]\)"):
        read_toml(twice)
    with pytest.raises(LorafitError, match="control characters"):
        TrainConfig(model="m", data="d", output="runs/a\nb")


def test_13_written_config_reads_back_exactly(tmp_path):
    from lorafit.core.config import read_toml, resolve, to_toml

    awkward = ['dir "with" quotes\\and backslash/ünï', "d\u00e9 \u2192 \U0001f600.jsonl",
               "runs/#not a comment", "it's = [x]", "C:\\Users\\a b\\", '"""', "'''",
               "[table]", "  leading and trailing  "]
    for i, text in enumerate(awkward):
        cfg = TrainConfig(model=text, data=awkward[(i + 1) % len(awkward)], output=text,
                          targets="all-linear", layers=[0, 1], lr=3e-5, alpha=0.5,
                          max_grad_norm=None, val_fraction=0.1)
        path = tmp_path / f"c{i}.toml"
        path.write_text(to_toml(cfg), encoding="utf-8")
        assert resolve(str(path), {}) == cfg
        assert read_toml(path)["model"] == text
    for bad in ["a\nb", "tab\there", "nul\x00"]:  # refused before anything is written
        with pytest.raises(LorafitError, match="control characters"):
            TrainConfig(model="m", data=bad)


# -- 18. metrics.jsonl --------------------------------------------------------------------
def test_18_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    f = rundir.open_metrics(tmp_path)
    rundir.append_record(f, {"kind": "paused", "step": 1})
    f.write('{"kind": "resumed", "st')  # the writer was killed here
    f.close()
    f = rundir.open_metrics(tmp_path)  # the resumed run appends
    rundir.append_record(f, {"kind": "paused", "step": 2})
    f.close()
    assert rundir.read_metrics(tmp_path) == [{"kind": "paused", "step": 1},
                                             {"kind": "paused", "step": 2}]


def test_18_non_finite_numbers_are_written_as_null(tmp_path):
    f = rundir.open_metrics(tmp_path)
    rundir.append_record(f, {"kind": "train", "loss": math.nan, "x": [math.inf, 1.0],
                             "d": {"y": -math.inf}})
    f.close()
    text = rundir.metrics_path(tmp_path).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"kind": "train", "loss": None, "x": [None, 1.0],
                                "d": {"y": None}}


# -- fault injection: random SIGKILLs, each followed by --resume ---------------------------
def _checkpoint_records(out: Path) -> int:
    return sum(1 for r in rundir.read_metrics(out) if r.get("kind") == "checkpoint")


@pytest.mark.slow
def test_fault_injection_20_random_sigkills_each_resumed(tiny, tmp_path):
    """20 SIGKILLs at random moments of a --save-every 1 run (some inside a checkpoint
    write, via LORAFIT_FAULT); each is followed by --resume, which must start and make
    progress; every surviving checkpoint's adapter and the final adapter load in PEFT."""
    import random
    import time

    import torch
    import transformers
    from peft import PeftModel

    from lorafit.core.checkpoint import load_latest

    root, folder, data = tiny
    out = tmp_path / "run"
    base = [sys.executable, "-m", "lorafit.cli", "train"]
    fresh = ["--model", str(folder), "--data", str(data), "--output", str(out),
             "--backend", "torch", "--max-steps", "400", "--save-every", "1", "--seq-len",
             "32", "--batch-size", "2", "--rank", "4", "--keep-checkpoints", "2"]
    env = dict(os.environ, LORAFIT_NO_REEXEC="1")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    rng = random.Random(12)
    kills, last_step = 0, 0
    while kills < 20:
        seen = _checkpoint_records(out) if out.exists() else 0
        args = base + (["--resume", str(out)] if rundir.config_path(out).exists() else fresh)
        run_env = dict(env)
        if kills % 4 == 3:  # a kill inside a checkpoint write
            run_env["LORAFIT_FAULT"] = f"kill-in-checkpoint:{last_step + 2}"
        proc = subprocess.Popen(args, env=run_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120

        def progressed():
            return out.exists() and _checkpoint_records(out) > seen

        while proc.poll() is None and not progressed():
            assert time.time() < deadline, "the resumed run made no progress"
            time.sleep(0.05)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment of the next steps
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read()
        assert proc.returncode in (-signal.SIGKILL, 0), err
        assert "Traceback" not in err and "error:" not in err, err
        kills += proc.returncode == -signal.SIGKILL
        found = load_latest(out, report=lambda t: None)
        assert found is not None
        path, ckpt = found
        assert ckpt["state"]["step"] >= last_step  # never lose a completed checkpoint
        last_step = ckpt["state"]["step"]
        pm = PeftModel.from_pretrained(ref, str(path))  # every checkpoint adapter loads
        ref = pm.unload()
        if proc.returncode == 0:
            break
    assert kills == 20
    # the last resume runs to the end; a few steps past the last checkpoint are enough
    # (--max-steps 400 only keeps the killed runs from finishing first)
    proc = subprocess.run(base + ["--resume", str(out), "--allow-changed", "max-steps",
                                  "--max-steps", str(last_step + 3)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert rundir.read_status(out)["state"] == "completed"
    assert rundir.read_status(out)["step"] == last_step + 3
    pm = PeftModel.from_pretrained(ref, str(rundir.adapter_path(out))).eval()
    with torch.no_grad():
        assert torch.isfinite(pm(torch.tensor([[1, 5, 9]])).logits).all()


# -- 17. the trainer state does not grow with the steps -----------------------------------
def test_17_trainer_state_stays_the_same_size_over_a_long_run(tiny):
    from lorafit.core.train import KEPT_LOSSES

    trainer, _, _ = run(cfg_of(tiny, "long", max_steps=2))
    sizes = []
    for n in (1_000, 10_000):
        while trainer.loss_summary["count"] < n:
            trainer._record_loss(1.25)
        sizes.append(len(json.dumps(trainer.trainer_state())))
    assert sizes[1] <= sizes[0] + 16 and len(trainer.losses) == KEPT_LOSSES
    assert trainer.loss_summary["count"] == 10_000


# -- 14, 15. estimating for a device this machine does not have ---------------------------
def test_14_estimate_for_an_absent_device_shows_the_breakdown_without_a_budget(tiny, capsys,
                                                                              monkeypatch):
    import lorafit.backends.devices as devices
    from lorafit.cli import main

    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    monkeypatch.setattr(devices, "metal_available", lambda: False)
    folder = str(tiny[1])
    for device in ("cuda", "cuda:1", "metal"):
        assert main(["estimate", "--model", folder, "--backend", "torch" if device != "metal"
                     else "mlx", "--device", device]) == 0
        out = capsys.readouterr().out
        assert "no budget known" in out and "total" in out and "suggestions" not in out
        assert "trainable parameters:" in out
    assert main(["estimate", "--model", folder, "--device", "cuda", "--backend", "torch",
                 "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["fits"] is None and est["budget"] is None and est["trainable_params"] > 0
    assert main(["estimate", "--model", folder, "--backend", "torch", "--device", "cpu",
                 "--budget", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "verdict: fits" in out and "suggestions" not in out  # nothing to suggest
    assert main(["estimate", "--model", folder, "--backend", "torch", "--device", "cpu",
                 "--budget", "1KiB"]) == 0
    assert "suggestions (each alone would fit):" in capsys.readouterr().out


def test_15_a_gpu_run_without_dtype_is_estimated_in_the_checkpoints_dtype(tmp_path,
                                                                         monkeypatch):
    import lorafit.backends.devices as devices
    from lorafit.commands.estimate import estimate_for_config

    config = {"model_type": "llama", "vocab_size": 320, "hidden_size": 64,
              "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    cfg = TrainConfig(model=str(tmp_path / "config.json"), data="d", backend="torch",
                      device="cuda")
    assert estimate_for_config(cfg)["settings"]["dtype"] == "bfloat16"
    cfg = TrainConfig(model=str(tmp_path / "config.json"), data="d", backend="torch",
                      device="cpu")
    assert estimate_for_config(cfg)["settings"]["dtype"] == "float32"
    assert devices.device_memory("torch", "cuda:1")[0] is None
