"""Which command lines get OpenBLAS preloaded (core/blas.runs_mlx): MLX runs only. The
preloaded libblas.so.3 takes over torch's BLAS (a torch CPU training step measured 2.8x
slower with it), so a torch run must start without it."""

from __future__ import annotations

import pytest

from lorafit.core.blas import runs_mlx


@pytest.mark.parametrize("argv,mlx", [
    (["train", "--model", "m", "--data", "d.jsonl", "--backend", "mlx"], True),
    (["serve", "--backend=mlx", "--model", "m"], True),
    (["train", "--model", "m", "--data", "d.jsonl", "--backend", "torch"], False),
    (["train", "--model", "m", "--data", "d.jsonl"], False),  # auto: torch where installed
    (["generate", "--backend", "auto", "--model", "m"], False),
    (["demo"], False),
    (["tui"], False),  # its trainers inherit its environment: each decides for itself
])
def test_only_mlx_command_lines_get_openblas(argv, mlx):
    assert runs_mlx(argv) is mlx


def test_a_config_or_resumed_run_on_mlx_gets_openblas(tmp_path):
    (tmp_path / "mlx.toml").write_text('backend = "mlx"\nrank = 8\n')
    (tmp_path / "torch.toml").write_text('backend = "torch"\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text('[lora]\nbackend = "mlx"\n')
    assert runs_mlx(["train", str(tmp_path / "mlx.toml")])
    assert not runs_mlx(["train", str(tmp_path / "torch.toml")])
    assert runs_mlx(["train", "--resume", str(tmp_path / "run")])
    assert not runs_mlx(["train", str(tmp_path / "missing.toml")])  # the command says why
    # a flag on the command line wins over the file
    assert not runs_mlx(["train", str(tmp_path / "mlx.toml"), "--backend", "torch"])
