"""`lorafit demo` end to end, shortened: the model is built, the adapter trained, saved in
PEFT layout and loaded back, and both scores are printed (the full demo, 400 steps and 100
held-out words, is what README.md's first command runs)."""

from __future__ import annotations

import re

from lorafit.commands import demo


def test_the_demo_trains_and_scores_before_and_after(tmp_path, capsys):
    rc = demo.main(backend="torch", output=str(tmp_path), steps=1, held_out=3)
    out, err = capsys.readouterr()
    assert "held-out exact match before training:" in err
    scores = re.search(r"held-out exact match: base (\d+)% -> with adapter (\d+)% "
                       r"\(3 held-out words", out)
    assert scores, out
    before, after = (int(s) for s in scores.groups())
    assert rc == (0 if after > before else 1)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(re.findall(r"^shift: [a-z]{5} = ", out, re.M)) == 3  # the side-by-side rows
